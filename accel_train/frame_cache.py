"""A decoded-frame cache: every video frame decoded once per machine, then read from a memory-mapped store.

Random access into AV1 video decodes from the previous keyframe for every sample, in every epoch; a sequential
decode of a whole file costs a fraction of that per frame. `attach(dataset, mode, ...)` fills the store with a
sequential decode of each video file (once: later epochs, resumes and runs of the same dataset find it filled)
and makes the dataset read its RGB camera frames from it. Every loader worker and every process on the machine
maps the same files read-only, so the operating system's page cache holds one copy, never one per worker or rank.

Exactness: the store holds the uint8 RGB frames PyAV decodes (`frame.to_ndarray(format="rgb24")`, as lerobot's
`decode_video_frames_pyav`), in CHW layout, with their presentation timestamps. A query is answered with the
frame lerobot would return: the shifted timestamp `from_timestamp + ts` and the frame timestamps compared in
float32, the nearest frame (first on ties) taken when it is the only one within `tolerance_s`. Anything else
(no frame or several within tolerance, a camera not in the store, depth video) goes to lerobot's own decoding,
errors included. Filling a file checks three of its frames against lerobot's decode with the dataset's backend;
on any difference filling stops and the files not yet in the store are decoded by lerobot.

On-disk layout, one folder per dataset copy and decoder (`<dir>` is `--frame_cache_dir`, by default
`~/.cache/accel_train/frames` for `disk` and `/dev/shm/accel_train_frames` for `ram`):

    <dir>/<repo id, '/' -> '--'>-<store key hash>/
        .lock                              a filelock, held by the one process that fills the store
        <file id>-<file key hash>.frames   raw uint8, shape (frames, 3, H, W), C order: the video file's frames in
                                           presentation order
        <file id>-<file key hash>.json     completion marker, written after the .frames file is complete:
                                           {"key": file key, "shape": [...], "pts": [seconds, ...], "fill_s": s}

The store key hashes the repo id, the dataset's absolute root, its revision and codebase version, and the
decoder (PyAV and libavcodec versions, pixel format, layout, FORMAT). The file key adds the file's path in the
dataset, size and mtime (ns). `<file id>` is that path with '/' -> '~'. A changed video gets a new file key: its
old entry is deleted and it is decoded again. Both files of an entry are written under a temporary name
(`.tmp-<host>-<pid>` appended) and renamed into place, the marker last; an entry is read only when its marker's
key matches and the .frames size equals the marker's shape, so a stale or half-written entry is never read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MODES = ("off", "ram", "disk")
FORMAT = 1
PIXEL_FORMAT = "rgb24"
# Space left free on the cache's filesystem: 1 GiB, or a tenth of a small filesystem.
RESERVE_BYTES = 2**30
LOCK_WAIT_LOG_S = 2.0


def default_directory(mode: str) -> Path:
    if mode == "ram":
        return Path("/dev/shm/accel_train_frames")
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "accel_train" / "frames"


def mode_name(value: Any) -> str:
    """The mode as given: draccus and YAML read `off` (and `no`, `false`) as the boolean false."""
    return "off" if str(value).lower() in ("false", "no", "off") else str(value)


def check_options(mode: str, cap_gb: float | None) -> list[str]:
    """Problems with the command-line options, for TrainConfig.validate."""
    problems = []
    if mode not in MODES:
        problems.append(f"--frame_cache must be one of {', '.join(MODES)}")
    if cap_gb is not None and cap_gb < 0:
        problems.append("--frame_cache_gb must be 0 or more")
    return problems


@dataclass
class VideoFile:
    """One video file of the dataset, as the store knows it."""

    camera: str
    relpath: str
    size: int
    mtime_ns: int
    shape: tuple[int, int, int]  # (H, W, C) from the dataset's features
    frames_estimate: int

    @property
    def bytes_estimate(self) -> int:
        return self.frames_estimate * int(np.prod(self.shape))


@dataclass
class Entry:
    """A complete entry of the store: where its frames are and their timestamps."""

    frames_path: Path
    shape: tuple[int, ...]
    pts: np.ndarray  # float32 seconds, as lerobot compares them
    fill_s: float

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Report:
    """What attach did, for the start-up summary."""

    mode: str
    directory: Path | None = None
    reason: str = ""
    files_total: int = 0
    frames_total: int = 0  # estimated from the metadata for files not in the store
    bytes_needed: int = 0
    cached: dict[str, Entry] = field(default_factory=dict)  # relpath -> entry
    filled_now: int = 0
    fill_s: float = 0.0  # this process's fill time
    stored_fill_s: float = 0.0  # the fill time of every cached entry, whoever filled it
    waited_s: float = 0.0

    @property
    def used(self) -> bool:
        return bool(self.cached)

    @property
    def bytes_cached(self) -> int:
        return sum(e.nbytes for e in self.cached.values())

    def describe(self) -> str:
        if self.mode == "off":
            return "off (--frame_cache ram|disk decodes each video once into a shared memory-mapped store)"
        if not self.used:
            return f"not used: {self.reason}; frames are decoded from video"
        frames = sum(e.shape[0] for e in self.cached.values())
        text = (
            f"{self.mode} in {self.directory}: {len(self.cached)} of {self.files_total} video files, "
            f"{frames} of {self.frames_total} frames, {_size(self.bytes_cached)}"
        )
        if self.filled_now:
            text += f"; filled {self.filled_now} files now in {self.fill_s:.2f} s (sequential decode)"
        if self.filled_now < len(self.cached):
            text += f"; reused from an earlier fill ({self.stored_fill_s:.2f} s of decoding in all)"
        if self.waited_s >= LOCK_WAIT_LOG_S:
            text += f"; waited {self.waited_s:.1f} s for another process filling it"
        if len(self.cached) < self.files_total:
            text += f". The other files are decoded from video: {self.reason}"
        return text


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def decoder_settings() -> dict[str, Any]:
    import av

    return {
        "format": FORMAT,
        "decoder": "pyav",
        "av": av.__version__,
        "libavcodec": list(av.library_versions.get("libavcodec", ())),
        "pixel_format": PIXEL_FORMAT,
        "layout": "uint8 CHW",
    }


def store_key(dataset: Any) -> dict[str, Any]:
    return {
        "repo_id": dataset.repo_id,
        "root": str(Path(dataset.root).resolve()),
        "revision": str(dataset.revision),
        "codebase_version": dataset.meta.info.get("codebase_version"),
        **decoder_settings(),
    }


def file_key(store: dict[str, Any], video: VideoFile) -> dict[str, Any]:
    return {"store": _digest(store), "path": video.relpath, "size": video.size, "mtime_ns": video.mtime_ns}


def entry_stem(video: VideoFile, key: dict[str, Any]) -> str:
    return f"{video.relpath.replace('/', '~')}-{_digest(key)}"


# ---------------------------------------------------------------------------------------------------------------
# Which files, and which frame answers a query


def rgb_cameras(dataset: Any) -> list[str]:
    return [key for key in dataset.meta.video_keys if key not in dataset.meta.depth_keys]


def episode_files(dataset: Any, cameras: list[str], every: bool = False) -> dict[tuple[int, str], tuple[str, float]]:
    """(episode, camera) -> (video file path in the dataset, the episode's from_timestamp in it), as lerobot's
    DatasetReader._query_videos computes them; for the episodes the dataset was opened with, or `every` one."""
    chosen = dataset.episodes if dataset.episodes is not None and not every else None
    episodes = chosen if chosen is not None else range(dataset.meta.total_episodes)
    table = {}
    for ep_idx in episodes:
        ep = dataset.meta.episodes[ep_idx]
        for camera in cameras:
            path = str(dataset.meta.get_video_file_path(ep_idx, camera))
            table[(ep_idx, camera)] = (path, float(ep[f"videos/{camera}/from_timestamp"]))
    return table


def video_files(dataset: Any, table: dict[tuple[int, str], tuple[str, float]]) -> list[VideoFile]:
    """The video files the dataset's episodes read, with a frame count estimated from the episodes' metadata."""
    ends: dict[str, float] = {}
    cameras: dict[str, str] = {}
    for ep_idx in range(dataset.meta.total_episodes):
        ep = dataset.meta.episodes[ep_idx]
        for camera in {c for (_, c) in table}:
            path = str(dataset.meta.get_video_file_path(ep_idx, camera))
            ends[path] = max(ends.get(path, 0.0), float(ep[f"videos/{camera}/to_timestamp"]))
            cameras[path] = camera
    files = []
    for path in sorted({p for p, _ in table.values()}):
        stat = (Path(dataset.root) / path).stat()
        shape = tuple(dataset.meta.features[cameras[path]]["shape"])
        files.append(
            VideoFile(cameras[path], path, stat.st_size, stat.st_mtime_ns, shape, round(ends[path] * dataset.fps))
        )
    return files


def nearest_frame(pts: np.ndarray, timestamps: list[float], tolerance_s: float) -> np.ndarray | None:
    """Indices of the frames lerobot returns for these (shifted) timestamps, or None where it is not certain.

    lerobot (decode_video_frames_pyav / _torchcodec) compares float32 timestamps, takes the nearest loaded frame
    and raises unless it lies within tolerance_s. The nearest frame of the whole file is among those it loads;
    when it is the only frame within tolerance, any decode window containing it gives the same answer.
    """
    query = np.asarray(timestamps, dtype=np.float32)
    distance = np.abs(query[:, None] - pts[None, :])
    index = distance.argmin(axis=1)
    within = distance < np.float32(tolerance_s)
    if not (within[np.arange(len(query)), index].all() and (within.sum(axis=1) == 1).all()):
        return None
    return index


class CachedVideoQuery:
    """Stands in for a DatasetReader's `_query_videos(query_timestamps, ep_idx)`: frames of cached files come
    from the store, the rest from lerobot's own method. Picklable for spawned workers: each process opens the
    memory maps itself (the same pages of the page cache)."""

    def __init__(self, reader: Any, table: dict[tuple[int, str], tuple[str, float]], entries: dict[str, Entry]):
        self.reader = reader
        self.table = table
        self.entries = entries
        self.tolerance_s = reader._tolerance_s
        self._maps: dict[str, np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def frames(self, path: str) -> np.memmap:
        mapped = self._maps.get(path)
        if mapped is None:
            entry = self.entries[path]
            mapped = self._maps[path] = np.memmap(entry.frames_path, dtype=np.uint8, mode="r", shape=entry.shape)
        return mapped

    def lookup(self, camera: str, ep_idx: int, timestamps: list[float]) -> torch.Tensor | None:
        path, from_timestamp = self.table.get((ep_idx, camera), (None, 0.0))
        entry = self.entries.get(path)
        if entry is None:
            return None
        index = nearest_frame(entry.pts, [from_timestamp + ts for ts in timestamps], self.tolerance_s)
        if index is None:
            return None
        return torch.from_numpy(self.frames(path)[index]).squeeze(0)  # fancy indexing copies out of the map

    def __call__(self, query_timestamps: dict[str, list[float]], ep_idx: int) -> dict[str, torch.Tensor]:
        found, missing = {}, {}
        for camera, timestamps in query_timestamps.items():
            frames = self.lookup(camera, ep_idx, timestamps)
            if frames is None:
                missing[camera] = timestamps
            else:
                found[camera] = frames
        if missing:
            found.update(type(self.reader)._query_videos(self.reader, missing, ep_idx))
        return {camera: found[camera] for camera in query_timestamps}


# ---------------------------------------------------------------------------------------------------------------
# Filling the store


class CacheFull(Exception):
    """The cap or the filesystem has no room for the next file."""


class NotExact(Exception):
    """The sequential decode differs from lerobot's decode with the dataset's backend."""


def decode_sequentially(path: Path) -> Iterator[tuple[float, np.ndarray]]:
    """Every frame of the video in presentation order, (timestamp in seconds, CHW uint8 RGB frame), decoded as
    lerobot's decode_video_frames_pyav decodes them."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.pts is not None:
                chw = frame.to_ndarray(format=PIXEL_FORMAT).transpose(2, 0, 1)
                yield float(frame.pts * stream.time_base), np.ascontiguousarray(chw)


def _same_as_lerobot(dataset: Any, path: Path, timestamps: list[float], frames: np.ndarray) -> bool:
    """Three frames of the file (first, middle, last) against lerobot's decode with the dataset's backend."""
    from lerobot.datasets.video_utils import decode_video_frames

    for i in sorted({0, len(frames) // 2, len(frames) - 1}):
        theirs = decode_video_frames(
            path, [timestamps[i]], dataset.tolerance_s, dataset.reader._video_backend, return_uint8=True
        )
        if not np.array_equal(theirs[0].numpy(), frames[i]):
            return False
    return True


def fill_entry(dataset: Any, store_dir: Path, video: VideoFile, key: dict[str, Any], room: int) -> Entry:
    """Decode one file into the store, streaming to a temporary file renamed into place once complete and
    checked; the marker is written last. Raises CacheFull when the file needs more than `room` bytes."""
    stem = entry_stem(video, key)
    source, final = Path(dataset.root) / video.relpath, store_dir / f"{stem}.frames"
    tmp = final.with_name(f"{final.name}{_tmp_suffix()}")
    start = time.perf_counter()
    timestamps: list[float] = []
    frame_shape: tuple[int, ...] | None = None
    try:
        with open(tmp, "wb") as f:
            for timestamp, frame in decode_sequentially(source):
                if frame_shape is None:
                    frame_shape = frame.shape
                elif frame.shape != frame_shape:
                    raise ValueError(f"{video.relpath} changes frame size")
                if (len(timestamps) + 1) * frame.nbytes > room:
                    raise CacheFull(f"{video.relpath} needs more than {_size(room)}")
                f.write(frame.data)
                timestamps.append(timestamp)
            f.flush()
            os.fsync(f.fileno())
        if frame_shape is None:
            raise ValueError(f"{video.relpath} has no frames")
        shape = (len(timestamps), *frame_shape)
        if not _same_as_lerobot(dataset, source, timestamps, np.memmap(tmp, np.uint8, "r", shape=shape)):
            raise NotExact(
                f"PyAV's sequential decode of {video.relpath} differs from lerobot's decode with the "
                f"{dataset.reader._video_backend} backend"
            )
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fill_s = time.perf_counter() - start
    marker = json.dumps({"key": key, "shape": list(shape), "pts": timestamps, "fill_s": fill_s}).encode()
    _write_atomically(store_dir / f"{stem}.json", marker)
    return Entry(final, shape, np.asarray(timestamps, dtype=np.float32), fill_s)


def _tmp_suffix() -> str:
    """Unique to this process, also among the nodes sharing a file system."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}{_tmp_suffix()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_entry(store_dir: Path, stem: str, key: dict[str, Any]) -> Entry | None:
    """The entry if it is complete and current, else None (it is then never read)."""
    marker, frames = store_dir / f"{stem}.json", store_dir / f"{stem}.frames"
    try:
        info = json.loads(marker.read_text())
        shape = tuple(int(n) for n in info["shape"])
        if info["key"] != key or frames.stat().st_size != int(np.prod(shape)) or len(info["pts"]) != shape[0]:
            return None
        return Entry(frames, shape, np.asarray(info["pts"], dtype=np.float32), float(info["fill_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_stale(store_dir: Path, current: set[str]) -> None:
    """Delete entries not of the current file keys, and temporary files of dead fills (the caller holds the lock)."""
    for path in store_dir.iterdir():
        if path.name == ".lock":
            continue
        stem = path.name.split(".tmp-")[0].removesuffix(".frames").removesuffix(".json")
        if ".tmp-" in path.name or stem not in current:
            path.unlink(missing_ok=True)


def free_room(store_dir: Path) -> int:
    usage = shutil.disk_usage(store_dir)
    return max(0, usage.free - min(RESERVE_BYTES, usage.total // 10))


@contextlib.contextmanager
def store_lock(store_dir: Path, report: Report):
    """The store's filelock; yields False (read what is complete, fill nothing) where no lock can be taken."""
    from filelock import FileLock, Timeout

    lock = FileLock(store_dir / ".lock")
    start = time.perf_counter()
    try:
        try:
            lock.acquire(timeout=LOCK_WAIT_LOG_S)
        except Timeout:
            log.info("Frame cache: waiting for another process filling %s", store_dir)
            lock.acquire()
    except OSError as error:
        report.reason = f"cannot lock {store_dir} ({error.strerror or error}): using what it holds, filling nothing"
        yield False
        return
    report.waited_s = time.perf_counter() - start
    try:
        yield True
    finally:
        lock.release()


def unsupported(dataset: Any) -> str | None:
    """Why this dataset's frames cannot come from the store, or None."""
    reader = getattr(dataset, "reader", None)
    method = getattr(type(reader), "_query_videos", None)
    if method is None or list(inspect.signature(method).parameters) != ["self", "query_timestamps", "ep_idx"]:
        return "this lerobot version's DatasetReader has no _query_videos(query_timestamps, ep_idx) to serve"
    if not getattr(reader, "_return_uint8", False):
        return "the dataset returns float frames (the cache serves return_uint8=True datasets)"
    if not rgb_cameras(dataset):
        return "the dataset has no RGB video"
    return None


def attach(dataset: Any, mode: str, directory: Path | None = None, cap_gb: float | None = None) -> Report:
    """Serve `dataset`'s RGB video frames from the machine's store, filling it first where needed.

    Never raises for the cache's sake: a store that cannot be made, a cap or a disk too small, degrade to
    decoding (all files, or those that did not fit) and say so in the report.
    """
    report = Report(mode)
    if mode == "off":
        return report
    try:
        return _attach(dataset, report, directory, cap_gb)
    except Exception as error:  # the cache is an optimisation: whatever fails in it, the run decodes as before
        log.warning("Frame cache: not used (%s: %s)", type(error).__name__, error)
        report.cached.clear()
        report.reason = f"{type(error).__name__}: {error}"
        return report


def _attach(dataset: Any, report: Report, directory: Path | None, cap_gb: float | None) -> Report:
    mode = report.mode
    reason = unsupported(dataset)
    if reason is not None:
        report.reason = reason
        return report
    cameras = rgb_cameras(dataset)
    table = episode_files(dataset, cameras)
    videos = video_files(dataset, table)
    report.files_total = len(videos)
    report.frames_total = sum(v.frames_estimate for v in videos)
    report.bytes_needed = sum(v.bytes_estimate for v in videos)
    store = store_key(dataset)
    base = Path(directory) if directory is not None else default_directory(mode)
    store_dir = base / f"{dataset.repo_id.replace('/', '--')}-{_digest(store)}"
    report.directory = store_dir
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        report.reason = f"cannot create {store_dir} ({error.strerror or error})"
        return report

    keys = {v.relpath: file_key(store, v) for v in videos}
    stems = {v.relpath: entry_stem(v, keys[v.relpath]) for v in videos}
    with store_lock(store_dir, report) as may_fill:
        for video in videos:
            entry = read_entry(store_dir, stems[video.relpath], keys[video.relpath])
            if entry is not None:
                report.cached[video.relpath] = entry
        if may_fill:
            # Entries of files this run does not read stay when the dataset has them: another run may train on
            # other episodes (--dataset.episodes) of the same copy, from the same store.
            every = videos if dataset.episodes is None else video_files(dataset, episode_files(dataset, cameras, True))
            with contextlib.suppress(OSError):
                remove_stale(store_dir, {entry_stem(v, file_key(store, v)) for v in every})
            fill(dataset, store_dir, videos, keys, cap_gb, report)
    report.stored_fill_s = sum(e.fill_s for e in report.cached.values())
    if not report.reason and len(report.cached) < len(videos):
        report.reason = "the store was being filled by a process that could not finish it"
    if report.cached:
        reader = dataset.reader
        entries = {path: report.cached[path] for path in report.cached}
        reader._query_videos = CachedVideoQuery(reader, table, entries)
    return report


def fill(
    dataset: Any, store_dir: Path, videos: list[VideoFile], keys: dict[str, dict], cap_gb: float | None, report: Report
) -> None:
    """Decode the files missing from the store while they fit in the cap and the filesystem."""
    cap = None if cap_gb is None else int(cap_gb * 2**30)
    start = time.perf_counter()
    skipped: list[str] = []
    for video in videos:
        if video.relpath in report.cached:
            continue
        room = free_room(store_dir)
        if cap is not None:
            room = min(room, cap - report.bytes_cached)
        if video.bytes_estimate > room:
            skipped.append(video.relpath)
            continue
        try:
            report.cached[video.relpath] = fill_entry(dataset, store_dir, video, keys[video.relpath], room)
            report.filled_now += 1
        except CacheFull:
            skipped.append(video.relpath)
        except NotExact as error:
            report.reason = str(error)
            log.warning("Frame cache: %s; the files not yet in the store are decoded from video", report.reason)
            break
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            report.reason = f"writing {store_dir} failed ({error.strerror or error}{', disk full' if full else ''})"
            log.warning("Frame cache: %s; the files not yet in the store are decoded from video", report.reason)
            break
        except Exception as error:  # a file the cache cannot reproduce exactly is decoded by lerobot
            report.reason = f"{video.relpath} not cached: {error}"
            log.warning("Frame cache: %s", report.reason)
    report.fill_s = time.perf_counter() - start
    if skipped and not report.reason:
        needed = sum(v.bytes_estimate for v in videos)
        limit = (
            f"--frame_cache_gb {cap_gb:g} holds {_size(report.bytes_cached)} of the {_size(needed)} needed"
            if cap is not None and cap < needed
            else f"{store_dir.parent} has {_size(free_room(store_dir))} free beyond a reserve"
        )
        report.reason = f"{len(skipped)} files did not fit ({limit})"
