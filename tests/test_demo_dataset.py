"""The embedded demo dataset: lerobot's own format, deterministic for a seed, and learnable."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_ok, base_args, losses, run_cli, same_weights

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


# Variants like real Piper datasets. `variant`: image features, 2 tasks, 15 fps, 2 cameras at a 480x640-like
# 48x64 (80 frames: 10 steps an epoch at batch 8). `one_camera`: a single camera of another name, as VQ-BeT
# needs, 16 frames an episode (32 frames: 4 steps an epoch), written by the command line.
VARIANT = {"image_size": (48, 64), "cameras": ("front", "gripper"), "tasks": 2, "fps": 15, "images": True}
ONE_CAMERA = ["--episodes", "2", "--cameras", "top", "--image_size", "48x64", "--frames", "16"]


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_dataset.create(tmp_path_factory.mktemp("variant") / "piper", episodes=2, seed=0, **VARIANT)


@pytest.fixture(scope="module")
def one_camera(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("one_camera") / "piper"
    command = [sys.executable, "-m", "accel_train.demo_dataset", "--root", str(root), *ONE_CAMERA]
    return root, subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_variant_loads_with_lerobot(variant: Path) -> None:
    dataset = load(variant)
    assert dataset.meta.fps == 15 and dataset.num_episodes == 2 and dataset.num_frames == 80
    assert dataset.meta.camera_keys == ["observation.images.front", "observation.images.gripper"]
    assert dataset.meta.video_keys == [] and dataset.meta.image_keys == dataset.meta.camera_keys
    assert not (variant / "videos").exists()
    frame = dataset[41]
    assert frame["observation.images.front"].shape == (3, 48, 64)
    assert frame["timestamp"].item() == pytest.approx(1 / 15)
    assert list(dataset.meta.tasks.index) == [demo_dataset.TASKS[0][0], demo_dataset.TASKS[1][0]]
    assert [dataset[i]["task"] for i in (0, 39, 40, 79)] == [demo_dataset.TASKS[i // 40][0] for i in (0, 39, 40, 79)]


def test_each_task_has_its_own_container(variant: Path) -> None:
    """Episode 1 carries the cube to task 1's green container, drawn where it stands: still learnable."""
    dataset = load(variant)
    _, (x, y), colour = demo_dataset.TASKS[1]
    image = (dataset[40]["observation.images.front"] * 255).round()  # C,H,W
    _, height, width = image.shape
    assert image[:, int(y * (height - 1)), int(x * (width - 1))].tolist() == list(colour)
    last = [dataset[i]["observation.state"][:6].numpy() for i in (39, 79)]
    np.testing.assert_allclose(last[1], demo_dataset.joints_for(np.array((x, y))), atol=0.05)
    assert not np.allclose(last[0], last[1], atol=0.05)


def test_one_camera_from_the_command_line(one_camera: tuple[Path, subprocess.CompletedProcess]) -> None:
    """The command prints its own summary, not FFmpeg's, lerobot's and the `datasets` bars' ~60 lines."""
    root, result = one_camera
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert len(output.splitlines()) <= 3, output
    assert "moov atom" not in output and "Map" not in output and "Using video codec" not in output
    assert f"Wrote local/piper_demo to {root}: 2 episodes, 32 frames at 10 fps" in output
    dataset = load(root)
    assert dataset.meta.camera_keys == dataset.meta.video_keys == ["observation.images.top"]
    assert dataset.meta.features["observation.images.top"]["dtype"] == "video"
    assert dataset[25]["observation.images.top"].shape == (3, 48, 64) and dataset[25]["episode_index"] == 1


def test_writing_leaves_logging_as_it_was(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Silenced while writing, every setting is put back after: FFmpeg's level, the `datasets` bars, loggers."""
    import av.logging
    from datasets.utils import are_progress_bars_disabled

    lerobot_logger = logging.getLogger("lerobot")
    before = demo_dataset.libav_level(), lerobot_logger.level
    av.logging.set_libav_level(av.logging.VERBOSE)
    lerobot_logger.setLevel(logging.DEBUG)
    try:
        demo_dataset.create(tmp_path / "d", episodes=2, cameras=("front",), image_size=(8, 32), frames=4)
        assert demo_dataset.libav_level() == av.logging.VERBOSE
        assert lerobot_logger.level == logging.DEBUG
    finally:
        av.logging.set_libav_level(before[0])
        lerobot_logger.setLevel(before[1])
    assert not are_progress_bars_disabled()
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tasks", "5"], "tasks must be 1 to 4"),
        (["--cameras", "front,front"], "cameras must be one or more distinct names"),
        (["--cameras", "a.b"], "without dots or slashes"),
        (["--image_size", "480"], "expected HEIGHTxWIDTH"),
        (["--image_size", "64x24"], "width at least 32"),
        (["--frames", "2", "--episodes", "0"], "episodes must be at least 1; frames must be at least 4"),
    ],
)
def test_bad_options(options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo_dataset.main(["--root", str(tmp_path / "d"), *options])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def trains_and_resumes(dataset: Path, tmp_path: Path, steps: int, resume_at: int, *extra: str) -> None:
    """`steps` straight == resumed from that run's checkpoint at `resume_at`, into a fresh output dir: same
    losses after the resume, same final weights. Both runs take the `extra` flags (flags override a resumed
    run's saved configuration, and base_args gives one batch size)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_cli(base_args(dataset, straight, "--steps", str(steps), "--save_freq", str(resume_at), *extra)))
    checkpoint = straight / f"checkpoint-{resume_at}"
    result = run_cli(
        base_args(dataset, resumed, "--steps", str(steps), "--resume_from_checkpoint", str(checkpoint), *extra)
    )
    assert_ok(result)
    assert f"at step {resume_at}" in result.stderr
    assert losses(resumed) == losses(straight)[resume_at:] and len(losses(straight)) == steps
    assert same_weights(straight / "model.safetensors", resumed / "model.safetensors")


def test_variant_trains_and_resumes_exactly(variant: Path, tmp_path: Path) -> None:
    trains_and_resumes(variant, tmp_path, 4, 2, "--image_transforms.enable=true")


def test_one_camera_trains_and_resumes_exactly(one_camera: tuple[Path, subprocess.CompletedProcess], tmp_path: Path):
    trains_and_resumes(one_camera[0], tmp_path, 6, 5)  # the resume lies in the second epoch


@pytest.mark.slow
def test_camera_sized_variant_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """Three 480x640 cameras, as the real Piper dataset's (pytest -m slow: minutes of CPU for a few steps)."""
    root = demo_dataset.create(tmp_path / "piper", episodes=2, image_size=(480, 640), frames=8)
    dataset = load(root)
    assert [dataset[9][key].shape for key in dataset.meta.video_keys] == [(3, 480, 640)] * 3
    trains_and_resumes(root, tmp_path, 3, 2, "--batch_size", "2")
