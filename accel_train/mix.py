"""Several LeRobot datasets trained on as one, and each epoch's order over them.

lerobot's MultiLeRobotDataset takes one root for all datasets and no per-dataset episodes or renaming, and
lerobot-train refuses several datasets; this is the part it lacks. Frame indices of the mix are the datasets'
own indices (relative, when a dataset loads a subset of episodes) shifted by the frames of the datasets before
it. Normalisation statistics are lerobot's `aggregate_stats` over the datasets, after renaming.

The order of an epoch is a pure function of (seed, epoch): dataset i contributes `count_i` samples, the next
ones of its own endless stream of episode-aware permutations (lerobot's EpisodeAwareSampler, seeded with
(seed, i)), and the mix is shuffled with a permutation seeded with (seed, epoch). Without weights, count_i is
the dataset's usable frames (each epoch sees every frame once); with weights, each dataset's share of the
epoch's total follows its weight, so a small dataset can be seen several times an epoch, a large one
partly, and every frame still comes round in turn.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from lerobot.datasets.compute_stats import aggregate_stats
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.sampler import EpisodeAwareSampler
from lerobot.processor import rename_stats
from lerobot.utils.feature_utils import dataset_to_policy_features

from accel_train.errors import TrainError
from accel_train.sources import DatasetSource

PAD_SUFFIX = "_is_pad"


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])


class EpisodeOrder:
    """One dataset's epochs: lerobot's episode-aware permutation of its usable frames, per (seed, epoch)."""

    def __init__(self, sampler: EpisodeAwareSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def frames(self, epoch: int) -> list[int]:
        self.sampler.load_state_dict({"epoch": epoch, "start_index": 0})
        return list(iter(self.sampler))


class MixedOrder:
    """The epochs of a mix: `counts[i]` samples of dataset i, drawn in turn from its own orders, shuffled."""

    def __init__(self, orders: list[EpisodeOrder], offsets: list[int], counts: list[int], seed: int):
        self.orders, self.offsets, self.counts, self.seed = orders, offsets, counts, seed

    def __len__(self) -> int:
        return sum(self.counts)

    def frames(self, epoch: int) -> list[int]:
        frames: list[int] = []
        for order, offset, count in zip(self.orders, self.offsets, self.counts, strict=True):
            own_epoch, position = divmod(epoch * count, len(order))
            taken: list[int] = []
            while len(taken) < count:
                taken += order.frames(own_epoch)[position : position + count - len(taken)]
                own_epoch, position = own_epoch + 1, 0
            frames += [offset + f for f in taken]
        shuffle = torch.randperm(len(frames), generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))
        return [frames[i] for i in shuffle.tolist()]


def source_seed(seed: int, index: int) -> int:
    """The seed of dataset `index`'s own permutations in a mix."""
    return _seed(seed, index) % 2**63


def epoch_counts(lengths: list[int], weights: list[float | None]) -> list[int]:
    """Samples each dataset gives an epoch: its usable frames, or with weights, its weight's share of the total."""
    if all(w is None for w in weights):
        return list(lengths)
    if any(w is None for w in weights):
        raise TrainError("Give a weight to every dataset of the mix, or to none.")
    if any(w <= 0 for w in weights):
        raise TrainError(f"Dataset weights must be positive (got {weights}).")
    total = sum(lengths)
    return [max(1, round(total * w / sum(weights))) for w in weights]


class DatasetMix(torch.utils.data.Dataset):
    """Several datasets behind one index, each item under the mix's key names, with its dataset's index."""

    def __init__(self, datasets: list[LeRobotDataset], sources: list[DatasetSource]):
        self.datasets, self.sources = datasets, sources
        self.offsets = [0, *np.cumsum([len(d) for d in datasets]).tolist()]
        self.repo_id = " + ".join(s.repo_id for s in sources)
        self.meta = merged_meta(datasets, sources)
        # lerobot returns video frames as uint8 (return_uint8) but image features as floats in [0, 1]; where a mix
        # has both, every camera comes as a float in [0, 1], or the collated batch would mix the two scales.
        kinds = {ft["dtype"] for d in datasets for ft in d.meta.features.values()} & {"image", "video"}
        self.float_cameras = [k for k, ft in self.meta.features.items() if ft["dtype"] in ("image", "video")] if (
            kinds == {"image", "video"}) else []  # fmt: skip

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        which = int(np.searchsorted(self.offsets, index, side="right")) - 1
        item = self.datasets[which][index - self.offsets[which]]
        rename = self.sources[which].rename_map
        if rename:
            item = {_renamed(key, rename): value for key, value in item.items()}
        for key in self.float_cameras:
            if item[key].dtype == torch.uint8:
                item[key] = item[key].float().div_(255)
        item["dataset_index"] = torch.tensor(which)
        return item


def _renamed(key: str, rename: dict[str, str]) -> str:
    base = key.removesuffix(PAD_SUFFIX)
    return rename.get(base, base) + key[len(base) :]


def renamed_feature_table(dataset: LeRobotDataset, rename: dict[str, str]) -> dict[str, dict]:
    unknown = sorted(set(rename) - set(dataset.meta.features))
    if unknown:
        raise TrainError(
            f"The rename_map of dataset '{dataset.repo_id}' renames {', '.join(unknown)}, which it does not have. "
            f"Its features: {', '.join(sorted(dataset.meta.features))}."
        )
    return {rename.get(key, key): value for key, value in dataset.meta.features.items()}


def check_agree(datasets: list[LeRobotDataset], sources: list[DatasetSource]) -> dict[str, dict]:
    """The features the mix trains on (those of the first dataset, after renaming); a dataset whose policy
    features (observations, action) differ in name, kind or shape, or whose fps differs, is an error. Video and
    image cameras of the same shape agree: the policy sees the same tensor."""
    tables = [renamed_feature_table(d, s.rename_map) for d, s in zip(datasets, sources, strict=True)]
    first = dataset_to_policy_features(tables[0])
    for dataset, source, table in zip(datasets[1:], sources[1:], tables[1:], strict=True):
        here = dataset_to_policy_features(table)
        missing, extra = sorted(set(first) - set(here)), sorted(set(here) - set(first))
        differ = [k for k in sorted(set(first) & set(here)) if _kind(here[k]) != _kind(first[k])]
        problems = [f"it lacks {', '.join(missing)}"] if missing else []
        problems += [f"it has {', '.join(extra)}, which the first lacks"] if extra else []
        problems += [f"{k} is {_kind(here[k])}, not {_kind(first[k])}" for k in differ]
        if dataset.meta.fps != datasets[0].meta.fps:
            problems.append(f"it was recorded at {dataset.meta.fps} fps, not {datasets[0].meta.fps}")
        if problems:
            raise TrainError(
                f"The datasets of the mix differ: '{source.repo_id}' ({source.root or 'from the Hub'}) against the "
                f"first, '{sources[0].repo_id}' ({sources[0].root or 'from the Hub'}): {'; '.join(problems)}. Every "
                "dataset needs the same features after its rename_map (in a config file, give a dataset entry its "
                "own rename_map, e.g. {observation.images.wrist: observation.images.gripper}) and the same fps."
            )
    return tables[0]


def _kind(feature: Any) -> str:
    return f"{feature.type.value} {tuple(feature.shape)}"


def merged_meta(datasets: list[LeRobotDataset], sources: list[DatasetSource]) -> Any:
    """The first dataset's metadata with the mix's features and aggregated statistics, as lerobot's factories
    (make_policy, make_pre_post_processors) take it."""
    features = check_agree(datasets, sources)
    missing = [s.repo_id for d, s in zip(datasets, sources, strict=True) if not d.meta.stats]
    if missing:
        raise TrainError(f"The dataset(s) {', '.join(missing)} have no statistics (meta/stats.json) to normalise with.")
    meta = copy.copy(datasets[0].meta)
    meta.info = dataclasses.replace(
        meta.info,
        features=features,
        total_episodes=sum(d.num_episodes for d in datasets),  # the episodes chosen, not all of each dataset
        total_frames=sum(d.num_frames for d in datasets),
    )
    meta.stats = aggregate_stats(
        [rename_stats(d.meta.stats, s.rename_map) for d, s in zip(datasets, sources, strict=True)]
    )
    return meta
