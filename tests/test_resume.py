"""Exact resume: N steps straight == K steps, stop, resume to N, bit for bit (lerobot-train 0.6.1 fails this).

ACT keeps its VAE and dropout on, image augmentation is on, and K = 13 lies in the second epoch (10 steps per
epoch), not on its boundary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import STRAIGHT_STEPS as N
from conftest import assert_ok, base_args, losses, run_cli
from safetensors.torch import load_file

K = 13
AUGMENT = ["--image_transforms.enable=true", "--save_freq", str(K)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(straight: Path, tiny_dataset: Path, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "run"
    args = [*AUGMENT, "--num_workers", str(workers), "--resume_from_checkpoint", "latest"]
    first = run_cli(base_args(tiny_dataset, out, "--steps", str(K), *args))  # `latest` with nothing: fresh start
    assert_ok(first)
    assert "Fresh start" in first.stderr
    assert (out / f"checkpoint-{K}").is_dir()

    second = run_cli(base_args(tiny_dataset, out, "--steps", str(N), *args))
    assert_ok(second)
    assert f"Resumed from {out / f'checkpoint-{K}'} at step {K} (epoch 1, sample 24)" in second.stderr

    expected = losses(straight)
    assert [step for step, _ in expected] == list(range(1, N + 1))
    assert losses(out) == expected  # every step, no duplicate or missing step after the resume
    for name in ("model.safetensors", "policy.safetensors"):
        ours, theirs = load_file(out / name), load_file(straight / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ours = torch.load(out / f"checkpoint-{N}" / "optimizer_state.pth", weights_only=True)
    theirs = torch.load(straight / f"checkpoint-{N}" / "optimizer_state.pth", weights_only=True)
    for key in theirs["state"]:
        assert all(torch.equal(ours["state"][key][s], theirs["state"][key][s]) for s in theirs["state"][key])
