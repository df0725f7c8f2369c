"""--checkpoint_format sharded through the trainer: every process writes its part, the checkpoint resumes exactly on
the same number of processes and closely on another, into either format, with FSDP or without; its shards are
verified, exported to the documented files, pushed to the Hub and resumed from it. (The format itself, its
resharding and export tensor by tensor: tests/test_sharded_checkpoint.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import REPO, assert_ok, base_args, free_port, losses, run_cli, same_weights
from hub_server import HubServer
from test_fsdp import fsdp

from accel_train import checkpoint as ckpt
from accel_train import sharded_checkpoint
from accel_train.sharded_checkpoint import SHARD_INDEX_FILE
from accel_train.train import main

RUN = ["--save_freq", "2", "--batch_size", "4"]
STEPS = ["--steps", "4", *RUN]
SHARDED = ["--checkpoint_format", "sharded"]


def torchrun(processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]  # fmt: skip


@dataclass(frozen=True)
class Runs:
    sharded: Path  # 2 processes (DDP), sharded checkpoints 2 and 4
    consolidated: Path  # the same run, consolidated checkpoints


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("formats")
    for name, extra in (("sharded", SHARDED), ("consolidated", [])):
        assert_ok(run_cli(base_args(tiny_dataset, root / name, *STEPS, *extra), torchrun()))
    return Runs(root / "sharded", root / "consolidated")


def resume(tiny_dataset: Path, checkpoint: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> str:
    """Copy `checkpoint` into `out` and resume it there to step 4; the run's log."""
    shutil.copytree(checkpoint, out / checkpoint.name)
    result = run_cli(base_args(tiny_dataset, out, *STEPS, "--resume_from_checkpoint", "latest", *extra), launcher)
    assert_ok(result)
    return result.stderr


def same_optimizer(a: Path, b: Path) -> bool:
    ours, theirs = ckpt.load_tensors(a), ckpt.load_tensors(b)
    return ours["param_groups"] == theirs["param_groups"] and all(
        ours["state"][i].keys() == values.keys() and all(torch.equal(ours["state"][i][k], v) for k, v in values.items())
        for i, values in theirs["state"].items()
    )


def tensor_bytes(path: Path) -> int:
    with safetensors.safe_open(path, "pt") as file:
        return sum(file.get_tensor(name).nbytes for name in file.keys())  # noqa: SIM118 (not a mapping)


def test_every_process_writes_its_shard_and_the_export_is_the_consolidated_checkpoint(
    runs: Runs, tiny_dataset: Path, tmp_path: Path
) -> None:
    checkpoint = runs.sharded / "checkpoint-4"
    shards = sorted(p.name for p in (checkpoint / ckpt.SHARDS_DIR).iterdir())
    assert len(shards) == 3 and SHARD_INDEX_FILE in shards  # one file per process, and the index
    assert not (checkpoint / ckpt.POLICY_FILE).exists() and not (checkpoint / ckpt.OPTIMIZER_FILE).exists()
    manifest = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())["files"]
    assert {f"{ckpt.SHARDS_DIR}/{name}" for name in shards} <= manifest.keys()
    sizes = [manifest[f"{ckpt.SHARDS_DIR}/{n}"]["size"] for n in shards if n != SHARD_INDEX_FILE]
    assert max(sizes) < 0.6 * sum(sizes), sizes  # each process wrote about half

    # What each process wrote is what `accel-train plan` says it writes, to the byte (tensor bytes, no headers).
    command = ["plan", *base_args(tiny_dataset, tmp_path, *STEPS), "--num_processes", "2", "--json"]
    plan = subprocess.run([sys.executable, "-m", "accel_train.cli", *command], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert_ok(plan)
    planned = json.loads(plan.stdout)["checkpoint_bytes"]["sharded"]
    written = [tensor_bytes(checkpoint / ckpt.SHARDS_DIR / name) for name in shards if name != SHARD_INDEX_FILE]
    assert written == [planned["main_process"], planned["other_processes"]]

    exported = tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "accel_train.cli", "export", str(checkpoint), str(exported)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_ok(result)
    reference = runs.consolidated / "checkpoint-4"
    assert same_weights(exported / ckpt.POLICY_FILE, reference / ckpt.POLICY_FILE)
    assert same_optimizer(exported / ckpt.OPTIMIZER_FILE, reference / ckpt.OPTIMIZER_FILE)
    assert same_weights(exported / ckpt.PRETRAINED_WEIGHTS, reference / ckpt.POLICY_FILE)  # lerobot's name too
    # The final model of a sharded run is the consolidated run's, in lerobot's format.
    assert same_weights(runs.sharded / ckpt.PRETRAINED_WEIGHTS, runs.consolidated / ckpt.PRETRAINED_WEIGHTS)
    assert losses(runs.sharded) == losses(runs.consolidated)


def test_resume_is_exact_on_the_same_processes_in_either_format(runs: Runs, tiny_dataset: Path, tmp_path: Path):
    """2 processes: sharded -> sharded, consolidated -> sharded and sharded -> consolidated all continue bit for bit."""
    cases = {
        "sharded": (runs.sharded, SHARDED),
        "into-sharded": (runs.consolidated, SHARDED),
        "into-consolidated": (runs.sharded, ["--checkpoint_format", "consolidated"]),
    }
    for name, (run, extra) in cases.items():
        out = tmp_path / name
        log = resume(tiny_dataset, run / "checkpoint-2", out, *extra, launcher=torchrun())
        assert "at step 2 (epoch 0, sample 16)" in log and "no longer bit-identical" not in log, name
        assert same_weights(out / ckpt.PRETRAINED_WEIGHTS, runs.sharded / ckpt.PRETRAINED_WEIGHTS), name
        assert losses(out)[-2:] == losses(runs.sharded)[-2:], name
        assert ckpt.is_sharded(out / "checkpoint-4") == (extra == SHARDED), name


def test_a_sharded_checkpoint_resumes_on_one_three_and_two_processes(runs: Runs, tiny_dataset: Path, tmp_path: Path):
    for processes in (1, 3):
        out = tmp_path / str(processes)
        launcher = torchrun(processes) if processes > 1 else None
        log = resume(tiny_dataset, runs.sharded / "checkpoint-2", out, *SHARDED, launcher=launcher)
        assert f"num_processes (2 -> {processes})" in log and "at step 2 (epoch 0, sample 16)" in log
        shards = list((out / "checkpoint-4" / ckpt.SHARDS_DIR).glob("shard-*"))
        assert len(shards) == processes and ckpt.verify(out / "checkpoint-4") is None
        state = json.loads((out / "checkpoint-4" / ckpt.STATE_FILE).read_text())
        assert state["num_processes"] == processes and state["samples_seen"] == 16 + 2 * 4 * processes
    # 1 -> 2: the single process's checkpoint, one shard, resumed by two.
    result = run_cli(base_args(tiny_dataset, tmp_path / "1", *RUN, "--steps", "5", "--resume_from_checkpoint",
                               "latest", *SHARDED), torchrun())  # fmt: skip
    assert_ok(result)
    assert "num_processes (1 -> 2)" in result.stderr and "at step 4 (epoch 0, sample 24)" in result.stderr
    assert len(list((tmp_path / "1" / "checkpoint-5" / ckpt.SHARDS_DIR).glob("shard-*"))) == 2


def test_fsdp_sharded_checkpoints_resume_exactly_and_without_fsdp(tiny_dataset: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert_ok(run_cli(base_args(tiny_dataset, straight, *STEPS, *SHARDED), fsdp()))
    again = resume(tiny_dataset, straight / "checkpoint-2", tmp_path / "again", *SHARDED, launcher=fsdp())
    assert "FSDP: " in again and "no longer bit-identical" not in again
    assert same_weights(tmp_path / "again" / ckpt.PRETRAINED_WEIGHTS, straight / ckpt.PRETRAINED_WEIGHTS)
    single = resume(tiny_dataset, straight / "checkpoint-2", tmp_path / "single", "--checkpoint_format=consolidated")
    assert "num_processes (2 -> 1)" in single and "FSDP: " not in single
    assert (tmp_path / "single" / "checkpoint-4" / ckpt.POLICY_FILE).is_file()


def test_a_missing_or_truncated_shard_is_found_and_the_previous_checkpoint_taken(
    runs: Runs, capsys, tiny_dataset: Path, tmp_path: Path
) -> None:
    for damage in ("missing", "truncated"):
        out = tmp_path / damage
        shutil.copytree(runs.sharded, out, ignore=shutil.ignore_patterns("checkpoint-4"))
        shutil.copytree(runs.sharded / "checkpoint-4", out / "checkpoint-4")
        shard = sorted((out / "checkpoint-4" / ckpt.SHARDS_DIR).glob("shard-*"))[1]
        if damage == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:1000])
        explicit = ["--resume_from_checkpoint", str(out / "checkpoint-4")]
        assert main(base_args(tiny_dataset, out, *RUN, "--steps", "5", *explicit)) != 0
        error = capsys.readouterr().err
        assert f"{ckpt.SHARDS_DIR}/{shard.name}" in error and "checkpoint-2 (the newest complete one" in error
        assert main(base_args(tiny_dataset, out, *RUN, "--steps", "5", "--resume_from_checkpoint", "latest")) == 0
        log = capsys.readouterr().err
        assert "Skipping" in log and "checkpoint-4" in log and "Resumed from" in log and "checkpoint-2 at step 2" in log


def test_a_checkpoint_format_this_version_does_not_know_is_refused(
    runs: Runs, capsys, tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs.consolidated / "checkpoint-4", out / "checkpoint-4")
    state = json.loads((out / "checkpoint-4" / ckpt.STATE_FILE).read_text())
    assert state["format_version"] == ckpt.FORMAT_VERSION
    (out / "checkpoint-4" / ckpt.STATE_FILE).write_text(json.dumps({**state, "format_version": 99}))
    ckpt.write_manifest(out / "checkpoint-4")  # as a newer accel-train would have written it
    before = sorted(p.name for p in out.iterdir())
    assert main(base_args(tiny_dataset, out, *RUN, "--steps", "6", "--resume_from_checkpoint", "latest")) != 0
    error = capsys.readouterr().err
    assert "checkpoint format 99" in error and "reads formats 1, 2" in error and "Traceback" not in error
    assert sorted(p.name for p in out.iterdir()) == before


def test_sharded_checkpoints_are_pushed_and_resumed_from_the_hub(tiny_dataset: Path, tmp_path: Path) -> None:
    repo = "test-user/sharded"
    with HubServer() as hub:
        push = ["--push_to_hub=true", "--hub_repo_id", repo]
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "home-a")}
        assert_ok(run_cli(base_args(tiny_dataset, tmp_path / "a", *STEPS, *SHARDED, *push), env=env_with(env)))
        pushed = hub.files(repo)
        assert any(name.startswith(f"checkpoint-2/{ckpt.SHARDS_DIR}/shard-") for name in pushed)
        # Another machine: its own cache and output dir, the checkpoint from the Hub.
        env["HF_HOME"] = str(tmp_path / "home-b")
        spec = ["--resume_from_checkpoint", f"hf://{repo}/checkpoint-2"]
        result = run_cli(base_args(tiny_dataset, tmp_path / "b", *STEPS, *SHARDED, *spec), env=env_with(env))
        assert_ok(result)
        assert "at step 2 " in result.stderr and ckpt.is_sharded(tmp_path / "b" / "checkpoint-2")
        assert same_weights(tmp_path / "b" / ckpt.PRETRAINED_WEIGHTS, tmp_path / "a" / ckpt.PRETRAINED_WEIGHTS)


def env_with(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def test_disk_full_during_a_sharded_write_stops_the_run_and_keeps_the_previous_checkpoint(
    monkeypatch, capsys, tiny_dataset: Path, tmp_path: Path
) -> None:
    """torch reports a failed shard write as a CheckpointException, which is no Exception: it must still stop the
    run with the disk's own error, remove the partial folder and leave checkpoint-2 to resume from."""
    real_write, calls = sharded_checkpoint._write_safetensors, []

    def write_then_fail(path: Path, *args, **kwargs) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(sharded_checkpoint, "_write_safetensors", write_then_fail)
    out = tmp_path / "out"
    assert main(base_args(tiny_dataset, out, *RUN, "--steps", "6", *SHARDED)) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Writing checkpoint-4 failed ([Errno 28] No space left on device)" in message
    assert "checkpoint-2, is intact" in message
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-2"] and not list(out.glob(".tmp-*"))
    monkeypatch.setattr(sharded_checkpoint, "_write_safetensors", real_write)
    assert main(base_args(tiny_dataset, out, *RUN, "--steps", "6", *SHARDED, "--resume_from_checkpoint", "latest")) == 0
