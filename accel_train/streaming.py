"""Streaming a LeRobot dataset from the Hub (`--dataset.streaming=true`): training without downloading it.

A streamed dataset is a map-style LeRobotDataset whose files stay on the Hub:
- its metadata (meta/: info, stats, tasks, the episodes table) is downloaded as for any dataset, at the commit
  the revision resolved to when the run started;
- the tabular columns of the chosen episodes (indices, timestamps, states, actions: tens of bytes a frame) are
  read from data/*.parquet into memory once, at start;
- camera frames are read on demand: each sample's frames are decoded from byte ranges of the remote video files
  (huggingface_hub's HfFileSystem, pinned to that commit), each loader worker keeping a bounded block cache of the
  files it reads. Nothing under data/ or videos/ is written to disk.

Why not lerobot's StreamingLeRobotDataset: its order is an iterator (a shuffle buffer over shards) whose state
cannot be saved, so its resume restarts the stream; it augments with the global RNG, does not split the stream
across processes or workers, and decodes only with torchcodec. As a map-style dataset, a streamed one takes the
trainer's order (a pure function of seed, epoch and position), per-sample seeds, process slicing and exact resume
unchanged, and its frames are the ones lerobot's PyAV decoder gives from a downloaded copy: a streamed run is
bit-identical to the same run on a downloaded copy, and resumes at the sample where its checkpoint was taken.

With `--dataset.root`, as in lerobot, the folder's files are read in place (a copy on a shared filesystem).
Streaming needs video cameras (image features live inside the parquet rows) and RGB, not depth, videos.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.table import InMemoryTable, table_cast
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.datasets.dataset_reader import DatasetReader
from lerobot.datasets.feature_utils import get_hf_features_from_features
from lerobot.datasets.io_utils import hf_transform_to_torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import FrameTimestampError

from accel_train.errors import TrainError, first_line
from accel_train.sources import DatasetSource

log = logging.getLogger(__name__)

# One range request. lerobot encodes a keyframe every 2 frames, so a random sample needs tens of KiB of each camera's
# file: 256 KiB blocks fetch a quarter of the bytes 2 MiB blocks do for under twice the requests
# (benchmarks/stream_blocks.py, docs/benchmarks_stream_blocks.md).
BLOCK_BYTES = 256 * 2**10
BLOCKS_PER_FILE = 32  # a file's block cache (8 MiB), in each loader worker; the file's header stays among them
OPEN_FILES = 16  # files kept open in each loader worker (least recently used closed first)
WHOLE_BLOCK_BYTES = 16 * 2**20  # range requests of a data file read once, at start
_FORKED = threading.Lock()  # one thread of a forked worker drops the parent's file objects


class RemoteFiles:
    """The dataset's files under `base` (`hf://datasets/REPO@COMMIT` or a local folder), opened on demand.

    Each process (loader workers are forked or spawned) opens its own file objects, at most OPEN_FILES of them,
    each with an LRU cache of BLOCKS_PER_FILE blocks of BLOCK_BYTES.
    """

    def __init__(self, base: str, commit: str | None = None):
        self.base, self.commit = base, commit
        self._open: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the cameras of a sample are read in parallel threads

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "commit": self.commit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["base"], state["commit"])

    def open(self, relpath: str) -> Any:
        """The open file (one thread at a time reads it: a sample's cameras are different files)."""
        if self._pid != os.getpid():  # a forked worker: the parent's file objects are not ours to use
            with _FORKED:
                if self._pid != os.getpid():
                    self.__init__(self.base, self.commit)
        with self._lock:
            if relpath in self._open:
                self._open.move_to_end(relpath)
                return self._open[relpath]
            if len(self._open) >= OPEN_FILES:
                self._open.popitem(last=False)[1].close()
            file = self._open[relpath] = _open_file(
                f"{self.base}/{relpath}", block_size=BLOCK_BYTES, cache_type="blockcache",
                cache_options={"maxblocks": BLOCKS_PER_FILE},
            )  # fmt: skip
            return file

    def read_whole(self, relpath: str) -> Any:
        """A file read once from start to end (a data file), outside the LRU: closed by the caller."""
        return _open_file(f"{self.base}/{relpath}", block_size=WHOLE_BLOCK_BYTES)


def _open_file(path: str, **cache: Any) -> Any:
    """A local file, or a Hub file (`hf://...`) read in byte ranges with these cache options."""
    if not path.startswith("hf://"):
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    from huggingface_hub import HfFileSystem

    return HfFileSystem().open(path.removeprefix("hf://"), "rb", **cache)


def decode_frames(file: Any, name: str, timestamps: list[float], tolerance_s: float) -> torch.Tensor:
    """The uint8 CHW frames nearest to `timestamps`, as lerobot's decode_video_frames_pyav returns them: seek to
    the keyframe before the first (with one frame's margin), decode forward to the last, take the nearest decoded
    frame of each and refuse one farther than tolerance_s. lerobot's function opens a path only; this reads a file
    object, so that a remote file is read in byte ranges."""
    first, last = min(timestamps), max(timestamps)
    frames: list[torch.Tensor] = []
    loaded: list[float] = []
    file.seek(0)
    with av.open(file) as container:
        stream = container.streams.video[0]
        container.seek(round(first / stream.time_base) - 1, backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous())
            loaded.append(float(frame.pts * stream.time_base))
            if loaded[-1] >= last:
                break
    if not frames:
        raise FrameTimestampError(f"No frames decoded in [{first}, {last}] of {name}.")
    distance, nearest = torch.cdist(torch.tensor(timestamps)[:, None], torch.tensor(loaded)[:, None], p=1).min(1)
    if not (distance < tolerance_s).all():
        raise FrameTimestampError(
            f"Timestamps {timestamps} of {name} have no frame within {tolerance_s} s (nearest {loaded})."
        )
    return torch.stack([frames[i] for i in nearest])


def unreadable(repo_id: str, path: str, error: Exception) -> TrainError:
    """A streamed file that could not be read mid-run (after huggingface_hub's retries of transient errors)."""
    return TrainError(
        f"Reading {path} of the streamed dataset '{repo_id}' failed ({first_line(error)}); transient errors were "
        "retried. The last complete checkpoint is intact: rerun with --resume_from_checkpoint latest once the files "
        "can be read."
    )


class StreamedReader(DatasetReader):
    """lerobot's DatasetReader with its two reads from disk replaced: the parquet rows and the video frames."""

    def __init__(self, files: RemoteFiles, **kwargs: Any):
        super().__init__(**kwargs)
        self.files = files

    def _load_hf_dataset(self) -> datasets.Dataset:
        """The chosen episodes' rows of the data files, as lerobot's load_nested_dataset gives them from disk."""
        meta = self._meta
        episodes = self.episodes if self.episodes is not None else range(meta.total_episodes)
        paths = sorted({str(meta.get_data_file_path(e)) for e in episodes})
        tables = []
        for path in paths:  # at start-up: an error here is the dataset's being unreachable (data.load_dataset)
            with self.files.read_whole(path) as file:
                tables.append(pq.read_table(file))
        table = pa.concat_tables(tables, promote_options="default")
        if self.episodes is not None:
            table = table.filter(pc.is_in(table["episode_index"], pa.array(self.episodes, table["episode_index"].type)))
        features = get_hf_features_from_features(meta.features)
        dataset = datasets.Dataset(InMemoryTable(table_cast(table, features.arrow_schema)))
        dataset.set_transform(hf_transform_to_torch)
        return dataset

    def _query_videos(self, query_timestamps: dict[str, list[float]], ep_idx: int) -> dict[str, torch.Tensor]:
        """Each camera's frames, the cameras decoded in parallel threads as lerobot's reader does (decoding
        releases the GIL)."""
        ep = self._meta.episodes[ep_idx]

        def decode(key: str, timestamps: list[float]) -> torch.Tensor:
            path = str(self._meta.get_video_file_path(ep_idx, key))
            shifted = [ep[f"videos/{key}/from_timestamp"] + t for t in timestamps]
            try:
                return decode_frames(self.files.open(path), path, shifted, self._tolerance_s).squeeze(0)
            except FrameTimestampError:
                raise  # the data, not the stream: as lerobot reports it for a local copy
            except Exception as error:
                raise unreadable(self._meta.repo_id, path, error) from None

        if len(query_timestamps) <= 1:
            return {key: decode(key, timestamps) for key, timestamps in query_timestamps.items()}
        with ThreadPoolExecutor(max_workers=len(query_timestamps)) as pool:
            futures = {key: pool.submit(decode, key, timestamps) for key, timestamps in query_timestamps.items()}
            return {key: future.result() for key, future in futures.items()}


class StreamedDataset(LeRobotDataset):
    """A LeRobotDataset read from `files` as StreamedReader reads it; for training (no writing)."""

    def __init__(
        self,
        meta: LeRobotDatasetMetadata,
        files: RemoteFiles,
        episodes: list[int] | None,
        delta_timestamps: dict[str, list[float]] | None,
        image_transforms: Any,
        tolerance_s: float = 1e-4,
    ):
        # LeRobotDataset.__init__ downloads data/ and videos/ when they are not on disk: set what its read path
        # uses instead (lerobot 0.6's attributes), with the streamed reader.
        torch.utils.data.Dataset.__init__(self)
        self.repo_id, self.meta, self.root, self.revision = meta.repo_id, meta, meta.root, meta.revision
        self._requested_root = None
        self.delta_timestamps, self.tolerance_s, self.episodes = delta_timestamps, tolerance_s, episodes
        self._video_backend, self._return_uint8 = "pyav", True
        self._depth_output_unit = "mm"
        self.image_transforms = image_transforms
        self.writer, self._is_finalized = None, False
        self.reader = StreamedReader(
            files, meta=meta, root=meta.root, episodes=episodes, tolerance_s=tolerance_s, video_backend="pyav",
            delta_timestamps=delta_timestamps, image_transforms=image_transforms, return_uint8=True,
        )  # fmt: skip
        self.reader.load_and_activate()
        self.commit = files.commit  # the Hub commit read; None for a folder read in place


def at_commit(source: DatasetSource) -> DatasetSource:
    """The source with its revision resolved to the Hub commit it names now (lerobot's default revision is its
    codebase version tag), so that every process and every later read see the same files; a local folder, or a
    revision that cannot be resolved (the load then says why), as it is."""
    if source.root is not None:
        return source
    try:
        commit = resolve(source)
    except Exception:
        return source
    if commit != source.revision:
        log.info("Streaming %s at commit %s (revision %s)", source.repo_id, commit, source.revision or "default")
    return dataclasses.replace(source, revision=commit)


def resolve(source: DatasetSource) -> str:
    """The commit of the source's Hub revision; a full commit id is its own (a pinned source is not resolved
    again by every process: one that does not exist fails when its metadata is fetched)."""
    from huggingface_hub import HfApi
    from lerobot.datasets.dataset_metadata import CODEBASE_VERSION
    from lerobot.datasets.utils import get_safe_version, is_valid_version

    if source.revision and re.fullmatch(r"[0-9a-f]{40}", source.revision):
        return source.revision
    revision = source.revision or CODEBASE_VERSION
    if is_valid_version(revision):
        revision = get_safe_version(source.repo_id, revision)
    return HfApi().dataset_info(source.repo_id, revision=revision).sha


def streamed_metadata(source: DatasetSource) -> tuple[LeRobotDatasetMetadata, RemoteFiles]:
    """The dataset's metadata and where its files are read: the Hub at the commit its revision resolves to, or
    `source.root` read in place."""
    if source.root is not None:
        root = Path(source.root).resolve()
        meta = LeRobotDatasetMetadata(source.repo_id, root=root)
        return _streamable(meta), RemoteFiles(str(root))
    commit = resolve(source)
    # force_cache_sync: the metadata of that commit, from the Hub's snapshot cache, never a local copy that
    # happens to lie in HF_LEROBOT_HOME/REPO_ID.
    meta = LeRobotDatasetMetadata(source.repo_id, revision=commit, force_cache_sync=True)
    return _streamable(meta), RemoteFiles(f"hf://datasets/{source.repo_id}@{commit}", commit)


def _streamable(meta: LeRobotDatasetMetadata) -> LeRobotDatasetMetadata:
    """The metadata, or a TrainError naming what a stream cannot read."""
    images = [k for k in meta.camera_keys if k not in meta.video_keys]
    depth = list(meta.depth_keys)
    found = ([f"image features {images} (stored inside its parquet rows)"] if images else []) + (
        [f"depth videos {depth}"] if depth else [])  # fmt: skip
    if found:
        raise TrainError(
            f"--dataset.streaming cannot stream the dataset '{meta.repo_id}': it has {' and '.join(found)}; "
            "streaming reads RGB video cameras. Train from a downloaded copy instead (drop --dataset.streaming)."
        )
    return meta
