"""A small synthetic Piper-like LeRobot dataset, so a newcomer can train without the Hub.

The arm has 6 joints and a gripper (7 values, like `ISdept/piper_arm`). In every episode a cube sits at a
random spot on the table; the arm moves smoothly towards a joint pose that depends on the cube's position,
closes the gripper, carries the cube to a fixed container and opens the gripper. The cube is drawn in all
three cameras (and the gripper camera also sees the arm's position), so the next joint target (`action`) is
a function of what the policy observes: there is something real to learn.

    python -m accel_train.demo_dataset --root DIR [--episodes N] [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ID = "local/piper_demo"
TASK = "Pick and place the cube into the container"
FPS = 10
FRAMES_PER_EPISODE = 40
IMAGE_SHAPE = (64, 64, 3)
CAMERAS = ("front", "right", "gripper")
JOINT_NAMES = [f"joint_{i}" for i in range(1, 7)] + ["gripper"]

# Joint pose as a fixed smooth function of a table position (x, y) in [0, 1]^2: a stand-in for the arm's
# inverse kinematics. Rows: joints 1..6; columns: x, y, x*y, bias.
_IK = np.array(
    [
        [1.2, -0.4, 0.3, -0.4],
        [0.5, 0.9, -0.2, 0.3],
        [-0.7, 0.6, 0.4, 0.1],
        [0.3, -0.8, 0.5, 0.0],
        [0.9, 0.2, -0.6, -0.2],
        [-0.3, 0.4, 0.8, 0.2],
    ],
    dtype=np.float64,
)
CONTAINER = np.array([0.85, 0.15])
HOME = np.array([0.5, 0.5])


def features(shape: tuple[int, int, int] = IMAGE_SHAPE) -> dict:
    """LeRobot feature spec of the dataset: state/action of 7 values and three RGB cameras."""
    vector = {"dtype": "float32", "shape": (7,), "names": JOINT_NAMES}
    camera = {"dtype": "video", "shape": shape, "names": ["height", "width", "channels"]}
    return {
        "observation.state": vector,
        "action": vector,
        **{f"observation.images.{name}": camera for name in CAMERAS},
    }


def joints_for(xy: np.ndarray) -> np.ndarray:
    x, y = xy
    return _IK @ np.array([x, y, x * y, 1.0])


def _draw_square(image: np.ndarray, center: np.ndarray, half: int, color: tuple[int, int, int]) -> None:
    h, w, _ = image.shape
    half = max(1, round(half * h / IMAGE_SHAPE[0]))  # sizes are given for 64x64 images
    row, col = int(center[1] * (h - 1)), int(center[0] * (w - 1))
    image[max(row - half, 0) : row + half + 1, max(col - half, 0) : col + half + 1] = color


def render(cube: np.ndarray, effector: np.ndarray, holding: bool, noise: np.ndarray) -> dict[str, np.ndarray]:
    """Draw the three camera views of the scene; `noise` keeps the images from being trivially flat."""
    views = {}
    for name in CAMERAS:
        image = np.clip(noise + 90, 0, 255).astype(np.uint8)
        if name == "front":
            _draw_square(image, CONTAINER, 6, (40, 40, 200))
            _draw_square(image, cube, 3, (220, 40, 40))
            _draw_square(image, effector, 2, (240, 240, 240))
        elif name == "right":  # the same table seen from the side: x and y swapped and mirrored
            _draw_square(image, 1.0 - CONTAINER[::-1], 6, (40, 40, 200))
            _draw_square(image, 1.0 - cube[::-1], 3, (220, 40, 40))
            _draw_square(image, 1.0 - effector[::-1], 2, (240, 240, 240))
        else:  # wrist camera: the cube relative to the gripper, large when held
            _draw_square(image, np.clip(0.5 + (cube - effector), 0, 1), 12 if holding else 5, (220, 40, 40))
        views[f"observation.images.{name}"] = image
    return views


def episode(rng: np.random.Generator, shape: tuple[int, int, int] = IMAGE_SHAPE) -> list[dict]:
    """One pick-and-place: approach the cube, grasp, carry it to the container, release."""
    cube = rng.uniform(0.15, 0.7, size=2)
    effector = HOME + rng.normal(0, 0.03, size=2)
    gripper = 1.0
    noise = rng.normal(0, 6, size=shape)
    held = False
    frames = []
    for t in range(FRAMES_PER_EPISODE + 1):
        goal = cube if t < FRAMES_PER_EPISODE // 2 else CONTAINER
        near = np.linalg.norm(goal - effector) < 0.05
        if t < FRAMES_PER_EPISODE // 2:
            gripper = 0.0 if near else 1.0
            held = held or near
        else:
            gripper = 1.0 if near else gripper
            held = held and not near
        effector = effector + 0.25 * (goal - effector)
        if held:
            cube = effector.copy()
        state = np.append(joints_for(effector), gripper)
        frames.append({"state": state, "images": render(cube, effector, held, noise)})
    return [
        {
            "observation.state": current["state"].astype(np.float32),
            "action": following["state"].astype(np.float32),
            **current["images"],
            "task": TASK,
        }
        for current, following in zip(frames[:-1], frames[1:], strict=True)
    ]


@contextlib.contextmanager
def scheduling_kept() -> Iterator[None]:
    """Give this thread back its CPU scheduling after video encoding.

    SVT-AV1, lerobot's default encoder, switches the thread that drives it to real-time scheduling (SCHED_FIFO,
    priority 99) when it may, as root does, and every process started afterwards inherits that. Trainers, data
    workers and loggers at real-time priority busy-wait ahead of everything else: on a small machine they
    starve each other and the run hangs. Neither lerobot nor PyAV has an option to stop the encoder doing it.
    """
    if not hasattr(os, "sched_getscheduler"):  # not on macOS, nor does SVT-AV1 do this there
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


def create(
    root: Path, episodes: int = 10, seed: int = 0, repo_id: str = REPO_ID, size: tuple[int, int] = IMAGE_SHAPE[:2]
) -> Path:
    """Write the dataset to `root` with lerobot's own writer; same seed, same data. `size` is (height, width)
    of the cameras: 64x64 for tests and the demo, 480x640 for benchmarks at a real camera's size."""
    shape = (*size, 3)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if root.exists():
        raise FileExistsError(f"{root} already exists; pass an empty or new folder to --root.")
    rng = np.random.default_rng(seed)
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder's errors only, not its 60 lines of settings an episode
    dataset = LeRobotDataset.create(
        repo_id, FPS, features(shape), root=root, robot_type="piper", use_videos=True, video_backend="pyav"
    )
    try:
        with scheduling_kept():
            for _ in range(episodes):
                for frame in episode(rng, shape):
                    dataset.add_frame(frame)
                dataset.save_episode(parallel_encoding=False)
            dataset.finalize()
    except BaseException:
        dataset.finalize()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def ensure(root: Path, episodes: int = 10, seed: int = 0) -> Path:
    """Create the demo dataset at `root` unless a complete one is already there."""
    if (root / "meta" / "info.json").exists():
        return root
    logging.info("Creating the demo dataset in %s (%d episodes, seed %d)", root, episodes, seed)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    create(tmp, episodes, seed)
    tmp.rename(root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accel_train.demo_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder to write the dataset into (must not exist)")
    parser.add_argument("--episodes", type=int, default=10, help="number of episodes (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    parser.add_argument("--size", type=int, nargs=2, default=IMAGE_SHAPE[:2], metavar=("HEIGHT", "WIDTH"),
                        help="camera image size (default 64 64)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        create(args.root, args.episodes, args.seed, size=tuple(args.size))
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {args.episodes} episodes of '{TASK}' to {args.root} (repo id {REPO_ID}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
