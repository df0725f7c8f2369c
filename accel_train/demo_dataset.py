"""A small synthetic Piper-like LeRobot dataset, so a newcomer can train without the Hub.

The arm has 6 joints and a gripper (7 values, like `ISdept/piper_arm`). In every episode a cube sits at a
random spot on the table; the arm moves smoothly towards a joint pose that depends on the cube's position,
closes the gripper, carries the cube to the episode's container and opens the gripper. The cube and the
container are drawn in the cameras (the gripper camera sees the cube relative to the arm), so the next joint
target (`action`) is a function of what the policy observes: there is something real to learn. With several
tasks, task i is "... into the <colour> container": a container of its own colour and place, in episodes
i, i + N, i + 2N, ...

    python -m accel_train.demo_dataset --root DIR [--episodes N] [--frames F] [--seed S] [--image_size HxW]
        [--cameras front,right,gripper] [--tasks N] [--fps F] [--images]

On disk, LeRobot format v3.0 as lerobot's own writer lays it out (repo id `local/piper_demo`):

    DIR/meta/info.json                                  codebase_version, fps, features, episode/frame counts
    DIR/meta/stats.json                                 normalisation stats of every feature
    DIR/meta/tasks.parquet                              task strings and their task_index
    DIR/meta/episodes/chunk-000/file-000.parquet        per episode: length, tasks, data and video offsets
    DIR/data/chunk-000/file-000.parquet                 per frame: observation.state, action (float32 x 7),
                                                        timestamp, indices, task_index; with --images also
                                                        observation.images.<camera> as PNG bytes
    DIR/videos/observation.images.<camera>/chunk-000/file-000.mp4   AV1, all episodes (not with --images)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ID = "local/piper_demo"
FPS = 10
FRAMES_PER_EPISODE = 40
IMAGE_SHAPE = (64, 64, 3)
CAMERAS = ("front", "right", "gripper")
JOINT_NAMES = [f"joint_{i}" for i in range(1, 7)] + ["gripper"]
# Task i of a dataset with N tasks: its text, where its container stands on the table, the container's colour.
# Task 0 is the demo's only task by default; every container lies outside the area the cube is drawn from.
TASKS = (
    ("Pick and place the cube into the container", (0.85, 0.15), (40, 40, 200)),
    ("Pick and place the cube into the green container", (0.15, 0.88), (40, 180, 40)),
    ("Pick and place the cube into the yellow container", (0.88, 0.88), (220, 200, 40)),
    ("Pick and place the cube into the purple container", (0.88, 0.5), (150, 40, 180)),
)
TASK = TASKS[0][0]
CONTAINER = np.array(TASKS[0][1])
HOME = np.array([0.5, 0.5])

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


def features(
    shape: tuple[int, int, int] = IMAGE_SHAPE, cameras: Sequence[str] | None = None, images: bool = False
) -> dict:
    """LeRobot feature spec of the dataset: state/action of 7 values and one RGB feature per camera (default:
    `CAMERAS`, read when called), stored as video or (with `images`) as image frames."""
    cameras = CAMERAS if cameras is None else cameras
    vector = {"dtype": "float32", "shape": (7,), "names": JOINT_NAMES}
    camera = {"dtype": "image" if images else "video", "shape": shape, "names": ["height", "width", "channels"]}
    return {
        "observation.state": vector,
        "action": vector,
        **{f"observation.images.{name}": camera for name in cameras},
    }


def joints_for(xy: np.ndarray) -> np.ndarray:
    x, y = xy
    return _IK @ np.array([x, y, x * y, 1.0])


def _draw_square(image: np.ndarray, center: np.ndarray, half: int, color: tuple[int, int, int]) -> None:
    h, w, _ = image.shape
    half = max(1, round(half * h / IMAGE_SHAPE[0]))  # sizes are given for 64x64 images
    row, col = int(center[1] * (h - 1)), int(center[0] * (w - 1))
    image[max(row - half, 0) : row + half + 1, max(col - half, 0) : col + half + 1] = color


def render(
    cube: np.ndarray,
    effector: np.ndarray,
    holding: bool,
    noise: np.ndarray,
    cameras: Sequence[str] = CAMERAS,
    task: int = 0,
) -> dict[str, np.ndarray]:
    """Draw the camera views of the scene; `noise` keeps the images from being trivially flat. "right" sees the
    table from the side, "gripper" is the wrist camera; any other name sees the table from above, as "front"."""
    _, container, colour = TASKS[task]
    container = np.array(container)
    views = {}
    for name in cameras:
        image = np.clip(noise + 90, 0, 255).astype(np.uint8)
        if name == "right":  # the same table seen from the side: x and y swapped and mirrored
            _draw_square(image, 1.0 - container[::-1], 6, colour)
            _draw_square(image, 1.0 - cube[::-1], 3, (220, 40, 40))
            _draw_square(image, 1.0 - effector[::-1], 2, (240, 240, 240))
        elif name == "gripper":  # wrist camera: the cube relative to the gripper, large when held
            _draw_square(image, np.clip(0.5 + (cube - effector), 0, 1), 12 if holding else 5, (220, 40, 40))
        else:
            _draw_square(image, container, 6, colour)
            _draw_square(image, cube, 3, (220, 40, 40))
            _draw_square(image, effector, 2, (240, 240, 240))
        views[f"observation.images.{name}"] = image
    return views


def episode(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = IMAGE_SHAPE,
    cameras: Sequence[str] = CAMERAS,
    task: int = 0,
    frames: int = FRAMES_PER_EPISODE,
) -> list[dict]:
    """One pick-and-place of task `task`: approach the cube, grasp, carry it to the container, release."""
    container = np.array(TASKS[task][1])
    cube = rng.uniform(0.15, 0.7, size=2)
    effector = HOME + rng.normal(0, 0.03, size=2)
    gripper = 1.0
    noise = rng.normal(0, 6, size=shape)
    held = False
    states = []
    for t in range(frames + 1):
        goal = cube if t < frames // 2 else container
        near = np.linalg.norm(goal - effector) < 0.05
        if t < frames // 2:
            gripper = 0.0 if near else 1.0
            held = held or near
        else:
            gripper = 1.0 if near else gripper
            held = held and not near
        effector = effector + 0.25 * (goal - effector)
        if held:
            cube = effector.copy()
        state = np.append(joints_for(effector), gripper)
        states.append({"state": state, "images": render(cube, effector, held, noise, cameras, task)})
    return [
        {
            "observation.state": current["state"].astype(np.float32),
            "action": following["state"].astype(np.float32),
            **current["images"],
            "task": TASKS[task][0],
        }
        for current, following in zip(states[:-1], states[1:], strict=True)
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


def _libavutil() -> ctypes.CDLL | None:
    """The libavutil this process runs PyAV on (Linux: among the loaded libraries, the one PyAV's wheel bundles
    in preference to another, such as a system FFmpeg's that torchcodec loaded), or None."""
    import av

    bundled = str(Path(av.__file__).resolve().parent.parent / "av.libs")
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "libavutil" in line and "/" in line}
        for path in sorted(loaded, key=lambda path: not path.startswith(bundled)):
            return ctypes.CDLL(path)
    return None


def libav_level() -> int:
    """FFmpeg's own log level, which its default log callback prints at (AV_LOG_INFO unless someone set it)."""
    import av.logging

    lib = _libavutil()
    return lib.av_log_get_level() if lib is not None else av.logging.INFO


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep lerobot's writer from printing while a dataset is written; every setting changed is put back after.

    What it prints otherwise, about 60 lines for 10 episodes: FFmpeg's "Starting second pass: moving the moov
    atom" for each video concatenated (lerobot installs FFmpeg's default log callback, which prints at FFmpeg's
    own level, INFO: that level is raised to ERROR here), the `datasets` "Map" progress bar of each episode's
    parquet, lerobot's INFO logs ("Using video codec: ...": the `lerobot` logger is raised to WARNING), and
    SVT-AV1's settings dump per encoder (SVT_LOG=1: errors only). Errors and warnings still get through.
    """
    import av.logging
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    loggers = {name: logging.getLogger(name) for name in ("lerobot", "libav")}
    levels = {name: logger.level for name, logger in loggers.items()}
    bars_were_on, ffmpeg_level, svt_log = not are_progress_bars_disabled(), libav_level(), os.environ.get("SVT_LOG")
    loggers["lerobot"].setLevel(max(logging.WARNING, loggers["lerobot"].getEffectiveLevel()))
    av.logging.set_libav_level(av.logging.ERROR)
    disable_progress_bars()
    os.environ["SVT_LOG"] = svt_log or "1"
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
        av.logging.set_libav_level(ffmpeg_level)
        if bars_were_on:
            enable_progress_bars()
        if svt_log is None:
            os.environ.pop("SVT_LOG", None)


class VariantError(ValueError):
    """Options of `create` that describe no dataset."""


@dataclass(frozen=True)
class Variant:
    """How a dataset differs from the demo's defaults: the keyword options of `create` and the command."""

    image_size: tuple[int, int] = IMAGE_SHAPE[:2]  # (height, width)
    cameras: Sequence[str] | None = None  # None: CAMERAS, read when the dataset is written
    tasks: int = 1
    fps: int = FPS
    frames: int = FRAMES_PER_EPISODE  # per episode
    images: bool = False

    def problems(self) -> list[str]:
        cameras = tuple(self.cameras or ())
        distinct = len(set(cameras)) == len(cameras) and all(c and not {".", "/"} & set(c) for c in cameras)
        named = self.cameras is None or (bool(cameras) and distinct)
        height, width = self.image_size
        return [
            *(["frames must be at least 4"] if self.frames < 4 else []),
            *(["fps must be at least 1"] if self.fps < 1 else []),
            *([f"tasks must be 1 to {len(TASKS)}"] if not 1 <= self.tasks <= len(TASKS) else []),
            # SVT-AV1 dies of SIGFPE on frames narrower than 32 pixels (seen at 24).
            *(["image height must be at least 8, width at least 32"] if height < 8 or width < 32 else []),
            *([] if named else ["cameras must be one or more distinct names without dots or slashes"]),
        ]


def create(root: Path, episodes: int = 10, seed: int = 0, repo_id: str = REPO_ID, **options: Any) -> Path:
    """Write the dataset to `root` with lerobot's own writer; same arguments, same data (`meta/stats.json` may list its
    keys in another order). `options` are `Variant`'s fields: `image_size` (height, width) of the cameras, 64x64 for
    tests and the demo, 480x640 as a real camera's; `cameras` names them (observation.images.<name>); episode e
    performs task e mod `tasks`; `frames` per episode at `fps`; `images` stores image features (PNG in the data
    parquet) instead of AV1 videos."""
    variant = Variant(**options)
    problems = (["episodes must be at least 1"] if episodes < 1 else []) + variant.problems()
    if problems:
        raise VariantError("; ".join(problems))
    if root.exists():
        raise FileExistsError(f"{root} already exists; pass an empty or new folder to --root.")
    cameras, tasks = tuple(CAMERAS if variant.cameras is None else variant.cameras), variant.tasks
    shape = (*variant.image_size, 3)
    rng = np.random.default_rng(seed)
    with quiet():
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        dataset = LeRobotDataset.create(
            repo_id, variant.fps, features(shape, cameras, variant.images), root=root, robot_type="piper",
            use_videos=not variant.images, video_backend="pyav",
        )  # fmt: skip
        try:
            with scheduling_kept():
                for index in range(episodes):
                    for frame in episode(rng, shape, cameras, index % tasks, variant.frames):
                        dataset.add_frame(frame)
                    dataset.save_episode(parallel_encoding=False)
                dataset.finalize()
        except BaseException:
            dataset.finalize()
            shutil.rmtree(root, ignore_errors=True)
            raise
    return root


def summary(root: Path, seconds: float) -> str:
    """What was written where, read back from the dataset's own metadata: two lines."""
    info = json.loads((root / "meta" / "info.json").read_text())
    cameras = {k.removeprefix("observation.images."): v for k, v in info["features"].items() if "images." in k}
    height, width, _ = next(iter(cameras.values()))["shape"]
    kind = next(iter(cameras.values()))["dtype"]
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return (
        f"Wrote {REPO_ID} to {root}: {info['total_episodes']} episodes, {info['total_frames']} frames at "
        f"{info['fps']} fps, {info['total_tasks']} task(s), cameras {', '.join(cameras)} {height}x{width} as {kind}.\n"
        f"{size / 1e6:.1f} MB in {seconds:.1f} s. Train on it with --dataset_id {REPO_ID} --dataset_root {root}"
    )


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


def _image_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 480x640, not {text!r}")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accel_train.demo_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder to write the dataset into (must not exist)")
    parser.add_argument("--episodes", type=int, default=10, help="number of episodes (default 10)")
    parser.add_argument("--frames", type=int, default=FRAMES_PER_EPISODE,
                        help=f"frames per episode (default {FRAMES_PER_EPISODE})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    parser.add_argument("--image_size", type=_image_size, default=IMAGE_SHAPE[:2], metavar="HxW",
                        help="camera image size, height x width (default 64x64; a real camera: 480x640)")  # fmt: skip
    parser.add_argument("--cameras", type=lambda text: tuple(text.split(",")), default=CAMERAS,
                        help=f"comma-separated camera names (default {','.join(CAMERAS)})")  # fmt: skip
    parser.add_argument("--tasks", type=int, default=1, help=f"number of tasks, 1 to {len(TASKS)} (default 1)")
    parser.add_argument("--fps", type=int, default=FPS, help=f"frames per second (default {FPS})")
    parser.add_argument("--images", action="store_true", help="store the cameras as images, not AV1 videos")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        create(
            args.root, args.episodes, args.seed, image_size=args.image_size, cameras=args.cameras,
            tasks=args.tasks, fps=args.fps, frames=args.frames, images=args.images,
        )  # fmt: skip
    except VariantError as error:
        parser.error(str(error))
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(args.root, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
