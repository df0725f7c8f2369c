"""Scaling features on CPU: preemption signals, gradient accumulation, bf16, 2-process exactness."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    STRAIGHT_STEPS,
    TRAIN,
    assert_ok,
    base_args,
    free_port,
    losses,
    run_cli,
    same_weights,
    two_node_slurm,
)
from safetensors.torch import load_file

from accel_train import checkpoint as ckpt
from accel_train.train import main

# A port free now, not torchrun's default 29500, which another run on the machine may hold.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_the_rerun_finishes_identically(
    sig: signal.Signals, straight: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = base_args(tiny_dataset, out, "--steps", str(STRAIGHT_STEPS), "--image_transforms.enable=true",
                     "--save_freq", "100", "--resume_from_checkpoint", "latest")  # fmt: skip
    run = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert run.poll() is None
        time.sleep(0.05)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 75, stderr[-3000:]
    stopped = [p for _, p in ckpt.list_checkpoints(out)]
    assert len(stopped) == 1 and ckpt.verify(stopped[0]) is None  # the step it was in, not a save_freq multiple
    assert f"Stopped by {sig.name} after step {ckpt.step_from_name(stopped[0])}" in stderr.strip().splitlines()[-1]

    if sig == signal.SIGUSR1:
        return  # the same path as SIGTERM from here on, checked once below
    again = run_cli(args)  # the requeued job: the very same command
    assert_ok(again)
    assert f"Resumed from {stopped[0]}" in again.stderr
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")


def test_gradient_accumulation_matches_a_larger_batch(tiny_dataset: Path, tmp_path: Path) -> None:
    """Batch 4 x 2 micro-batches sees the same samples as batch 8, and its loss and update agree to float
    tolerance. Dropout and the VAE are off (their noise is drawn per micro-batch); chunks of one action, because
    ACT averages its loss over the non-padded actions of a batch, so micro-batches with different padding weigh
    differently (as ranks do under DDP); SGD, because Adam's first steps turn float-rounding differences of
    near-zero gradients into full +-lr updates."""
    quiet = ["--steps", "3", "--save_freq", "3", "--policy.dropout=0", "--policy.use_vae=false",
             "--policy.chunk_size=1", "--policy.n_action_steps=1",
             "--optimizer.type=sgd", "--optimizer.lr=0.01"]  # fmt: skip
    big, small = tmp_path / "big", tmp_path / "small"
    assert main(base_args(tiny_dataset, big, *quiet, "--batch_size", "8")) == 0
    assert main(base_args(tiny_dataset, small, *quiet, "--batch_size", "4", "--gradient_accumulation_steps", "2")) == 0
    for (_, a), (_, b) in zip(losses(big), losses(small), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    a, b = load_file(big / "model.safetensors"), load_file(small / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    state = json.loads((small / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["samples_seen"] == 24 and state["gradient_accumulation_steps"] == 2


def test_bf16_trains_on_cpu(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"  # in a process of its own: Accelerate keeps one precision per process
    assert_ok(run_cli(base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "2", "--mixed_precision", "bf16")))
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses(out))
    assert load_file(out / "policy.safetensors")["model.action_head.weight"].dtype == torch.float32  # fp32 master


def test_two_processes_resume_exactly_and_on_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    """torchrun with 2 processes (gloo): 6 steps straight == 5 steps + resume to 6, bit for bit. Then the
    step-5 checkpoint resumed by 1 process: same step and samples seen, the epoch's seen samples are not fed
    again, and a warning."""
    common = ["--batch_size", "4", "--save_freq", "5", "--num_workers", "0"]
    straight, resumed, single = tmp_path / "straight", tmp_path / "resumed", tmp_path / "single"
    first = run_cli(base_args(tiny_dataset, straight, "--steps", "6", *common), TORCHRUN)
    assert_ok(first)
    assert "Effective batch 8 = 4 per device x 2 processes" in first.stderr
    assert "WARNING" not in first.stderr and "Traceback" not in first.stderr
    assert [step for step, _ in losses(straight)] == list(range(1, 7))  # one record per step, from rank 0 only
    assert_ok(run_cli(base_args(tiny_dataset, resumed, "--steps", "5", *common), TORCHRUN))
    shutil.copytree(resumed, single)
    second = run_cli(base_args(tiny_dataset, resumed, "--steps", "6", *common, "--resume_from_checkpoint", "latest"),
                     TORCHRUN)  # fmt: skip
    assert_ok(second)
    assert "at step 5 (epoch 0, sample 40)" in second.stderr
    assert losses(resumed) == losses(straight)
    assert same_weights(resumed / "model.safetensors", straight / "model.safetensors")

    again = run_cli(base_args(tiny_dataset, single, "--steps", "7", *common, "--resume_from_checkpoint", "latest"))
    assert_ok(again)
    assert "num_processes (2 -> 1)" in again.stderr and "no longer bit-identical" in again.stderr
    assert "at step 5 (epoch 0, sample 40)" in again.stderr
    state = json.loads((single / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["samples_seen"] == 5 * 8 + 2 * 4 and state["data"] == {"epoch": 0, "sample": 48}
    assert state["num_processes"] == 1


def test_two_nodes_train_together_and_checkpoint_once(tiny_dataset: Path, tmp_path: Path) -> None:
    """Multi-node, simulated on one machine: two torchrun "nodes" of one process each, one rendezvous."""
    out, port = tmp_path / "out", free_port()
    args = base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "1", "--batch_size", "4")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(TRAIN),
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "2 processes" in errors[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["samples_seen"] == 2 * 4 * 2
    assert ckpt.verify(out / "checkpoint-2") is None and not list(out.glob(".tmp-*"))


def test_slurm_script_requeues_on_the_warning_signal(tiny_dataset: Path, tmp_path: Path) -> None:
    """launch/slurm_single_node.sbatch with 2 CPU processes: SIGUSR1 (SLURM's warning) -> checkpoint of the step
    in flight -> requeue; the requeued job (the same script) resumes from that checkpoint and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": "4242"}  # fmt: skip
    out = tmp_path / "out"
    script = [str(REPO / "launch" / "slurm_single_node.sbatch"), str(out),
              *base_args(tiny_dataset, out, "--steps", "8", "--save_freq", "100")]  # fmt: skip
    job = subprocess.Popen(["bash", *script], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)  # fmt: skip
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert job.poll() is None, job.stdout.read()[-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=300)
    assert requeued.read_text().split() == ["requeue", "4242"], log[-3000:]
    assert "Preempted after a checkpoint: requeueing job 4242" in log
    (stopped,) = [p for _, p in ckpt.list_checkpoints(out)]
    assert ckpt.verify(stopped) is None

    again = subprocess.run(["bash", *script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert requeued.read_text().count("requeue") == 1
    assert f"Resumed from {stopped}" in again.stdout + again.stderr


@pytest.mark.parametrize("command", ["multi_gpu.yaml", "bf16.yaml", "local_multi_gpu.sh", "slurm_multi_node.sbatch"])
def test_readme_scaling_out_commands(command: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """The README's Scaling-out commands, with 2 CPU processes (gloo) for 8 GPUs: each trains both processes and
    writes a verified checkpoint. (torchrun, several torchrun nodes and the single-node SLURM script: the tests
    above; the FSDP config and the multi-node script with it: tests/test_fsdp.py.)"""
    out = tmp_path / "out"
    args = base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "2", "--batch_size", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if command.endswith(".yaml"):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs" / "accelerate" / command), "--num_processes", "2", "--main_process_port",
                  str(free_port()), str(TRAIN)]  # fmt: skip
        result = subprocess.run([*launch, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    elif command == "local_multi_gpu.sh":  # it counts the GPUs with nvidia-smi: a stand-in lists 2
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: stand-in'\necho 'GPU 1: stand-in'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        script = [str(REPO / "launch" / command), str(out), *args]
        result = subprocess.run(["bash", *script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    else:
        script = [str(REPO / "launch" / command), str(out), *args]
        result = subprocess.run(["bash", *script], cwd=REPO, env=two_node_slurm(tmp_path), capture_output=True,
                                text=True, timeout=300)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Effective batch 8 = 4 per device x 2 processes" in log
    assert ("Precision: bf16" in log) == (command == "bf16.yaml")
    assert ckpt.verify(out / "checkpoint-2") is None
