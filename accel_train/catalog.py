"""`accel-train checkpoints OUT|hf://USER/REPO`: which checkpoints exist, and which can be trusted.

Local: size, manifest verified (every file's sha256), pushed to the run's Hub repo or not, age.
Hub: size, verified against the repo's file listing without downloading (every file present with its recorded
size; sha256 compared for the LFS files, whose hash the Hub reports), age of the push.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi

from accel_train import checkpoint as ckpt
from accel_train import hub
from accel_train.errors import TrainError


@dataclass
class Row:
    step: int
    name: str
    size: int
    verified: str
    pushed: str
    age_s: float | None


def local_rows(output_dir: Path) -> list[Row]:
    if not output_dir.is_dir():
        raise TrainError(f"{output_dir} is not a folder.")
    checkpoints = ckpt.list_checkpoints(output_dir)
    remote = _remote_names(checkpoints[-1][1]) if checkpoints else None
    rows = []
    for step, path in checkpoints:
        problem = ckpt.verify(path)
        manifest = path / ckpt.MANIFEST_FILE
        rows.append(
            Row(
                step=step,
                name=path.name,
                size=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                verified="yes" if problem is None else f"NO: {problem}",
                pushed=remote if isinstance(remote, str) else ("yes" if path.name in remote else "no"),
                age_s=time.time() - manifest.stat().st_mtime if manifest.is_file() else None,
            )
        )
    return rows


def _remote_names(newest: Path) -> set[str] | str:
    """Names of the checkpoints in the run's Hub repo; or why that is not known."""
    config = ckpt.read_train_config(newest) or {}
    if not config.get("push_to_hub") or not config.get("hub_repo_id"):
        return "-"
    try:
        pointer, _ = hub.read_pointer(config["hub_repo_id"], config.get("hub_revision"))
    except TrainError as error:
        return f"unknown ({str(error).split(':')[0]})"
    return set(pointer["checkpoints"])


def hub_rows(spec: str) -> list[Row]:
    repo_id, _, revision = hub.parse_uri(spec)
    pointer, commit = hub.read_pointer(repo_id, revision)
    try:
        tree = HfApi().list_repo_tree(repo_id, revision=commit, recursive=True)
        listing = {entry.path: entry for entry in tree}
    except Exception as error:  # HTTP and transport errors
        raise TrainError(f"Could not list the files of {repo_id}: {error}") from None
    rows = []
    for name, entry in sorted(pointer["checkpoints"].items(), key=lambda item: item[1]["step"]):
        problems = []
        for rel, expected in entry["files"].items():
            remote = listing.get(f"{name}/{rel}")
            if remote is None or getattr(remote, "size", None) != expected["size"]:
                problems.append(f"{rel} {'missing' if remote is None else 'has another size'}")
            elif getattr(remote, "lfs", None) is not None and remote.lfs.sha256 != expected["sha256"]:
                problems.append(f"{rel} has another sha256")
        pushed_at = entry.get("pushed_at")
        rows.append(
            Row(
                step=entry["step"],
                name=name,
                size=sum(f["size"] for f in entry["files"].values()),
                verified="yes" if not problems else "NO: " + ", ".join(problems),
                pushed="yes",
                age_s=time.time() - pushed_at if pushed_at else None,
            )
        )
    return rows


def _human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def render(rows: list[Row], as_json: bool) -> str:
    if as_json:
        return json.dumps([row.__dict__ for row in rows], indent=2)
    if not rows:
        return "No checkpoints."
    table = [("step", "checkpoint", "size", "verified", "pushed", "age")]
    table += [(str(r.step), r.name, _human_size(r.size), r.verified, r.pushed, _human_age(r.age_s)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]) for row in table]
    return "\n".join(lines)


def rows(target: str) -> list[Row]:
    return hub_rows(target) if hub.is_hub_uri(target) else local_rows(Path(target))
