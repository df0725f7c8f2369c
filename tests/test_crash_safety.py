"""Crash consistency: a failed write, pruning, and a chaos run killed with SIGKILL at random moments."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, STRAIGHT_STEPS, TRAIN, assert_ok, base_args, run_cli, same_weights
from hub_server import HubServer

from accel_train import checkpoint as ckpt
from accel_train import checkpoint_parts
from accel_train.train import main

# How the policy file is written: from the snapshot in the writer thread, or from the live policy in save().
POLICY_WRITER = {"true": "save_file", "false": "save_model"}


@pytest.mark.parametrize("asynchronous", ["true", "false"])
def test_disk_full_during_a_checkpoint_write(
    monkeypatch, capsys, tiny_dataset: Path, tmp_path: Path, asynchronous: str
) -> None:
    """The write of checkpoint-4 fails: a clear error, checkpoint-2 stays valid, and the run resumes from it.
    In the background, the failure stops the run at its next save."""
    out = tmp_path / "out"
    real_save = getattr(checkpoint_parts, POLICY_WRITER[asynchronous])
    calls = []

    def save_then_fail(model, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_parts, POLICY_WRITER[asynchronous], save_then_fail)
    flags = ["--steps", "6", "--save_freq", "2", f"--async_checkpoint={asynchronous}"]
    assert main(base_args(tiny_dataset, out, *flags)) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Writing checkpoint-4 failed ([Errno 28] No space left on device)" in message
    assert "checkpoint-2, is intact" in message and "--resume_from_checkpoint latest" in message
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert ckpt.verify(out / "checkpoint-2") is None and not list(out.glob(".tmp-*"))

    monkeypatch.setattr(checkpoint_parts, POLICY_WRITER[asynchronous], real_save)
    assert main(base_args(tiny_dataset, out, *flags, "--resume_from_checkpoint", "latest")) == 0
    assert "Resumed from" in capsys.readouterr().err and (out / "checkpoint-6").is_dir()


def test_a_checkpoint_written_in_the_background_holds_the_state_of_its_step(
    monkeypatch, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Training goes on while the writer thread serialises a checkpoint from its snapshot: each checkpoint
    must equal a synchronous save at the same step, tensor for tensor (policy, optimizer, scheduler). A slow
    disk (the write starts 1.5 s late, after 2 more optimizer steps) makes any tensor not copied show."""
    wait_copied = checkpoint_parts.TensorCopies.wait_copied

    def slow_write(self: checkpoint_parts.TensorCopies) -> None:
        time.sleep(0.75)  # each of the policy's and the optimizer's writers
        wait_copied(self)

    monkeypatch.setattr(checkpoint_parts.TensorCopies, "wait_copied", slow_write)
    for mode in ("true", "false"):
        flags = ["--steps", "6", "--save_freq", "2", f"--async_checkpoint={mode}"]
        assert main(base_args(tiny_dataset, tmp_path / mode, *flags)) == 0
    for step in (2, 4, 6):
        background, synchronous = (tmp_path / mode / f"checkpoint-{step}" for mode in ("true", "false"))
        assert sorted(p.name for p in background.iterdir()) == sorted(p.name for p in synchronous.iterdir())
        assert ckpt.verify(background) is None
        assert same_weights(background / ckpt.POLICY_FILE, synchronous / ckpt.POLICY_FILE), step
        ours, theirs = (ckpt.load_tensors(folder / ckpt.OPTIMIZER_FILE) for folder in (background, synchronous))
        assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
        for index, values in theirs["state"].items():
            assert all(torch.equal(ours["state"][index][key], value) for key, value in values.items()), (step, index)
        scheduler = ckpt.SCHEDULER_FILE
        if (synchronous / scheduler).exists():
            assert ckpt.load_tensors(background / scheduler) == ckpt.load_tensors(synchronous / scheduler)


class Tied(torch.nn.Module):
    """Weights tied under two names, as PaliGemma-based policies tie their embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_a_snapshot_writes_the_files_of_a_synchronous_save(tmp_path: Path) -> None:
    """The policy and optimizer parts, saved in the background: byte for byte the policy file save_model writes,
    tied weights included; optimizer state equal; and the policy part's load takes it, tying the weights again."""
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters())
    model.embed.weight.grad = torch.ones_like(model.embed.weight)
    optimizer.step()
    accelerator = SimpleNamespace(unwrap_model=lambda policy: policy, is_main_process=True, scaler=None)
    run = checkpoint_parts.RunState(
        accelerator, SimpleNamespace(policy=model, optimizer=SimpleNamespace(optimizer=optimizer)), {}, True, False
    )
    deferred = [checkpoint_parts.PolicyWeights(run).save(tmp_path), checkpoint_parts.OptimizerState(run).save(tmp_path)]
    taken = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():  # training goes on: the snapshot keeps the state it took
        model.embed.weight.add_(1)
    optimizer.step()
    for part in deferred:
        part.write()
    reference = Tied()
    reference.load_state_dict(taken)
    checkpoint_parts.save_model(reference, str(tmp_path / "reference.safetensors"))
    assert (tmp_path / ckpt.POLICY_FILE).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()

    written = ckpt.load_tensors(tmp_path / ckpt.OPTIMIZER_FILE)
    assert written["state"][0]["step"].item() == 1 and optimizer.state_dict()["state"][0]["step"].item() == 2

    fresh = Tied()
    checkpoint_parts.PolicyWeights(
        checkpoint_parts.RunState(accelerator, SimpleNamespace(policy=fresh), {}, True, False)
    ).load(tmp_path)
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.head.weight, reference.embed.weight)


def test_leftovers_of_a_crash_are_cleaned_and_never_taken(capsys, trained: Path, tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    (out / ".tmp-checkpoint-9").mkdir(parents=True)  # a write killed halfway
    (out / ".tmp-checkpoint-9" / "policy.safetensors").write_bytes(b"partial")
    assert (
        main(base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "2", "--resume_from_checkpoint", "latest"))
        == 0
    )
    err = capsys.readouterr().err
    assert "left by an interrupted checkpoint write" in err and "Fresh start" in err
    assert not (out / ".tmp-checkpoint-9").exists()


def test_latest_skips_a_corrupted_newest_checkpoint(capsys, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(base_args(tiny_dataset, out, "--steps", "4", "--save_freq", "2")) == 0
    weights = out / "checkpoint-4" / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    capsys.readouterr()
    assert main(base_args(tiny_dataset, out, "--steps", "5", "--resume_from_checkpoint", "latest")) == 0
    err = capsys.readouterr().err
    assert "Skipping" in err and "policy.safetensors does not match its sha256" in err
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in err
    code = main(
        base_args(tiny_dataset, tmp_path / "x", "--steps", "5", "--resume_from_checkpoint", str(out / "checkpoint-4"))
    )
    assert code == 1 and "checkpoint-4 is corrupted" in capsys.readouterr().err


def test_save_total_limit_keeps_the_newest_and_the_resumed_one(tiny_dataset: Path, trained: Path, tmp_path: Path):
    out = tmp_path / "out"
    resumed = ckpt.resolve(str(trained / "checkpoint-3"), trained)
    copy = out / "checkpoint-3"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(resumed), str(copy)], check=True)
    args = base_args(tiny_dataset, out, "--steps", "8", "--save_freq", "1", "--save_total_limit", "2")
    assert main([*args, "--resume_from_checkpoint", str(copy)]) == 0
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-7", "checkpoint-8"]


def run_and_kill(args: list[str], env: dict, metrics: Path, delay: float | None) -> tuple[int, str]:
    """Run the trainer; once it has trained a step, SIGKILL it `delay` seconds later (None: let it finish).

    With a step every ~0.5 s and a checkpoint (write, then upload) every 2 steps, the kill lands inside a step,
    a checkpoint write or an upload.
    """
    run = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    if delay is not None:
        logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        while run.poll() is None and (not metrics.is_file() or len(metrics.read_text().splitlines()) <= logged):
            time.sleep(0.02)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
    _, stderr = run.communicate(timeout=600)
    return run.returncode, stderr


def check_resumed_from_newest_valid(stderr: str, valid_before: list[int]) -> None:
    """The restart took the newest checkpoint that verified, never a half-written or corrupted one."""
    resumed = re.findall(r"Resumed from \S+checkpoint-(\d+) at step", stderr)
    if resumed:
        assert int(resumed[0]) == max(valid_before), (resumed, valid_before)
    elif "Fresh start" in stderr:
        assert not valid_before


@dataclass(frozen=True)
class Kills:
    """`count` kills, each up to `max_delay` seconds after the run trains a step (drawn with `seed`): long enough
    to get past a checkpoint now and then, short enough that the run is not finished before the last kill."""

    count: int
    seed: int
    max_delay: float


def chaos(tiny_dataset: Path, reference: Path, steps: int, tmp_path: Path, kills: Kills, *extra: str) -> None:
    """Kill, restart with `latest`, repeat; then finish: the result must be the uninterrupted run's, bit for bit."""
    rng, max_delay = random.Random(kills.seed), kills.max_delay
    out = tmp_path / "out"
    args = base_args(
        tiny_dataset, out, "--steps", str(steps), "--image_transforms.enable=true", "--save_freq", "2",
        "--resume_from_checkpoint", "latest", "--push_to_hub=true", "--hub_repo_id", "test-user/chaos", *extra,
    )  # fmt: skip
    with HubServer() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "home")}
        logs = []
        for _ in range(kills.count):
            valid_before = [s for s, p in ckpt.list_checkpoints(out) if ckpt.verify(p) is None]
            code, stderr = run_and_kill(args, env, out / "metrics.jsonl", delay=rng.uniform(0.0, max_delay))
            logs.append(stderr)
            check_resumed_from_newest_valid(stderr, valid_before)
            assert code == -signal.SIGKILL, f"the run ended with {code} before its kill: {stderr[-2000:]}"
        valid_before = [s for s, p in ckpt.list_checkpoints(out) if ckpt.verify(p) is None]
        code, stderr = run_and_kill(args, env, out / "metrics.jsonl", delay=None)
        logs.append(stderr)
        assert code == 0, stderr[-3000:]
        check_resumed_from_newest_valid(stderr, valid_before)
        assert same_weights(out / "model.safetensors", reference / "model.safetensors")
        assert all(ckpt.verify(p) is None for _, p in ckpt.list_checkpoints(out))
        secret = hub.token.encode()  # the token is in no output: checkpoints, configs, metrics, logs, cache
        for path in [*out.rglob("*"), *(tmp_path / "home").rglob("*")]:
            assert not (path.is_file() and secret in path.read_bytes()), path
        assert not any(hub.token in text for text in logs)
        resumes = [re.findall(r"Resumed from \S+checkpoint-(\d+)", text) for text in logs]
        print(
            f"chaos: {kills.count} kills, {sum(map(len, resumes))} resumes "
            f"at steps {[int(r[0]) for r in resumes if r]}, "
            f"{sum(t.count('Skipping') for t in logs)} corrupted checkpoints skipped, "
            f"{sum(t.count('left by an interrupted checkpoint write') for t in logs)} partial writes cleaned, "
            "final weights bit-identical to the uninterrupted run"
        )


def test_chaos(tiny_dataset: Path, straight: Path, tmp_path: Path) -> None:
    chaos(tiny_dataset, straight, STRAIGHT_STEPS, tmp_path, Kills(count=5, seed=0, max_delay=1.5))


def test_chaos_sharded(tiny_dataset: Path, straight: Path, tmp_path: Path) -> None:
    """The same with sharded checkpoints: kills land in their background writes too (the reference is consolidated:
    a sharded run trains the same weights)."""
    chaos(tiny_dataset, straight, STRAIGHT_STEPS, tmp_path, Kills(count=3, seed=2, max_delay=1.5),
          "--checkpoint_format", "sharded")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 50 kills and restarts: more than the 10 minutes of a stuck test
def test_chaos_long(tiny_dataset: Path, tmp_path: Path) -> None:
    """50 kills over an 80-step run (its own uninterrupted reference), so they spread over many checkpoints."""
    reference = tmp_path / "reference"
    assert_ok(run_cli(base_args(tiny_dataset, reference, "--steps", "80", "--image_transforms.enable=true")))
    chaos(tiny_dataset, reference, 80, tmp_path, Kills(count=50, seed=1, max_delay=1.0))
