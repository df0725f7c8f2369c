"""The embedded demo dataset: lerobot's own format, deterministic for a seed, and learnable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accel_train import demo_dataset


def load(root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(demo_dataset.REPO_ID, root=root, video_backend="pyav")


def test_layout_and_features(tiny_dataset: Path) -> None:
    dataset = load(tiny_dataset)
    assert dataset.meta.fps == 10 and dataset.num_episodes == 2 and dataset.num_frames == 80
    assert dataset.meta.camera_keys == [f"observation.images.{c}" for c in ("front", "right", "gripper")]
    frame = dataset[5]
    assert frame["observation.state"].shape == (7,) and frame["action"].shape == (7,)
    assert frame["observation.images.front"].shape == (3, 64, 64)
    assert frame["task"] == "Pick and place the cube into the container"


def test_action_is_the_next_joint_target(tiny_dataset: Path) -> None:
    dataset = load(tiny_dataset)
    for i in range(demo_dataset.FRAMES_PER_EPISODE - 1):
        assert torch.equal(dataset[i]["action"], dataset[i + 1]["observation.state"])


def test_same_seed_same_data(tiny_dataset: Path, tmp_path: Path) -> None:
    again, other = load(demo_dataset.create(tmp_path / "a", episodes=2, seed=0)), load(tiny_dataset)
    for i in (0, 17, 79):
        for key in ("observation.state", "action", "observation.images.front", "observation.images.gripper"):
            assert torch.equal(again[i][key], other[i][key]), key
    different = load(demo_dataset.create(tmp_path / "b", episodes=1, seed=1))
    assert not torch.equal(different[0]["observation.state"], other[0]["observation.state"])


def test_the_cube_is_visible_where_the_target_is(tiny_dataset: Path) -> None:
    """The target pose depends on the cube, and the cube is drawn in the front camera: there is signal to learn."""
    dataset = load(tiny_dataset)
    image = dataset[0]["observation.images.front"].float()  # C,H,W in [0, 1]
    red = (image[0] > 0.6) & (image[1] < 0.4) & (image[2] < 0.4)
    assert red.sum() > 10
    assert not np.allclose(dataset[0]["action"].numpy(), dataset[40]["action"].numpy())


def test_refuses_to_overwrite(tiny_dataset: Path) -> None:
    with pytest.raises(FileExistsError):
        demo_dataset.create(tiny_dataset)
    assert demo_dataset.main(["--root", str(tiny_dataset)]) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="SVT-AV1 takes real-time priority as root")
def test_encoding_leaves_the_scheduling_as_it_was(tmp_path: Path) -> None:
    """As root, the AV1 encoder switched the creating process to SCHED_FIFO 99, and the trainer processes started
    after it inherited that: in CI a trainer and wandb's service then busy-waited both cores and hung the suite."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    demo_dataset.create(tmp_path / "d", episodes=1, seed=0)
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before
    child = [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"]
    assert subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip() == str(before[0])
