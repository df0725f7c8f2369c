"""pi0 at its real size (4B parameters) on one GPU with --checkpoint_format sharded: a sharded checkpoint saved and
resumed, and how long a save blocks training in each format (scripts/gpu_check.sh reports it). Skipped without CUDA.

Sized to the GPU check's budget (8 minutes on an H200 for all of it) and disk (64 GiB): bf16 weights
(`--policy.dtype=bfloat16`, 8 GB) and the action expert trained alone (`--policy.train_expert_only`, lerobot's
option: AdamW state for the 0.3B parameters that get a gradient, 1.3 GB), so a checkpoint holds about 9.5 GB. Full
fine-tuning in fp32 writes 42 GB a checkpoint (16 GB of weights, 26 GB of AdamW state): two of them do not fit the
disk, and each takes about a minute or more to write and hash. Two runs, timed by benchmarks/checkpoint_formats.py's
`--timed` launcher (benchmarks/fsdp.py's worker): 2 steps saving sharded checkpoints 1 and 2; then its checkpoint-1
resumed to step 3, saving consolidated checkpoints 2 and 3. The first save of a run allocates the pinned CPU buffers
the next ones reuse; with a save every step, the second waits for the first's background write (reported apart).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_ok, losses, run_cli
from test_pi import pi_args, pi_tokenizers  # noqa: F401 (a fixture)

from accel_train import checkpoint as ckpt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="pi0 has 4B parameters: a GPU check"),
]
TIMED = REPO / "benchmarks" / "checkpoint_formats.py"
GPU = ["--policy.type", "pi0", "--policy.dtype=bfloat16", "--policy.train_expert_only=true",
       "--policy.gradient_checkpointing=true", "--num_workers", "2", "--save_freq", "1"]  # fmt: skip


def timed_run(args: list[str], results: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The trainer with every save timed: (the run, its saves: step, seconds blocked, of which wait_s waiting)."""
    results.mkdir()
    result = run_cli(args, [sys.executable, str(TIMED), "--timed", str(results)], env=env, timeout=600)
    assert_ok(result)
    return result, json.loads((results / "rank0.json").read_text())["saves"]


def gigabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def blocked(saves: list[dict]) -> str:
    return ", ".join(f"{s['s']:.2f} s (waiting {s.get('wait_s', 0.0):.2f} s)" for s in saves)


def test_pi0_sharded_save_and_resume(pi_tokenizers: dict, tiny_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    sharded, resumed = tmp_path / "sharded", tmp_path / "resumed"
    args = pi_args(tiny_dataset, sharded, *GPU, "--steps", "2", "--checkpoint_format", "sharded")
    _, sharded_saves = timed_run(args, tmp_path / "sharded-times", pi_tokenizers)
    assert ckpt.is_sharded(sharded / "checkpoint-1") and ckpt.verify(sharded / "checkpoint-1") is None
    size = gigabytes(sharded / "checkpoint-2")
    shutil.rmtree(sharded / "checkpoint-2")  # the disk: checkpoint-1 is the one resumed
    resume = ["--steps", "3", "--checkpoint_format", "consolidated", "--resume_from_checkpoint",
              str(sharded / "checkpoint-1")]  # fmt: skip
    args = pi_args(tiny_dataset, resumed, *GPU, *resume)
    result, consolidated_saves = timed_run(args, tmp_path / "consolidated-times", pi_tokenizers)
    assert "Resumed from" in result.stderr and [s for s, _ in losses(resumed)] == [2, 3]
    assert not ckpt.is_sharded(resumed / "checkpoint-3") and ckpt.verify(resumed / "checkpoint-3") is None
    assert all(math.isfinite(loss) for _, loss in losses(sharded) + losses(resumed))
    gap = abs(losses(resumed)[0][1] - losses(sharded)[1][1])  # step 2 straight vs resumed (GPU kernels may differ)
    print(
        f"pi0 sharded checkpoint (bf16, action expert trained): sharded saves blocked {blocked(sharded_saves)}, "
        f"{size:.1f} GB a checkpoint; consolidated saves blocked {blocked(consolidated_saves)}, "
        f"{gigabytes(resumed / 'checkpoint-3'):.1f} GB; resumed from sharded checkpoint-1, step 2 loss gap {gap:.3g}"
    )
