"""FSDP checkpoints are consolidated: an FSDP checkpoint resumes without FSDP, and the reverse.

Runs torch's FSDP2 on CPU (gloo) with 2 processes; see tests/fsdp_worker.py for why not through Accelerate.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from accel_train import checkpoint as ckpt

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_worker(tmp_path: Path, processes: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]
    result = subprocess.run(command + [str(WORKER), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def plain_groups(optimizer_state: dict) -> list[dict]:
    """param_groups with tuples as lists: torch's set_optimizer_state_dict stores AdamW's betas as a list."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optimizer_state["param_groups"]]


def assert_same_state(a: Path, b: Path) -> None:
    weights_a, weights_b = load_file(a / ckpt.POLICY_FILE), load_file(b / ckpt.POLICY_FILE)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6, msg=name)
    optim_a, optim_b = ckpt.load_tensors(a / ckpt.OPTIMIZER_FILE), ckpt.load_tensors(b / ckpt.OPTIMIZER_FILE)
    assert plain_groups(optim_a) == plain_groups(optim_b)
    assert optim_a["state"].keys() == optim_b["state"].keys()
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, optim_b["state"][index][key], rtol=1e-5, atol=1e-6, msg=f"{index} {key}")


def test_fsdp_checkpoint_is_consolidated_and_resumes_either_way(tmp_path: Path) -> None:
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    run_worker(tmp_path, 2, "--shard", "--steps", "3", "--out", str(sharded))
    run_worker(tmp_path, 1, "--steps", "3", "--out", str(plain))
    assert sorted(p.name for p in sharded.iterdir()) == [ckpt.OPTIMIZER_FILE, ckpt.POLICY_FILE]
    assert_same_state(sharded, plain)  # 2-process FSDP state == one-process state, in the plain formats

    # Both directions continue like a plain resume: FSDP from a plain checkpoint, plain from an FSDP one.
    run_worker(tmp_path, 1, "--steps", "2", "--load", str(plain), "--out", str(tmp_path / "plain_then_plain"))
    run_worker(tmp_path, 2, "--shard", "--steps", "2", "--load", str(plain), "--out", str(tmp_path / "plain_then_fsdp"))
    run_worker(tmp_path, 1, "--steps", "2", "--load", str(sharded), "--out", str(tmp_path / "fsdp_then_plain"))
    assert_same_state(tmp_path / "plain_then_fsdp", tmp_path / "plain_then_plain")
    assert_same_state(tmp_path / "fsdp_then_plain", tmp_path / "plain_then_plain")
