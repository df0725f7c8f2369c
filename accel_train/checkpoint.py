"""What a checkpoint is: its files, how it is named, found, verified and read, and how it is exported.

Layout of `OUT/checkpoint-<step>/` (the spec's four files first):
    policy.safetensors          unwrapped policy weights
    preprocessor_config.json    lerobot processor pipelines, with their stats
    postprocessor_config.json   (policy_*_step_*.safetensors beside them)
    optimizer_state.pth         optimizer state dict (torch.load(weights_only=True))
    scheduler_state.pth         LR scheduler state, when the policy has a schedule
    scaler_state.pth            fp16 GradScaler state, with --mixed_precision fp16
    config.json                 the policy config (lerobot format)
    train_config.json           the run's full config
    trainer_state.json          format version, step, data position, world size, batch size, ...
    manifest.json               size and sha256 of every file above, written last

With --checkpoint_format sharded, policy.safetensors and optimizer_state.pth are replaced by
    shards/                     every process's part of the policy and optimizer state (accel_train.sharded_checkpoint)
and `accel-train export` writes those two files back from the shards.

Format versions (`format_version` in trainer_state.json): 1, the layout above before the field existed (no
`format_version` key); 2, the same files with the field, written by the symmetric checkpoint registry
(accel_train.checkpoint_parts). This module is the one place that spells the layout's file names.

A folder named `checkpoint-<step>` is complete: writers stage it under `.tmp-checkpoint-<step>` and rename it
when the manifest is written (accel_train.checkpointer). Nothing read from a checkpoint is unpickled.

The RNG needs no file: the trainer re-seeds from (seed, step, rank) at every step and every sample's
augmentation from (seed, epoch, position), so the random streams after step K are the same in a resumed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel_train.data import DataPosition
from accel_train.errors import TrainError
from accel_train.sharded_checkpoint import (  # the shards folder and what is inside it are named there
    SHARDS_DIR,
    export_consolidated,
)

log = logging.getLogger(__name__)

POLICY_FILE = "policy.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
POSTPROCESSOR_FILE = "postprocessor_config.json"
PROCESSOR_FILES = (PREPROCESSOR_FILE, POSTPROCESSOR_FILE)
OPTIMIZER_FILE = "optimizer_state.pth"
SCHEDULER_FILE = "scheduler_state.pth"
SCALER_FILE = "scaler_state.pth"
POLICY_CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's, beside an adapter checkpoint's policy.safetensors
# What save_state writes besides our files, whatever it is shown: one RNG state per process, never needed (above).
ACCELERATE_RNG_FILES = "random_states_*.pkl"
# lerobot's names in a pretrained policy's folder (the export writes them, fine-tuning reads them)
PRETRAINED_WEIGHTS = "model.safetensors"
PRETRAINED_PROCESSORS = ("policy_preprocessor.json", "policy_postprocessor.json")
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
REQUIRED_FILES = (POLICY_FILE, OPTIMIZER_FILE)
NAME = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


def name_for(step: int) -> str:
    """The folder name of the checkpoint of `step` (the inverse of `step_from_name`)."""
    return f"checkpoint-{step}"


@dataclass
class TrainerState:
    """Everything besides tensors that an exact resume needs, stored as json."""

    step: int
    format_version: int = FORMAT_VERSION
    data: DataPosition = field(default_factory=DataPosition)
    samples_seen: int = 0
    seed: int = 0
    num_processes: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    policy_type: str = ""
    # Counters that a policy keeps as plain attributes, outside its state dict, yet that steer its training:
    # {"<module path>.<attribute>": value} (accel_train.checkpointer.MODULE_COUNTERS).
    counters: dict[str, int] = field(default_factory=dict)
    # The datasets trained on, as accel_train.data.TrainingData.describe() gives them: repo id, root, revision,
    # episodes, weight, rename_map and samples per epoch of each (empty in checkpoints written before).
    datasets: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, step_samples: int, epoch_samples: int) -> None:
        """One optimizer step done: `step_samples` more samples seen, the data position moved on."""
        self.step += 1
        self.samples_seen += step_samples
        self.data = self.data.advanced(step_samples, epoch_samples)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        raw = _read_json(path)
        version = raw.setdefault("format_version", 1)  # format 1 had no such field
        if version not in READABLE_FORMATS:
            raise TrainError(
                f"{path} is of checkpoint format {version}; this version of accel-train reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}. Upgrade accel-train (pip install -U accel-train, or pull "
                "the repository) to resume it."
            )
        try:
            return cls(**{**raw, "data": DataPosition(**raw.get("data", {}))})
        except TypeError as error:
            raise TrainError(f"{path} is not a trainer state file of accel-train ({error}).") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainError(f"Could not read {path}: {error}.") from None
    if not isinstance(value, dict):
        raise TrainError(f"{path} does not hold a JSON object.")
    return value


def step_from_name(path: Path) -> int | None:
    match = NAME.match(path.name)
    return int(match.group(1)) if match else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Flush every file, then record its size and sha256: the manifest's presence marks a complete write."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256(path)}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"files": files}, indent=2))
    _fsync(manifest)
    return files


def verify(folder: Path) -> str | None:
    """None when every file of the manifest is there with its size and hash; else what is wrong."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return f"it has no {MANIFEST_FILE} (incomplete, or written by another tool)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes instead of {expected['size']}"
        if sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST_FILE}"
    return None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders under their final names, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(step_from_name(p), p) for p in output_dir.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def clean_temporary(output_dir: Path) -> None:
    """Remove the half-written checkpoints a crash left behind; they are never taken for checkpoints."""
    if output_dir.is_dir():
        for leftover in output_dir.glob(f"{TMP_PREFIX}*"):
            log.warning("Removing %s, left by an interrupted checkpoint write.", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def find_latest(output_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("Skipping %s: %s.", path, problem)
    return None


def resolve(spec: str, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint value -> a checkpoint folder to load (None: start fresh)."""
    if spec == "latest":
        return find_latest(output_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise TrainError(
            f"The checkpoint {path} does not exist. Checkpoints in {output_dir}: "
            f"{', '.join(p.name for _, p in list_checkpoints(output_dir)) or 'none'} "
            "(--resume_from_checkpoint latest picks the newest)."
        )
    if not path.is_dir():
        raise TrainError(f"The checkpoint {path} is a file; pass a checkpoint-<step> folder.")
    missing = [name for name in required_files(path) if not (path / name).exists()]
    if missing:
        raise TrainError(
            f"The checkpoint {path} is missing {' and '.join(missing)}, which resuming needs. Pick another "
            f"checkpoint{_previous_complete(path)}, or --init_from it to start over from its weights."
        )
    if (path / MANIFEST_FILE).exists() and (problem := verify(path)):
        raise TrainError(
            f"The checkpoint {path} is corrupted: {problem}. Resume from an earlier checkpoint"
            f"{_previous_complete(path)}."
        )
    return path


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint holds its policy and optimizer as shards (--checkpoint_format sharded)."""
    return (checkpoint / SHARDS_DIR).is_dir()


def required_files(checkpoint: Path) -> tuple[str, ...]:
    return (SHARDS_DIR,) if is_sharded(checkpoint) else REQUIRED_FILES


def _previous_complete(checkpoint: Path) -> str:
    """The suffix naming the newest complete checkpoint before `checkpoint` in its folder, or "" if none."""
    step = step_from_name(checkpoint)
    for earlier, path in reversed(list_checkpoints(checkpoint.parent)):
        if (step is None or earlier < step) and path != checkpoint and verify(path) is None:
            return f", such as {path} (the newest complete one before it)"
    return ""


def read_state(checkpoint: Path) -> TrainerState | None:
    return TrainerState.from_file(checkpoint / STATE_FILE) if (checkpoint / STATE_FILE).is_file() else None


def resume_step(checkpoint: Path, state: TrainerState | None) -> int:
    """The step a checkpoint continues at: its folder name's number, else its state file's; both must agree."""
    named = step_from_name(checkpoint)
    if named is not None and state is not None and named != state.step:
        raise TrainError(
            f"The checkpoint folder {checkpoint.name} says step {named} but its {STATE_FILE} says step "
            f"{state.step}. Rename the folder to {name_for(state.step)} if it was renamed by mistake."
        )
    if named is None and state is None:
        raise TrainError(
            f"Cannot tell which step {checkpoint} is at: its name is not checkpoint-<step> and it has no "
            f"{STATE_FILE}. Rename it to checkpoint-<step>."
        )
    return named if named is not None else state.step


def read_train_config(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / TRAIN_CONFIG_FILE
    return _read_json(path) if path.is_file() else None


def read_policy_config(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / POLICY_CONFIG_FILE
    return _read_json(path) if path.is_file() else None


def load_tensors(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, so a crafted file runs no code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TrainError(
            f"Refusing to load {path}: it holds Python objects beyond tensors and plain containers, which "
            f"would have to run code to be read ({str(error).splitlines()[0]}). Checkpoints can come from "
            "strangers, so accel-train never unpickles them."
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise TrainError(f"{path} is not a readable torch tensor file ({error}).") from None


# What a lerobot pretrained folder holds under its own names, copied from a checkpoint's files of the same bytes.
EXPORT_COPIES = {
    POLICY_FILE: (PRETRAINED_WEIGHTS, POLICY_FILE),
    PREPROCESSOR_FILE: (PRETRAINED_PROCESSORS[0], PREPROCESSOR_FILE),
    POSTPROCESSOR_FILE: (PRETRAINED_PROCESSORS[1], POSTPROCESSOR_FILE),
    POLICY_CONFIG_FILE: (POLICY_CONFIG_FILE,),
}
# An adapter checkpoint (--peft) holds PEFT's adapter files: its policy file is an adapter_model.safetensors.
ADAPTER_COPIES = {**EXPORT_COPIES, POLICY_FILE: (PEFT_WEIGHTS, POLICY_FILE)}

# Training state a deployed model does not need (the optimizer alone is twice the policy's size).
NOT_EXPORTED = {MANIFEST_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE}


def export(checkpoint: Path, dest: Path, with_optimizer: bool = False) -> list[Path]:
    """A checkpoint as a model folder: lerobot's names (from_pretrained, make_pre_post_processors) and the spec's
    (policy.safetensors, preprocessor_config.json, postprocessor_config.json), processor stats, configs. An adapter
    checkpoint becomes a PEFT adapter folder (adapter_model.safetensors, adapter_config.json, config.json with
    use_peft), which lerobot's PEFT loading path puts on its base. A sharded checkpoint's policy.safetensors (and,
    `with_optimizer`, optimizer_state.pth) are written from its shards, one tensor at a time, without a GPU.

    Otherwise copies files instead of re-serialising the policy, so the export is the checkpoint's exact bytes and
    needs no model in memory (under FSDP none holds all the weights). Staged in a temporary folder, then moved file
    by file, so no file in `dest` is ever half-written.
    """
    if not checkpoint.is_dir():
        raise TrainError(f"Cannot export {checkpoint}: there is no such checkpoint folder.")
    sharded = is_sharded(checkpoint)
    problem = verify(checkpoint) if (checkpoint / MANIFEST_FILE).is_file() else None
    missing = [n for n in EXPORT_COPIES if not (checkpoint / n).is_file() and not (sharded and n == POLICY_FILE)]
    if problem or missing:
        raise TrainError(
            f"Cannot export {checkpoint}: "
            + (problem or f"it has no {', '.join(missing)}, which a deployable model folder needs")
            + "."
        )
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".tmp-export-{os.getpid()}-{int(time.time())}"
    staging.mkdir()
    copies = ADAPTER_COPIES if (checkpoint / ADAPTER_CONFIG_FILE).is_file() else EXPORT_COPIES
    sources = sorted(p for p in checkpoint.iterdir() if p.is_file() and (p.name not in NOT_EXPORTED))
    if sharded:
        sources += export_consolidated(checkpoint / SHARDS_DIR, staging, with_optimizer)
    elif with_optimizer and (checkpoint / OPTIMIZER_FILE).is_file():
        sources.append(checkpoint / OPTIMIZER_FILE)
    for source in sources:
        names = copies.get(source.name, (source.name,))
        if source.parent != staging:
            shutil.copyfile(source, staging / names[0])
        elif names[0] != source.name:
            source.rename(staging / names[0])
        for alias in names[1:]:
            os.link(staging / names[0], staging / alias)  # same bytes, one copy on disk
    written = []
    for path in sorted(staging.iterdir()):
        _fsync(path)
        written.append(path.replace(dest / path.name))
    staging.rmdir()
    _fsync(dest)
    return written
