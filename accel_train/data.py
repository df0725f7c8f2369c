"""Dataset loading and a data order that can be resumed exactly.

lerobot-train resumes with the wrong order after the first epoch (Accelerate's prepared loader resets the
sampler's epoch) and with augmentations that depend on when the loader was created. Here the order and every
sample's augmentation are pure functions of (seed, epoch, position in the epoch), so the loader can be rebuilt
at any optimizer step, with any number of workers, and yield the same samples with the same augmentation.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
from accel_train.errors import TrainError

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


def load_dataset(
    repo_id: str,
    root: Path | None,
    policy_cfg: PreTrainedConfig,
    image_transforms: ImageTransformsConfig,
    video_backend: str | None,
) -> LeRobotDataset:
    """Open the LeRobot dataset with the policy's frame offsets; a clear error when it cannot be had."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    try:
        meta = LeRobotDatasetMetadata(repo_id, root=root)
        return LeRobotDataset(
            repo_id,
            root=root,
            delta_timestamps=resolve_delta_timestamps(policy_cfg, meta),
            image_transforms=ImageTransforms(image_transforms) if image_transforms.enable else None,
            video_backend=choose_video_backend(video_backend),
            return_uint8=True,
        )
    except Exception as error:
        where = f"in {root}" if root else "locally or on the Hugging Face Hub"
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TrainError(
            f"Could not load the dataset '{repo_id}' {where} ({type(error).__name__}: {cause}). "
            "Without network access, pass --dataset_root DIR pointing at a local copy of a LeRobot dataset, "
            "or train on the embedded demo: `python -m accel_train.demo_dataset --root data/piper_demo` and "
            "`--dataset_id local/piper_demo --dataset_root data/piper_demo` (or use --config configs/demo.yaml)."
        ) from None


@dataclass
class DataPosition:
    """Where the global data stream stands: the epoch and how many of its samples were consumed."""

    epoch: int = 0
    sample: int = 0

    def advanced(self, step_samples: int, epoch_samples: int) -> DataPosition:
        """The position after one optimizer step; an epoch ends when a whole step no longer fits."""
        sample = self.sample + step_samples
        if sample + step_samples > epoch_samples:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, sample)


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
    position without feeding seen samples again. The permutation of each epoch is lerobot's EpisodeAwareSampler
    (a function of seed and epoch).
    """

    def __init__(self, permutation: EpisodeAwareSampler, shape: StepShape, rank: int, seed: int, start: DataPosition):
        self.permutation, self.shape = permutation, shape
        self.rank, self.seed, self.start = rank, seed, start
        self.step_samples = shape.samples
        if self.step_samples > len(permutation):
            raise TrainError(
                f"One optimizer step needs {self.step_samples} samples (batch {shape.batch_size} x "
                f"{shape.world_size} processes x {shape.accumulation} accumulation) but the dataset has only "
                f"{len(permutation)} usable frames."
            )

    def epoch_frames(self, epoch: int) -> list[int]:
        """The frame indices of `epoch`, in their shuffled order."""
        self.permutation.load_state_dict({"epoch": epoch, "start_index": 0})
        return list(iter(self.permutation))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        batch, world = self.shape.batch_size, self.shape.world_size
        while True:
            frames = self.epoch_frames(position.epoch)
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


def split_episodes(num_episodes: int, val_episodes: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) episode indices. `val_episodes` below 1 is a fraction, from 1 a count; the held-out
    ones are drawn with the run's seed, so they are the same in every run and resume of that seed."""
    if val_episodes <= 0:
        return list(range(num_episodes)), []
    count = max(1, round(val_episodes * num_episodes)) if val_episodes < 1 else int(val_episodes)
    if val_episodes >= 1 and val_episodes != count:
        raise TrainError(f"--val_episodes {val_episodes:g}: give a fraction below 1 or a whole number of episodes.")
    if count >= num_episodes:
        raise TrainError(
            f"--val_episodes {val_episodes:g} holds out {count} of the dataset's {num_episodes} episodes, "
            "leaving none to train on."
        )
    held_out = sorted(np.random.default_rng(seed).choice(num_episodes, size=count, replace=False).tolist())
    return [e for e in range(num_episodes) if e not in held_out], held_out


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
    """The dataset, its episodes split into trained and held out, and the permutation of the trained frames."""

    dataset: LeRobotDataset
    permutation: EpisodeAwareSampler
    held_out: list[int]
    frame_cache: str = "off"  # what the decoded-frame cache does for this dataset, for the start-up summary

    @classmethod
    def load(cls, cfg: TrainConfig) -> TrainingData:
        """Every rank: the dataset, its frames read from the decoded-frame cache when --frame_cache is on (the
        first process on a machine fills it, the others wait), its episode split and frame permutation."""
        dataset = load_dataset(cfg.dataset_id, cfg.dataset_root, cfg.policy, cfg.image_transforms, cfg.video_backend)
        cache = frame_cache.attach(dataset, cfg.frame_cache, cfg.frame_cache_dir, cfg.frame_cache_gb)
        trained, held_out = split_episodes(dataset.meta.total_episodes, cfg.val_episodes, cfg.seed)
        permutation = episode_permutation(dataset, cfg.policy, cfg.seed, trained)
        return cls(dataset, permutation, held_out, cache.describe())

    @property
    def epoch_samples(self) -> int:
        return len(self.permutation)

    def batches(self, cfg: TrainConfig, accelerator: Accelerator, start: DataPosition) -> TimedBatches:
        """This rank's micro-batches from `start` on, through one loader that lives for the whole run."""
        shape = StepShape(cfg.batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes)
        sampler = ResumableBatchSampler(self.permutation, shape, accelerator.process_index, cfg.seed, start)
        pin_memory = accelerator.device.type == "cuda"
        return TimedBatches(make_dataloader(self.dataset, sampler, cfg.num_workers, pin_memory), shape.samples)


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
