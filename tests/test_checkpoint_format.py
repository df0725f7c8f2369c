"""Checkpoints of format 1 resume: those of commit 88cd8df, before trainer_state.json had a format_version.

tests/fixtures/checkpoint_format1/ holds checkpoint-2 and checkpoint-3 of a 3-step run of a tiny SmolVLA on the
tests' tiny dataset, exactly as that commit's trainer wrote them (tests/fixtures/make_format1_checkpoint.py, whose
docstring says how, and why SmolVLA rather than the demo's ACT). Today's trainer resumes its checkpoint-2:

    - to the same run whether it stops on the way or not (2 -> 4 == 2 -> 3 -> 4, bit for bit);
    - to the run the old trainer made: its checkpoint-3 matches the fixture's within a tolerance that allows
      another CPU's kernels (the fixture was written on another machine) but not a lost optimizer state,
      LR schedule step or data position;
    - at the next batch: the losses of steps 3 and 4 are logged.

A resume passes only what the checkpoint cannot know (the dataset's folder on this machine, where to write, how
far to train): the policy, seed, batch size and the rest come from its train_config.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_ok, losses, run_cli, same_weights
from safetensors.torch import load_file

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_format1"


def resume_args(dataset: Path, checkpoint: Path, steps: int) -> list[str]:
    return [
        "--resume_from_checkpoint", str(checkpoint),
        "--output_dir", str(checkpoint.parent),
        "--dataset_root", str(dataset),  # train_config.json names the generating machine's folder
        "--steps", str(steps),
        "--save_freq", "1",
        "--log_freq", "1",
        "--num_workers", "0",
    ]  # fmt: skip


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the policy's weights and of the optimizer's state, by a name that says where it is from."""
    found = {f"policy {name}": value for name, value in load_file(checkpoint / "policy.safetensors").items()}
    optimizer = torch.load(checkpoint / "optimizer_state.pth", map_location="cpu", weights_only=True)
    for index, state in optimizer["state"].items():
        found |= {f"optimizer state {index} {name}": torch.as_tensor(value) for name, value in state.items()}
    for index, group in enumerate(optimizer["param_groups"]):
        found[f"optimizer group {index} lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    return found


def assert_close_to(ours: Path, theirs: Path) -> None:
    """Every tensor within rtol 1e-5 and an atol of 1e-6 of the tensor's largest magnitude (Adam's second moments
    are mostly below 1e-6: an absolute atol of 1e-6 would pass them whatever they hold)."""
    mine, reference = tensors(ours), tensors(theirs)
    assert mine.keys() == reference.keys()
    for name, expected in reference.items():
        atol = 1e-6 * expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(mine[name], expected, rtol=1e-5, atol=atol, msg=lambda text, n=name: f"{n}: {text}")


@pytest.fixture(scope="module")
def resumed(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fixture's checkpoint-2 resumed to step 4 in one go (`straight`), and with a stop at step 3 (`stopped`),
    each from its own copy (nothing is written into the repository)."""
    straight, stopped = (tmp_path_factory.mktemp(name) for name in ("straight", "stopped"))
    for out in (straight, stopped):
        shutil.copytree(FIXTURE / "checkpoint-2", out / "checkpoint-2")
    result = run_cli(resume_args(tiny_dataset, straight / "checkpoint-2", 4))
    assert_ok(result)
    assert f"Resumed from {straight / 'checkpoint-2'} at step 2 (epoch 0, sample 16)" in result.stderr
    assert_ok(run_cli(resume_args(tiny_dataset, stopped / "checkpoint-2", 3)))
    assert_ok(run_cli(resume_args(tiny_dataset, stopped / "checkpoint-3", 4)))
    return straight, stopped


def test_format1_resume_stops_and_continues_bit_identically(resumed: tuple[Path, Path]) -> None:
    straight, stopped = resumed
    for step in (3, 4):
        ours, theirs = tensors(stopped / f"checkpoint-{step}"), tensors(straight / f"checkpoint-{step}")
        assert ours.keys() == theirs.keys()
        assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    weights = "checkpoint-4/policy.safetensors"
    assert same_weights(stopped / weights, straight / weights)


def test_format1_resume_continues_the_old_run(resumed: tuple[Path, Path]) -> None:
    """The step after the fixture's checkpoint-2, taken by today's trainer, is the one the old trainer took."""
    straight, stopped = resumed
    assert_close_to(stopped / "checkpoint-3", FIXTURE / "checkpoint-3")
    assert_close_to(straight / "checkpoint-3", FIXTURE / "checkpoint-3")


def test_format1_resume_continues_the_data(resumed: tuple[Path, Path]) -> None:
    straight, stopped = resumed
    assert [step for step, _ in losses(straight)] == [3, 4]
    assert losses(stopped) == losses(straight)
