"""Which datasets a run trains on: the `dataset` section of the config, in lerobot-train's spelling.

    --dataset.repo_id=REPO [--dataset.root=DIR] [--dataset.episodes='[0,1,5]'] [--dataset.revision=REV]
    --dataset.repo_id='[REPO_A,REPO_B]' --dataset.root='[DIR_A,DIR_B]' [--dataset.weights='[1,2]']
        [--dataset.episodes='[[0,1],[3,4]]'] [--dataset.revision='[v1,main]']

or, in a `--config` YAML, a list of entries (each its own root, episodes, revision, weight and rename_map, which
renames that dataset's keys so that the datasets agree):

    dataset:
      - {repo_id: me/piper_monday, root: data/monday, episodes: [0, 1, 2]}
      - repo_id: me/piper_tuesday
        root: data/tuesday
        rename_map: {observation.images.wrist: observation.images.gripper}

The older flat spellings (`--dataset_id`, `--dataset_root`, `--video_backend`, `--image_transforms.*`, and the
same keys in config files and in checkpoints written before the section existed) are rewritten into the section;
one option given in both spellings with different values is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lerobot.transforms import ImageTransformsConfig

from accel_train.errors import UsageError
from accel_train.flags import flag_value

DEFAULT_REPO_ID = "ISdept/piper_arm"
# Old flat option -> its place in the dataset section.
LEGACY = {
    "dataset_id": "repo_id",
    "dataset_root": "root",
    "video_backend": "video_backend",
    "image_transforms": "image_transforms",
}


@dataclass
class DatasetSource:
    """One dataset of the run, as the loader takes it."""

    repo_id: str
    root: Path | None = None
    # Episode indices to train on (lerobot's --dataset.episodes); None: all of them.
    episodes: list[int] | None = None
    revision: str | None = None
    # Relative share of each epoch's samples; None everywhere: every dataset in proportion to its frames.
    weight: float | None = None
    # This dataset's keys -> the names the run uses, so that the datasets of a mix agree.
    rename_map: dict[str, str] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    # LeRobot dataset repo id, or several as a list; the same repo id may appear twice with different roots.
    repo_id: list[str] | str = DEFAULT_REPO_ID
    # A local copy of each dataset (needed offline): one folder, or a list parallel to repo_id.
    root: list[Path] | Path | None = None
    # Episode indices to train on: a list, or with several datasets a list of lists (one per dataset).
    episodes: list[int] | list[list[int]] | None = None
    # Hub revision (branch, tag or commit) of each dataset: one for all, or a list parallel to repo_id.
    revision: list[str] | str | None = None
    # Relative share of each dataset in every epoch (default: in proportion to the datasets' frames).
    weights: list[float] | None = None
    # Several datasets in a config file, one entry each: {repo_id, root, episodes, revision, weight, rename_map}.
    mix: list[DatasetSource] | None = None
    # Read the datasets where they lie (the Hub, or --dataset.root in place) instead of downloading them: camera
    # frames are decoded from byte ranges of the video files on demand (accel_train/streaming.py).
    streaming: bool = False
    # torchcodec or pyav; empty: torchcodec when its FFmpeg libraries load, else pyav.
    video_backend: Literal["torchcodec", "pyav"] | None = None
    image_transforms: ImageTransformsConfig = field(default_factory=ImageTransformsConfig)

    def sources(self) -> list[DatasetSource]:
        """The datasets to train on, one entry each; a UsageError when the lists do not line up."""
        if self.mix:
            flat = [name for name in ("root", "episodes", "revision", "weights") if getattr(self, name) is not None]
            if flat or self.repo_id != DEFAULT_REPO_ID:
                given = ", ".join(f"--dataset.{name}" for name in ["repo_id", *flat] if name != "repo_id" or
                                  self.repo_id != DEFAULT_REPO_ID)  # fmt: skip
                raise UsageError(
                    f"The dataset section lists its datasets as entries (dataset.mix) and also sets {given}: "
                    "give each entry its own repo_id, root, episodes, revision and weight instead."
                )
            return list(self.mix)
        repo_ids = self.repo_id if isinstance(self.repo_id, list) else [self.repo_id]
        if not repo_ids:
            raise UsageError("--dataset.repo_id is an empty list: name at least one dataset.")
        roots = _per_dataset("root", self.root, repo_ids, Path)
        revisions = _per_dataset("revision", self.revision, repo_ids, str, shared=True)
        episodes = _per_dataset_episodes(self.episodes, repo_ids)
        weights = _per_dataset("weights", self.weights, repo_ids, float)
        return [
            DatasetSource(repo_id, root, eps, revision, weight)
            for repo_id, root, eps, revision, weight in zip(repo_ids, roots, episodes, revisions, weights, strict=True)
        ]


def _per_dataset(name: str, value: Any, repo_ids: list[str], kind: type, shared: bool = False) -> list[Any]:
    """A list-or-single option as one value per dataset; a single value applies to every dataset when `shared`
    (a revision), else only to a single dataset (a root)."""
    if value is None:
        return [None] * len(repo_ids)
    if not isinstance(value, list):
        if not shared and len(repo_ids) > 1:
            raise UsageError(
                f"--dataset.{name} gives one value for {len(repo_ids)} datasets ({', '.join(repo_ids)}): give a list "
                f"with one per dataset, in the same order, e.g. --dataset.{name}='[A,B]'."
            )
        return [kind(value)] * len(repo_ids)
    if len(value) != len(repo_ids):
        raise UsageError(
            f"--dataset.{name} has {len(value)} values but --dataset.repo_id names {len(repo_ids)} datasets "
            f"({', '.join(repo_ids)}): give one per dataset, in the same order."
        )
    return [kind(v) for v in value]


def _per_dataset_episodes(episodes: Any, repo_ids: list[str]) -> list[list[int] | None]:
    """--dataset.episodes: a list of indices for one dataset, a list of lists for several."""
    if episodes is None:
        return [None] * len(repo_ids)
    nested = bool(episodes) and all(isinstance(e, list) for e in episodes)
    if len(repo_ids) == 1 and not nested:
        return [list(episodes)]
    if not nested:
        raise UsageError(
            f"--dataset.episodes gives one list of episodes for {len(repo_ids)} datasets: give one list per dataset, "
            "e.g. --dataset.episodes='[[0,1,2],[4,5]]'."
        )
    return _per_dataset("episodes", episodes, repo_ids, list)


def upgrade_layer(layer: dict[str, Any], where: str) -> dict[str, Any]:
    """A config layer (a config file's dict, or a checkpoint's train_config.json) with the old flat dataset keys
    moved into its dataset section, and a list under `dataset:` read as the entries of a mix."""
    layer = dict(layer)
    section = layer.get("dataset")
    if isinstance(section, list):
        section = {"mix": section}
    section = dict(section or {})
    for old, new in LEGACY.items():
        if old not in layer:
            continue
        value = layer.pop(old)
        if new in section and section[new] != value and not (old == "image_transforms" and value == {}):
            raise UsageError(
                f"{where} sets both {old} ({value}) and dataset.{new} ({section[new]}): they are the same option "
                f"in two spellings. Keep dataset.{new}."
            )
        section.setdefault(new, value)
    if section:
        layer["dataset"] = section
    return layer


def upgrade_flags(args: list[str]) -> list[str]:
    """Flags with the old flat dataset spellings rewritten into the section (`--dataset_id X` ->
    `--dataset.repo_id=X`). The last value of a flag wins, as in argparse; the same option given in both
    spellings with different last values is an error."""
    out, i, old_values = [], 0, {}
    while i < len(args):
        arg, i = args[i], i + 1
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        head, dot, rest = name.partition(".")
        if head not in LEGACY or (dot and head != "image_transforms"):
            out.append(arg)
            continue
        if not eq and i < len(args) and not args[i].startswith("--"):
            value, eq, i = args[i], "=", i + 1
        new = f"dataset.{LEGACY[head]}{dot}{rest}"
        old_values[new] = (name, value)
        out.append(f"--{new}{eq}{value}")
    for new, (old, value) in old_values.items():
        given = flag_value(args, new)
        if given is not None and given.rstrip("/") != value.rstrip("/"):
            raise UsageError(
                f"--{old}={value} and --{new}={given} are the same option in two spellings, given different "
                f"values: give one (--{new} is lerobot-train's)."
            )
    return out


SELECTION = ("repo_id", "root", "episodes", "revision", "weights", "mix")


def replace_selection(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """A lower config layer without its choice of datasets when the layer above names other datasets (another
    repo_id, or entries): a new choice replaces the old one whole, as a new policy type replaces its section,
    instead of mixing the old roots, episodes or entries with the new datasets."""
    below = lower.get("dataset") or {}
    renamed = any(key in upper and upper[key] != below.get(key) for key in ("repo_id", "mix"))
    if not renamed or not below:
        return lower
    return {**lower, "dataset": {k: v for k, v in below.items() if k not in SELECTION}}


def flag_section(args: list[str]) -> dict[str, Any]:
    """The dataset choice the flags make (repo_id, mix), parsed as draccus parses a flag's value."""
    from draccus.cfgparsing import parse_string

    values = {key: flag_value(args, f"dataset.{key}") for key in ("repo_id", "mix")}
    return {key: parse_string(value) for key, value in values.items() if value is not None}


def dataset_ids(train_config: dict[str, Any]) -> list[str]:
    """The repo ids a saved train_config.json trained on, in either spelling."""
    section = upgrade_layer(train_config, "train_config.json").get("dataset") or {}
    if section.get("mix"):
        return list(dict.fromkeys(entry["repo_id"] for entry in section["mix"]))
    repo_id = section.get("repo_id", DEFAULT_REPO_ID)
    return list(dict.fromkeys(repo_id if isinstance(repo_id, list) else [repo_id]))
