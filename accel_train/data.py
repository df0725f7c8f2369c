"""Dataset loading and a data order that can be resumed exactly.

lerobot-train resumes with the wrong order after the first epoch (Accelerate's prepared loader resets the
sampler's epoch) and with augmentations that depend on when the loader was created. Here the order and every
sample's augmentation are pure functions of (seed, epoch, position in the epoch), so the loader can be rebuilt
at any optimizer step, with any number of workers, and yield the same samples with the same augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from lerobot.configs.policies import PreTrainedConfig
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.sampler import EpisodeAwareSampler
from lerobot.transforms import ImageTransforms, ImageTransformsConfig

from accel_train import frame_cache
from accel_train.config import TrainConfig
from accel_train.errors import TrainError, first_line
from accel_train.mix import DatasetMix, EpisodeOrder, MixedOrder, epoch_counts, source_seed
from accel_train.sources import DatasetSource
from accel_train.streaming import StreamedDataset, at_commit, streamed_metadata

EpochOrder = EpisodeOrder | MixedOrder

log = logging.getLogger(__name__)


@functools.cache
def choose_video_backend(requested: str | None = None) -> str:
    """torchcodec when its FFmpeg libraries load, else PyAV; decided once, up front.

    lerobot would try torchcodec per file and print a long traceback before falling back.
    """
    if requested:
        return requested
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as error:  # missing wheel, or the FFmpeg shared libraries do not load
        reason = str(error).splitlines()[0].removesuffix(" Likely causes:").rstrip(".")
        log.info("Video decoding with PyAV (torchcodec unavailable: %s; it needs FFmpeg's shared libraries)", reason)
        return "pyav"
    return "torchcodec"


def load_datasets(sources: list[DatasetSource], cfg: TrainConfig, image_transforms: ImageTransformsConfig) -> list[Any]:
    """Every dataset of the run, opened with the policy's frame offsets; one error naming each that cannot be had."""
    datasets, unreachable = [], []
    for source in sources:
        try:
            datasets.append(
                load_dataset(source, cfg.policy, image_transforms, cfg.dataset.video_backend, cfg.dataset.streaming)
            )
        except DatasetUnreachable as error:
            unreachable.append(str(error))
    if unreachable:
        raise TrainError(
            " ".join(unreachable) + " Without network access, pass --dataset.root DIR (or --dataset_root; one per "
            "dataset) pointing at a local copy of a LeRobot dataset, or train on the embedded demo: "
            "`python -m accel_train.demo_dataset --root data/piper_demo` and "
            "`--dataset.repo_id local/piper_demo --dataset.root data/piper_demo` "
            "(or use --config configs/demo.yaml)."
        )
    return datasets


class DatasetUnreachable(Exception):
    """A dataset that could not be opened, locally or from the Hub."""


def load_dataset(
    source: DatasetSource,
    policy_cfg: PreTrainedConfig,
    image_transforms: ImageTransformsConfig,
    video_backend: str | None,
    streaming: bool = False,
) -> LeRobotDataset:
    """Open one LeRobot dataset (its chosen episodes, at its revision) with the policy's frame offsets: a local
    or downloaded copy, or with `streaming` read from where it lies (accel_train.streaming)."""
    from huggingface_hub.errors import RevisionNotFoundError
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    unreachable = f"Could not load the dataset '{source.repo_id}' " + (
        f"in {source.root}" if source.root else "locally or on the Hugging Face Hub"
    )
    try:
        if streaming:
            meta, files = streamed_metadata(source)
        else:
            meta = LeRobotDatasetMetadata(source.repo_id, root=source.root, revision=source.revision)
    except RevisionNotFoundError:
        raise TrainError(
            f"The dataset '{source.repo_id}' has no revision '{source.revision}' (--dataset.revision, or the commit a "
            "resumed checkpoint read it at): give a branch, tag or commit of its Hub repo."
        ) from None
    except TrainError:
        raise
    except Exception as error:
        raise DatasetUnreachable(f"{unreachable} ({first_line(error)}).") from None
    episodes = chosen_episodes(source, meta.total_episodes)
    frames = {
        "episodes": episodes,
        "delta_timestamps": resolve_delta_timestamps(policy_cfg, meta),
        "image_transforms": ImageTransforms(image_transforms) if image_transforms.enable else None,
    }
    try:
        if streaming:
            return StreamedDataset(meta, files, **frames)
        return LeRobotDataset(
            source.repo_id, root=source.root, revision=source.revision,
            video_backend=choose_video_backend(video_backend), return_uint8=True, **frames,
        )  # fmt: skip
    except Exception as error:
        raise DatasetUnreachable(f"{unreachable} ({first_line(error)}).") from None


def chosen_episodes(source: DatasetSource, total: int) -> list[int] | None:
    """--dataset.episodes, sorted and checked against the dataset's episode count."""
    if source.episodes is None:
        return None
    if not source.episodes:
        raise TrainError(f"--dataset.episodes for '{source.repo_id}' is an empty list: name episodes to train on.")
    outside = sorted({e for e in source.episodes if not 0 <= e < total})
    if outside:
        raise TrainError(
            f"--dataset.episodes names episode(s) {', '.join(map(str, outside))}, but the dataset '{source.repo_id}' "
            f"has {total} episodes (0 to {total - 1})."
        )
    return sorted(set(source.episodes))


@dataclass
class DataPosition:
    """Where the global data stream stands: the epoch and how many of its samples were consumed."""

    epoch: int = 0
    sample: int = 0

    def advanced(self, step_samples: int, epoch_samples: int) -> DataPosition:
        """The position after one optimizer step."""
        return DataPosition(self.epoch, self.sample + step_samples).fitted(step_samples, epoch_samples)

    def fitted(self, step_samples: int, epoch_samples: int) -> DataPosition:
        """This position, or the next epoch's start when a whole step no longer fits in this epoch."""
        if self.sample + step_samples > epoch_samples:
            return DataPosition(self.epoch + 1, 0)
        return self


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint32)[0])


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step takes its samples: `accumulation` micro-batches of `batch_size` on each of
    `world_size` ranks."""

    batch_size: int
    accumulation: int
    world_size: int

    @property
    def samples(self) -> int:
        return self.batch_size * self.accumulation * self.world_size


class ResumableBatchSampler:
    """Endless micro-batches of (frame index, sample seed) for one rank, starting at a DataPosition.

    Each optimizer step takes `shape.samples` consecutive positions of the epoch's permutation: micro-batch m of
    rank r gets the slice (m * world_size + r) * batch_size. So batch B with accumulation 2 sees the same samples
    as batch 2B, ranks never overlap, and a run resumed with another number of processes continues at the same
    position without feeding seen samples again. The order of each epoch is a function of seed and epoch
    (accel_train.mix: one dataset's EpisodeOrder or a MixedOrder).
    """

    def __init__(self, order: EpochOrder, shape: StepShape, rank: int, seed: int, start: DataPosition):
        self.order, self.shape = order, shape
        self.rank, self.seed, self.start = rank, seed, start
        self.step_samples = shape.samples
        if self.step_samples > len(order):
            raise TrainError(
                f"One optimizer step needs {self.step_samples} samples (batch {shape.batch_size} x "
                f"{shape.world_size} processes x {shape.accumulation} accumulation) but the dataset has only "
                f"{len(order)} usable frames."
            )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        batch, world = self.shape.batch_size, self.shape.world_size
        while True:
            frames = self.order.frames(position.epoch)
            epoch = position.epoch
            while position.epoch == epoch:
                for micro in range(self.shape.accumulation):
                    first = position.sample + (micro * world + self.rank) * batch
                    yield [(frames[i], sample_seed(self.seed, epoch, i)) for i in range(first, first + batch)]
                position = position.advanced(self.step_samples, len(frames))


class SeededSamples(torch.utils.data.Dataset):
    """Reads `dataset[index]` under the RNG state of its sample seed, leaving the caller's RNG untouched.

    Image augmentation draws from torch's global RNG; seeding it per sample makes the augmentation the same
    in a worker process or in the main one, before or after a resume.
    """

    def __init__(self, dataset: LeRobotDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def make_dataloader(
    dataset: LeRobotDataset,
    batch_sampler: ResumableBatchSampler,
    num_workers: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """One endless loader for the whole run: workers stay up across epochs and prefetch ahead."""
    return torch.utils.data.DataLoader(
        SeededSamples(dataset),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating the loader then draws nothing from the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


def split_episodes(episodes: list[int], val_episodes: float, seed: int, repo_id: str) -> tuple[list[int], list[int]]:
    """(training, held-out) episodes of `episodes`. `val_episodes` below 1 is a fraction, from 1 a count; the
    held-out ones are drawn with the run's seed, so they are the same in every run and resume of that seed."""
    if val_episodes <= 0:
        return list(episodes), []
    count = max(1, round(val_episodes * len(episodes))) if val_episodes < 1 else int(val_episodes)
    if val_episodes >= 1 and val_episodes != count:
        raise TrainError(f"--val_episodes {val_episodes:g}: give a fraction below 1 or a whole number of episodes.")
    if count >= len(episodes):
        raise TrainError(
            f"--val_episodes {val_episodes:g} holds out {count} of the {len(episodes)} episodes of '{repo_id}', "
            "leaving none to train on."
        )
    chosen = np.random.default_rng(seed).choice(len(episodes), size=count, replace=False).tolist()
    held_out = sorted(episodes[i] for i in chosen)
    return [e for e in episodes if e not in held_out], held_out


def held_out_frames(data: TrainingData, policy_cfg: PreTrainedConfig, max_samples: int) -> list[int]:
    """The frames of the held-out episodes the policy can use (indices of the run's dataset), at most
    `max_samples`, evenly spread."""
    drop = getattr(policy_cfg, "drop_n_last_frames", 0)
    frames = []
    for dataset, offset, episodes in zip(data.datasets, data.offsets, data.held_out, strict=True):
        starts, ends = dataset.meta.episodes["dataset_from_index"], dataset.meta.episodes["dataset_to_index"]
        relative = dataset.absolute_to_relative_idx or {}
        frames += [offset + relative.get(i, i) for e in episodes for i in range(starts[e], ends[e] - drop)]
    if len(frames) > max_samples:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_samples).round().astype(int)]
    return frames


class TimedBatches:
    """The loader's batches, counting the seconds the loop is blocked waiting for them: the data-loading share
    of a step (host time, so it needs no device synchronisation)."""

    def __init__(self, loader: torch.utils.data.DataLoader, step_samples: int):
        self._batches = iter(loader)
        self.step_samples = step_samples  # samples of one optimizer step, over all ranks
        self.wait_s = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        batch = next(self._batches)
        self.wait_s += time.perf_counter() - start
        return batch


def episode_permutation(
    dataset: LeRobotDataset, policy_cfg: PreTrainedConfig, seed: int, episodes: list[int]
) -> EpisodeAwareSampler:
    """lerobot's shuffled, episode-aware permutation of the usable frames of `episodes` (without the last frames
    of each episode that the policy cannot use), one per (seed, epoch)."""
    return EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"],
        dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=episodes,
        drop_n_last_frames=getattr(policy_cfg, "drop_n_last_frames", 0),
        shuffle=True,
        seed=seed,
        absolute_to_relative_idx=dataset.absolute_to_relative_idx,
    )


@dataclass
class TrainingData:
    """The run's datasets as one (a LeRobotDataset, or a DatasetMix of several), each dataset's episodes split
    into trained and held out, and the order of the trained frames."""

    dataset: LeRobotDataset | DatasetMix
    datasets: list[LeRobotDataset]
    sources: list[DatasetSource]
    order: EpochOrder
    held_out: list[list[int]]  # per dataset
    reads: list[DatasetSource]  # the sources as read: streamed ones at their commit (validation reads them too)
    frame_cache: str = "off"  # what the decoded-frame cache does for these datasets, for the start-up summary

    @classmethod
    def load(cls, cfg: TrainConfig, reads: list[DatasetSource] | None = None) -> TrainingData:
        """Every rank: the datasets, their frames read from the decoded-frame cache when --frame_cache is on (the
        first process on a machine fills it, the others wait), their episode splits and the frame order. `reads`:
        the sources as they are read (streamed ones pinned to a commit: `sources_to_read`), default as given."""
        sources = cfg.dataset.sources()
        reads = reads or sources
        datasets, caches = open_datasets(reads, cfg, cfg.dataset.image_transforms)
        trained, held_out = split_each(datasets, sources, cfg.val_episodes, cfg.seed)
        dataset = as_one(datasets, sources)
        if not isinstance(dataset, DatasetMix):
            order = EpisodeOrder(episode_permutation(dataset, cfg.policy, cfg.seed, trained[0]))
        else:
            orders = [
                EpisodeOrder(episode_permutation(d, cfg.policy, source_seed(cfg.seed, i), t))
                for i, (d, t) in enumerate(zip(datasets, trained, strict=True))
            ]
            counts = epoch_counts([len(o) for o in orders], [s.weight for s in sources])
            order = MixedOrder(orders, dataset.offsets[:-1], counts, cfg.seed)
        cache = (
            "off (a streamed dataset reads byte ranges of its videos)"
            if cfg.dataset.streaming
            else "; ".join(dict.fromkeys(c.describe() for c in caches))
        )
        return cls(dataset, datasets, sources, order, held_out, reads, cache)

    @property
    def offsets(self) -> list[int]:
        return self.dataset.offsets[:-1] if isinstance(self.dataset, DatasetMix) else [0]

    @property
    def title(self) -> str:
        """The datasets' name for the start-up summary, with the commit each streamed one is read at."""
        commits = [d.commit[:12] for d in self.datasets if getattr(d, "commit", None)]
        return self.dataset.repo_id + (f" (streamed at commit {', '.join(commits)})" if commits else "")

    @property
    def epoch_samples(self) -> int:
        return len(self.order)

    def describe(self) -> list[dict[str, Any]]:
        """The mix as the checkpoint records it: each dataset, its episodes and its samples per epoch (and the
        commit a streamed one was read at)."""
        counts = self.order.counts if isinstance(self.order, MixedOrder) else [len(self.order)]
        return [
            {"repo_id": s.repo_id, "root": str(s.root) if s.root else None, "revision": s.revision,
             "episodes": s.episodes, "weight": s.weight, "rename_map": s.rename_map, "epoch_samples": n,
             **({"commit": d.commit} if getattr(d, "commit", None) else {})}
            for s, d, n in zip(self.sources, self.datasets, counts, strict=True)
        ]  # fmt: skip

    def batches(self, cfg: TrainConfig, accelerator: Accelerator, start: DataPosition) -> TimedBatches:
        """This rank's micro-batches from `start` on, through one loader that lives for the whole run."""
        shape = StepShape(cfg.batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes)
        sampler = ResumableBatchSampler(self.order, shape, accelerator.process_index, cfg.seed, start)
        pin_memory = accelerator.device.type == "cuda"
        return TimedBatches(make_dataloader(self.dataset, sampler, cfg.num_workers, pin_memory), shape.samples)


def open_datasets(
    sources: list[DatasetSource], cfg: TrainConfig, image_transforms: ImageTransformsConfig
) -> tuple[list[LeRobotDataset], list[frame_cache.Report]]:
    """The datasets, each reading its frames from the decoded-frame cache when --frame_cache is on (the first
    process on a machine fills it, the others wait; a filled store is a lookup)."""
    datasets = load_datasets(sources, cfg, image_transforms)
    caches = [frame_cache.attach(d, cfg.frame_cache, cfg.frame_cache_dir, cfg.frame_cache_gb) for d in datasets]
    return datasets, caches


def sources_to_read(
    cfg: TrainConfig, accelerator: Accelerator, saved: list[dict[str, Any]] | None
) -> list[DatasetSource]:
    """The run's sources as every process reads them: each streamed one pinned to a commit, the one a resumed
    checkpoint recorded or the one its revision names now, resolved by the main process for all (a branch that
    moves during start-up must not split the ranks)."""
    from accelerate.utils import broadcast_object_list

    sources = cfg.dataset.sources()
    if not cfg.dataset.streaming:
        return sources
    pinned = [at_commit(s) for s in at_saved_commits(sources, saved or [])] if accelerator.is_main_process else None
    return broadcast_object_list([pinned])[0]


def at_saved_commits(sources: list[DatasetSource], saved: list[dict[str, Any]]) -> list[DatasetSource]:
    """The sources, each streamed dataset that the resumed checkpoint read at a commit (the same repo at the same
    revision in the same place of the mix) pinned to that commit: a branch that moved on since does not change
    the data of a resumed run."""
    reads = list(sources)
    for i, (source, entry) in enumerate(zip(sources, saved, strict=False)):
        same = (entry.get("repo_id"), entry.get("revision")) == (source.repo_id, source.revision)
        if same and entry.get("commit") and source.root is None:
            log.info("Streaming %s at commit %s, as the checkpoint did", source.repo_id, entry["commit"])
            reads[i] = dataclasses.replace(source, revision=entry["commit"])
    return reads


def as_one(datasets: list[LeRobotDataset], sources: list[DatasetSource]) -> LeRobotDataset | DatasetMix:
    """The datasets behind one index: a single dataset without renaming as itself, others as a DatasetMix."""
    if len(sources) == 1 and not sources[0].rename_map:
        return datasets[0]
    return DatasetMix(datasets, sources)


def split_each(
    datasets: list[LeRobotDataset], sources: list[DatasetSource], val_episodes: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Each dataset's (trained, held-out) episodes, drawn with its own seed: the run's for the first, as for one
    dataset, one derived from it for the others."""
    splits = [
        split_episodes(all_episodes(d), val_episodes, seed if i == 0 else source_seed(seed, i), s.repo_id)
        for i, (d, s) in enumerate(zip(datasets, sources, strict=True))
    ]
    return [t for t, _ in splits], [h for _, h in splits]


def all_episodes(dataset: LeRobotDataset) -> list[int]:
    """The episodes a dataset was opened with (all of them unless --dataset.episodes chose some)."""
    return list(dataset.episodes) if dataset.episodes is not None else list(range(dataset.meta.total_episodes))


def images_to_float(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the batch to the device, then turn uint8 camera frames into floats in [0, 1] there (4x less copying)."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.dtype == torch.uint8:
                value = value.float().div_(255)
        moved[key] = value
    return moved
