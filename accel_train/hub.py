"""Checkpoints on the Hugging Face Hub: pushed in the background, fetched and verified for a resume elsewhere.

Remote layout of `USER/REPO`:
    checkpoint-<step>/...   one atomic commit per checkpoint (create_commit with all its files)
    checkpoints.json        written in a later commit: the newest fully uploaded checkpoint and the size and
                            sha256 of every file of each pushed checkpoint, so no reader takes a half-uploaded
                            checkpoint for the latest, and every download is verified
    config.json, model.safetensors, ...   the final model at the root, in lerobot's layout

The token comes from huggingface_hub's usual sources (HF_TOKEN, the login cache); it is never printed or stored.
Only the main process pushes, from one background thread, so no rank ever waits on the network in a collective.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from accel_train.checkpoint import MANIFEST_FILE, NAME, TMP_PREFIX, sha256, step_from_name
from accel_train.errors import TrainError
from accel_train.sources import dataset_ids

log = logging.getLogger(__name__)

POINTER_FILE = "checkpoints.json"
URI_PREFIX = "hf://"


@dataclass
class PushReport:
    pushed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # superseded by a newer checkpoint before their turn
    failed: list[int] = field(default_factory=list)
    final_pushed: bool | None = None

    def summary(self, repo_id: str) -> str:
        def steps(values: list[int]) -> str:
            return ", ".join(map(str, values)) or "none"

        final = {None: "not attempted", True: "pushed", False: "FAILED"}[self.final_pushed]
        return (
            f"Hub {repo_id}: checkpoints pushed at steps {steps(self.pushed)}; skipped (superseded) "
            f"{steps(self.skipped)}; failed {steps(self.failed)}; final model {final}."
        )


def _describe(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}{f' {status}' if status else ''}: {first}"


class HubPusher:
    """Uploads checkpoints in a background thread; when busy, the newest waiting checkpoint replaces older ones."""

    def __init__(
        self,
        repo_id: str,
        revision: str | None = None,
        private: bool = False,
        keep_last: int | None = None,
        retries: int = 4,
        backoff_s: float = 1.0,
    ):
        self.repo_id, self.revision, self.private = repo_id, revision, private
        self.keep_last, self.retries, self.backoff_s = keep_last, retries, backoff_s
        self.api = HfApi()
        self.report = PushReport()
        self._pointer: dict[str, Any] | None = None
        self._ready = False
        self._pending: tuple[Path, int] | None = None
        self._busy: Path | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
        self._thread.start()

    def submit(self, folder: Path, step: int) -> None:
        """Queue a complete local checkpoint; returns at once."""
        with self._cond:
            if self._pending is not None:
                self.report.skipped.append(self._pending[1])
                log.info(
                    "Hub: checkpoint-%d superseded by checkpoint-%d before its upload began", self._pending[1], step
                )
            self._pending = (folder, step)
            self._cond.notify()

    @property
    def busy(self) -> bool:
        """Whether an upload is running now (recorded in metrics.jsonl, to measure its cost on training)."""
        return self._busy is not None

    def is_uploading(self, folder: Path) -> bool:
        with self._cond:
            return folder in (self._busy, self._pending[0] if self._pending else None)

    def finish(self, final_files: list[Path], timeout_s: float | None = None) -> PushReport:
        """Wait for the pending upload, then push the final model to the repo's root (skipped if final_files=[])."""
        log.info("Hub: waiting for the last checkpoint upload to %s ...", self.repo_id)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("Hub: the upload did not finish within %.0f s; it is abandoned.", timeout_s)
            return self.report
        if final_files:
            log.info("Hub: pushing the final model to %s ...", self.repo_id)
            operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in final_files]
            self.report.final_pushed = self._attempt("final model", lambda: self._commit(operations, "Final model"))
        log.log(
            logging.WARNING if self.report.failed or self.report.final_pushed is False else logging.INFO,
            self.report.summary(self.repo_id),
        )
        return self.report

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                (folder, step), self._pending = self._pending, None
                self._busy = folder
            try:
                self._push_checkpoint(folder, step)
            finally:
                with self._cond:
                    self._busy = None

    def _push_checkpoint(self, folder: Path, step: int) -> None:
        name = folder.name
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        files[MANIFEST_FILE] = {
            "size": (folder / MANIFEST_FILE).stat().st_size,
            "sha256": sha256(folder / MANIFEST_FILE),
        }
        operations = [
            CommitOperationAdd(path_in_repo=f"{name}/{rel}", path_or_fileobj=str(folder / rel)) for rel in sorted(files)
        ]
        started = time.perf_counter()
        if not self._attempt(name, lambda: self._commit(operations, f"Add {name}")):
            self.report.failed.append(step)
            return
        pointer = self._pointer_state()
        pointer["checkpoints"][name] = {"step": step, "files": files, "pushed_at": time.time()}
        pointer["latest"] = max(pointer["checkpoints"], key=lambda n: pointer["checkpoints"][n]["step"])
        removed = self._expired(pointer)
        for old in removed:
            del pointer["checkpoints"][old]
        pointer_op = CommitOperationAdd(
            path_in_repo=POINTER_FILE, path_or_fileobj=json.dumps(pointer, indent=2).encode()
        )
        if not self._attempt(f"{POINTER_FILE} for {name}", lambda: self._commit([pointer_op], f"Latest: {name}")):
            self.report.failed.append(step)
            return
        self.report.pushed.append(step)
        log.info("Hub: pushed %s to %s in %.1f s", name, self.repo_id, time.perf_counter() - started)
        if removed:
            deletions = [CommitOperationDelete(path_in_repo=f"{old}/") for old in removed]
            self._attempt(f"removal of {', '.join(removed)}", lambda: self._commit(deletions, "Remove old checkpoints"))

    def _expired(self, pointer: dict[str, Any]) -> list[str]:
        if not self.keep_last:
            return []
        names = sorted(pointer["checkpoints"], key=lambda n: pointer["checkpoints"][n]["step"])
        return names[: max(len(names) - self.keep_last, 0)]

    def _pointer_state(self) -> dict[str, Any]:
        """The remote pointer as last read or written (read once, so a resumed run keeps earlier entries)."""
        if self._pointer is None:
            try:
                path = self.api.hf_hub_download(self.repo_id, POINTER_FILE, revision=self.revision)
                self._pointer = json.loads(Path(path).read_text())
            except (RemoteEntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError, ValueError):
                self._pointer = {"latest": None, "checkpoints": {}}
        return self._pointer

    def _commit(self, operations: list, message: str) -> None:
        if not self._ready:
            self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            if self.revision:
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
            self._ready = True
        self.api.create_commit(self.repo_id, operations, commit_message=message, revision=self.revision)

    def _attempt(self, what: str, action) -> bool:
        """Run action with exponential backoff; never raise: training must go on whatever the network does."""
        for attempt in range(self.retries + 1):
            try:
                action()
                return True
            except Exception as error:  # HTTP errors, connection errors, timeouts: all retried the same way
                if attempt == self.retries:
                    log.warning(
                        "Hub: giving up on the upload of %s after %d attempts (%s). Training goes on; the local "
                        "checkpoints are intact.",
                        what,
                        attempt + 1,
                        _describe(error),
                    )
                    return False
                delay = self.backoff_s * 2**attempt
                log.warning("Hub: upload of %s failed (%s); retrying in %.0f s", what, _describe(error), delay)
                time.sleep(delay)
        return False


def is_hub_uri(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(URI_PREFIX)


def parse_uri(spec: str) -> tuple[str, str | None, str | None]:
    """hf://USER/REPO[/checkpoint-N][@revision] -> (repo id, checkpoint name or None, revision or None)."""
    body, _, revision = spec[len(URI_PREFIX) :].partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) not in (2, 3) or (len(parts) == 3 and not NAME.match(parts[2])):
        raise TrainError(
            f"'{spec}' is not a Hub checkpoint address: use hf://USER/REPO for the newest checkpoint, or "
            "hf://USER/REPO/checkpoint-<step>, optionally followed by @revision."
        )
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None), revision or None


def _hub_error(error: Exception, repo_id: str, revision: str | None) -> TrainError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403) and not isinstance(error, RepositoryNotFoundError):
        return TrainError(
            f"The Hub refused the token for {repo_id} (HTTP {status}): it is invalid or lacks access. Set a valid "
            "token with HF_TOKEN or `hf auth login`."
        )
    if isinstance(error, RevisionNotFoundError):
        return TrainError(f"The revision '{revision}' does not exist in the Hub repo {repo_id}.")
    if isinstance(error, RepositoryNotFoundError):
        return TrainError(
            f"The Hub repo {repo_id} was not found (or is private and the token cannot see it). Check the name "
            "and HF_TOKEN."
        )
    return TrainError(f"Could not reach the Hub repo {repo_id}: {_describe(error)}.")


def read_pointer(repo_id: str, revision: str | None) -> tuple[dict[str, Any], str]:
    """The repo's checkpoints.json and the commit it was read at (every later download pins that commit)."""
    api = HfApi()
    try:
        commit = api.repo_info(repo_id, revision=revision).sha
        path = api.hf_hub_download(repo_id, POINTER_FILE, revision=commit)
    except RemoteEntryNotFoundError:
        raise TrainError(f"The Hub repo {repo_id} holds no accel-train checkpoints (no {POINTER_FILE}).") from None
    except Exception as error:  # HTTP errors, and transport errors when the Hub cannot be reached
        raise _hub_error(error, repo_id, revision) from None
    return json.loads(Path(path).read_text()), commit


def latest_remote_step(repo_id: str, revision: str | None) -> int | None:
    """Step of the newest complete checkpoint on the Hub, None if the repo has none yet."""
    try:
        pointer, _ = read_pointer(repo_id, revision)
    except TrainError as error:
        log.info("No Hub checkpoint to resume from in %s (%s)", repo_id, error)
        return None
    latest = pointer.get("latest")
    return pointer["checkpoints"][latest]["step"] if latest else None


def _safe_relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(part in ("..", ".", "") for part in path.parts) or "\\" in name:
        raise TrainError(
            f"The Hub checkpoint lists a file named '{name}', which is not a plain relative path; refused."
        )
    return path


def fetch_checkpoint(spec: str, output_dir: Path) -> Path:
    """Download one Hub checkpoint into OUT/checkpoint-<step>, verifying every file against checkpoints.json.

    Only the files recorded for that checkpoint are fetched, each to its own name inside the folder; a file whose
    sha256 or size differs is named in the error and the download is discarded, never trained from.
    """
    repo_id, name, revision = parse_uri(spec)
    pointer, commit = read_pointer(repo_id, revision)
    name = name or pointer.get("latest")
    entry = pointer["checkpoints"].get(name) if name else None
    if entry is None:
        available = ", ".join(sorted(pointer["checkpoints"], key=lambda n: step_from_name(Path(n)))) or "none"
        raise TrainError(f"{repo_id} has no complete checkpoint named {name}. Complete checkpoints there: {available}.")
    final = output_dir / name
    if final.is_dir():
        raise TrainError(
            f"{final} already exists locally; resume from it (--resume_from_checkpoint {final}) or use another "
            "--output_dir for the Hub checkpoint."
        )
    staging = output_dir / f"{TMP_PREFIX}{step_from_name(Path(name))}.download"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    api = HfApi()
    log.info("Downloading %s from %s@%s ...", name, repo_id, commit[:8])
    try:
        for rel, expected in entry["files"].items():
            target = staging / _safe_relative(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            cached = api.hf_hub_download(repo_id, f"{name}/{rel}", revision=commit)
            shutil.copyfile(cached, target)
            if target.stat().st_size != expected["size"] or sha256(target) != expected["sha256"]:
                raise TrainError(
                    f"{name}/{rel} downloaded from {repo_id} does not match the sha256 recorded in {POINTER_FILE}: "
                    "the remote file is corrupted or was replaced. Not training from it."
                )
    except TrainError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise _hub_error(error, repo_id, revision) from None
    staging.rename(final)
    return final


MODEL_CARD = """
# {title}

A [LeRobot](https://github.com/huggingface/lerobot) `{policy_type}` policy trained with accel-train on
{datasets}, {steps} optimizer steps.

{how_to_load}
"""


def write_model_card(train_config: dict[str, Any], dest: Path) -> Path:
    """OUT/README.md with lerobot-style metadata (library, robotics/lerobot/policy-type tags, datasets, base
    model), so that the model's Hub page says what it is and what it came from."""
    policy_type = train_config["policy"]["type"]
    base = train_config.get("base_policy") or {}
    adapter = train_config.get("peft") is not None
    tags = ["robotics", "lerobot", policy_type, *(["peft", "lora"] if adapter else [])]
    data = ModelCardData(
        library_name="lerobot",
        pipeline_tag="robotics",
        tags=tags,
        datasets=dataset_ids(train_config),
        base_model=base.get("path") if base.get("commit") else None,  # a Hub repo id, not a local folder
    )
    if adapter:
        how_to_load = (
            f"A {train_config['peft']['method_type']} adapter on `{base.get('path')}`: lerobot's PEFT loading "
            "(`make_policy` with `pretrained_path` set to this repo) puts it on its base; `accel-train export "
            "CHECKPOINT DIR --merge` writes the merged policy."
        )
    else:
        how_to_load = "Load it with lerobot's `from_pretrained` (e.g. `ACTPolicy.from_pretrained(REPO)` for ACT)."
        if base.get("path"):
            how_to_load = f"Fine-tuned from `{base['path']}`. " + how_to_load
    card = ModelCard.from_template(
        data,
        template_str="---\n{{ card_data }}\n---\n" + MODEL_CARD,
        title=f"{policy_type} policy",
        policy_type=policy_type,
        datasets=", ".join(dataset_ids(train_config)),
        steps=train_config["steps"],
        how_to_load=how_to_load,
    )
    path = dest / "README.md"
    card.save(path)
    return path
