"""The decoded-frame cache: the same frames as lerobot's decoding, the same training, safe to share and to lose.

Exactness: every item of the tiny dataset (with image offsets that reach across episode boundaries) equals
lerobot's own, with lerobot's decoding switched off for the cached reads; training with the cache (0 and 2
workers, a partial cache, a resume without it) gives the losses and weights of the reference run without it.
Safety: a touched, replaced, truncated or half-written entry is filled again and never read; two processes
filling at once leave one complete store; a cap too small, an unwritable folder or a write failing part-way
degrade to decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, STRAIGHT_STEPS, assert_ok, base_args, losses, run_cli, same_weights

from accel_train import frame_cache

CAMERAS = [f"observation.images.{name}" for name in ("front", "right", "gripper")]
# Offsets in seconds (10 fps): frames before the episode's start and after its end are clamped by lerobot.
OFFSETS = {camera: [-0.3, -0.1, 0.0, 0.2] for camera in CAMERAS}


def open_dataset(root: Path, offsets: dict | None = OFFSETS):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(
        "local/piper_demo", root=root, video_backend="pyav", return_uint8=True, delta_timestamps=offsets
    )


def attach(root: Path, cache_dir: Path, cap_gb: float | None = None):
    dataset = open_dataset(root)
    return dataset, frame_cache.attach(dataset, "disk", cache_dir, cap_gb)


def test_frames_are_lerobots(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lerobot.datasets.dataset_reader as dataset_reader
    from lerobot.datasets.video_utils import decode_video_frames

    plain = open_dataset(tiny_dataset)
    expected = [plain[i] for i in range(len(plain))]
    cached, report = attach(tiny_dataset, tmp_path)
    assert report.used and len(report.cached) == report.files_total == 3 and report.filled_now == 3

    # Every stored frame is lerobot's decode of its timestamp.
    for relpath, entry in report.cached.items():
        stored = np.memmap(entry.frames_path, np.uint8, "r", shape=entry.shape)
        assert entry.shape == (2 * 40, 3, 64, 64)
        for i, pts in enumerate(entry.pts.tolist()):
            theirs = decode_video_frames(tiny_dataset / relpath, [pts], 1e-4, "pyav", return_uint8=True)
            assert np.array_equal(theirs[0].numpy(), stored[i]), (relpath, i)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached frame was decoded from video")

    monkeypatch.setattr(dataset_reader, "decode_video_frames", no_decoding)
    for i, theirs in enumerate(expected):
        ours = cached[i]
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), (i, key)
            else:
                assert ours[key] == value, (i, key)


def cached_run(dataset: Path, out: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--image_transforms.enable=true", "--frame_cache", "disk", "--frame_cache_dir", str(cache_dir), *extra]
    result = run_cli(base_args(dataset, out, *args))
    assert_ok(result)
    return result


@pytest.mark.parametrize("workers", [0, 2])
def test_training_with_the_cache_is_identical(straight: Path, tiny_dataset: Path, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "run"
    result = cached_run(
        tiny_dataset, out, tmp_path / "cache", "--steps", str(STRAIGHT_STEPS), "--num_workers", str(workers)
    )
    assert "Frame cache: disk in" in result.stderr and "3 of 3 video files, 240 of 240 frames" in result.stderr
    assert losses(out) == losses(straight)
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")


def test_resume_without_the_cache_and_a_partial_cache(straight: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """First half with 2 of the 3 files cached (the cap), 2 workers; second half without the cache."""
    out, half = tmp_path / "run", 13
    first = cached_run(
        tiny_dataset, out, tmp_path / "cache", "--steps", str(half), "--save_freq", str(half),
        "--num_workers", "2", "--frame_cache_gb", "0.0025",
    )  # fmt: skip
    assert "2 of 3 video files, 160 of 240 frames" in first.stderr
    assert "1 files did not fit (--frame_cache_gb 0.0025 holds 1.9 MB of the 2.8 MB needed)" in first.stderr
    second = run_cli(
        base_args(
            tiny_dataset, out, "--image_transforms.enable=true", "--steps", str(STRAIGHT_STEPS),
            "--resume_from_checkpoint", "latest", "--frame_cache", "off",
        )
    )  # fmt: skip
    assert_ok(second)
    assert "Frame cache: off" in second.stderr
    assert losses(out) == losses(straight)
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")


def files(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def test_stale_and_half_written_entries_are_filled_again(tiny_dataset: Path, tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(tiny_dataset, root)
    front, right = (root / "videos" / camera / "chunk-000" / "file-000.mp4" for camera in CAMERAS[:2])
    _, report = attach(root, cache)
    assert report.filled_now == 3
    before = files(cache)
    _, report = attach(root, cache)
    assert report.filled_now == 0 and len(report.cached) == 3 and "reused" in report.describe()

    # Touched: a new key, the old entry deleted.
    os.utime(front, ns=(front.stat().st_atime_ns, front.stat().st_mtime_ns + 10**9))
    _, report = attach(root, cache)
    assert report.filled_now == 1 and len(files(cache)) == len(before) and files(cache) != before

    # Replaced by other content: the store serves the new frames.
    shutil.copyfile(front, right)
    dataset, report = attach(root, cache)
    assert report.filled_now == 1
    assert torch.equal(dataset[5][CAMERAS[1]], dataset[5][CAMERAS[0]])

    # Truncated frames, a marker of another key, a leftover temporary file: refilled, never read.
    entries = {e.frames_path for e in report.cached.values()}
    truncated, other_key, _ = sorted(entries)
    with open(truncated, "r+b") as f:
        f.truncate(1000)
    marker = other_key.with_suffix(".json")
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "key": {**info["key"], "size": 1}}))
    leftover = truncated.with_name(truncated.name + ".tmp-99999")
    leftover.write_bytes(b"partial")
    dataset, report = attach(root, cache)
    assert report.filled_now == 2 and len(report.cached) == 3 and not leftover.exists()
    assert truncated.stat().st_size == 80 * 3 * 64 * 64


FILL = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_frame_cache import frame_cache, open_dataset
dataset = open_dataset(Path({root!r}))
ready, other = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not other.exists():  # both processes reach the store within a few ms
    time.sleep(0.001)
report = frame_cache.attach(dataset, "disk", Path({cache!r}))
print(json.dumps({{"filled": report.filled_now, "cached": len(report.cached), "waited_s": report.waited_s,
                  "fill_s": report.fill_s}}))
"""


def test_two_processes_filling_at_once(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = FILL.format(tests=str(REPO / "tests"), root=str(tiny_dataset), cache=str(cache))
    a, b = tmp_path / "a", tmp_path / "b"
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(mine), str(theirs)], stdout=subprocess.PIPE, text=True)
        for mine, theirs in ((a, b), (b, a))
    ]
    reports = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    waiter, filler = sorted(reports, key=lambda r: r["filled"])
    assert (waiter["filled"], filler["filled"]) == (0, 3)
    assert waiter["waited_s"] > filler["fill_s"] / 2  # it waited while the other filled
    assert all(r["cached"] == 3 for r in reports)
    assert len([name for name in files(cache) if name.endswith(".frames")]) == 3
    assert not [name for name in files(cache) if ".tmp-" in name]
    cached, report = attach(tiny_dataset, cache)
    assert report.filled_now == 0 and len(report.cached) == 3
    plain = open_dataset(tiny_dataset)
    for i in (0, 39, 40, 79):
        assert all(torch.equal(cached[i][camera], plain[i][camera]) for camera in CAMERAS)


def test_no_room_degrades_to_decoding(straight: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    _, report = attach(tiny_dataset, tmp_path / "tiny", cap_gb=0.0001)
    assert not report.used
    assert "3 files did not fit (--frame_cache_gb 0.0001 holds 0.0 MB of the 2.8 MB needed)" in report.describe()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _, report = attach(tiny_dataset, blocker / "cache")
    assert not report.used and f"cannot create {blocker / 'cache'}" in report.describe()

    # A write that fails part-way (a file size limit: EFBIG, as ENOSPC on a full disk): one warning, no store.
    script = (
        "import resource, signal, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_frame_cache import attach; import logging; logging.basicConfig(level=logging.INFO);"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000));"
        "dataset, report = attach(Path(sys.argv[2]), Path(sys.argv[3])); dataset[0];"
        "print(report.describe())"
    )
    cache = tmp_path / "limited"
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPO / "tests"), str(tiny_dataset), str(cache)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("not used: writing") and "File too large, disk full" in result.stdout
    assert result.stderr.count("WARNING:accel_train.frame_cache:Frame cache: writing") == 1
    assert not [name for name in files(cache) if name.endswith(".frames") or ".tmp-" in name]

    out = tmp_path / "run"  # the first steps of the reference run (a constant learning rate)
    run = run_cli(
        base_args(tiny_dataset, out, "--image_transforms.enable=true", "--steps", "4",
                  "--frame_cache", "ram", "--frame_cache_dir", str(blocker / "cache"))
    )  # fmt: skip
    assert_ok(run)
    assert f"Frame cache: not used: cannot create {blocker / 'cache'}" in run.stderr
    assert losses(out) == losses(straight)[:4]


def test_options() -> None:
    assert frame_cache.mode_name(False) == "off" and frame_cache.mode_name("disk") == "disk"
    assert frame_cache.check_options("disk", 1.0) == []
    assert len(frame_cache.check_options("gpu", -1.0)) == 2
