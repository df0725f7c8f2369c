"""The one owner of checkpoint state: what a checkpoint holds, how it is written, found, checked and read.

Layout of `OUT/checkpoint-<step>/` (the spec's four files first):
    policy.safetensors          unwrapped policy weights
    preprocessor_config.json    lerobot processor pipelines, with their stats
    postprocessor_config.json   (policy_*_step_*.safetensors beside them)
    optimizer_state.pth         optimizer state dict (torch.load(weights_only=True))
    scheduler_state.pth         LR scheduler state, when the policy has a schedule
    scaler_state.pth            fp16 GradScaler state, with --mixed_precision fp16
    config.json                 the policy config (lerobot format)
    train_config.json           the run's full config
    trainer_state.json          step, data position, world size, batch size, ...
    manifest.json               size and sha256 of every file above, written last

A checkpoint is written under `.tmp-checkpoint-<step>`, flushed to disk, and renamed only when complete, so a
folder named `checkpoint-<step>` is never half-written. Nothing read from a checkpoint is unpickled.

Training waits only while the state is copied to CPU memory (`StateSnapshot`); serialising, flushing, hashing
and publishing it run in a background thread.

The RNG needs no file: the trainer re-seeds from (seed, step, rank) at every step and every sample's
augmentation from (seed, epoch, position), so the random streams after step K are the same in a resumed run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import safetensors
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from lerobot.policies import PreTrainedPolicy
from lerobot.processor import PolicyProcessorPipeline
from safetensors.torch import _remove_duplicate_names, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from accel_train.data import DataPosition
from accel_train.errors import TrainError
from accel_train.model import POSTPROCESSOR_FILE, PREPROCESSOR_FILE

log = logging.getLogger(__name__)

POLICY_FILE = "policy.safetensors"
OPTIMIZER_FILE = "optimizer_state.pth"
SCHEDULER_FILE = "scheduler_state.pth"
SCALER_FILE = "scaler_state.pth"
POLICY_CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (POLICY_FILE, OPTIMIZER_FILE)
# Accelerate's save_state names -> ours. Its per-rank `random_states_<rank>.pkl` are dropped (see above).
ACCELERATE_FILES = {"optimizer.bin": OPTIMIZER_FILE, "scheduler.bin": SCHEDULER_FILE, "scaler.pt": SCALER_FILE}
# Under FSDP with FULL_STATE_DICT, save_state writes the gathered weights here (torch.save) on the main process.
FSDP_MODEL_FILE = "pytorch_model_fsdp.bin"
NAME = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


@dataclass
class TrainerState:
    """Everything besides tensors that an exact resume needs, stored as json."""

    step: int
    data: DataPosition = field(default_factory=DataPosition)
    samples_seen: int = 0
    seed: int = 0
    num_processes: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    policy_type: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        raw = _read_json(path)
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


def tied_names(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{dropped name: kept name} for weights tied under several names: the choice save_model makes.

    safetensors' `_remove_duplicate_names` is what `save_model` calls; it has no public twin, and the snapshot and
    the loader must choose exactly as save_model does for their files to match its files.
    """
    return {dropped: kept for kept, group in _remove_duplicate_names(state_dict).items() for dropped in group}


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
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise TrainError(
            f"The checkpoint {path} is missing {' and '.join(missing)}, which resuming needs. Pick another "
            "checkpoint, or --init_from it to start over from its weights."
        )
    if (path / MANIFEST_FILE).exists() and (problem := verify(path)):
        raise TrainError(f"The checkpoint {path} is corrupted: {problem}. Resume from an earlier checkpoint.")
    return path


def read_state(checkpoint: Path) -> TrainerState | None:
    return TrainerState.from_file(checkpoint / STATE_FILE) if (checkpoint / STATE_FILE).is_file() else None


def resume_step(checkpoint: Path, state: TrainerState | None) -> int:
    """The step a checkpoint continues at: its folder name's number, else its state file's; both must agree."""
    named = step_from_name(checkpoint)
    if named is not None and state is not None and named != state.step:
        raise TrainError(
            f"The checkpoint folder {checkpoint.name} says step {named} but its {STATE_FILE} says step "
            f"{state.step}. Rename the folder to checkpoint-{state.step} if it was renamed by mistake."
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


def load_policy_weights(policy: PreTrainedPolicy, checkpoint: Path) -> None:
    """Strictly load policy.safetensors into the (unwrapped) policy, with a readable error when it does not fit."""
    path = checkpoint / POLICY_FILE
    try:
        with safetensors.safe_open(path, "pt") as file:  # reads the header only: names and shapes
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise TrainError(f"{path} is not a valid safetensors file ({error}); the checkpoint is damaged.") from None
    names = set(shapes)
    expected = policy.state_dict()
    missing = sorted(set(expected) - names - set(tied_names(expected)))  # a tied weight is saved once
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise TrainError(
            f"{path} does not fit the {policy.config.type} policy being built: {len(missing)} missing tensors "
            f"({', '.join(missing[:3])}...) and {len(unexpected)} unexpected ones ({', '.join(unexpected[:3])}...). "
            "The checkpoint comes from another policy type or architecture."
        )
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise TrainError(
                f"{path} has '{name}' of shape {shape}, the policy being built expects "
                f"{tuple(expected[name].shape)}: the checkpoint has another architecture."
            )
    load_model(policy, path, strict=True)


def load_optimizer_and_scheduler(checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    try:
        optimizer.load_state_dict(load_tensors(checkpoint / OPTIMIZER_FILE))
    except (ValueError, KeyError) as error:
        raise TrainError(f"{checkpoint / OPTIMIZER_FILE} does not fit this policy's optimizer ({error}).") from None
    load_scheduler(checkpoint, scheduler)


def load_scheduler(checkpoint: Path, scheduler: Any) -> None:
    if scheduler is None:
        return
    if (checkpoint / SCHEDULER_FILE).is_file():
        scheduler.load_state_dict(load_tensors(checkpoint / SCHEDULER_FILE))
    else:
        log.warning("%s has no %s: the LR schedule restarts at its beginning.", checkpoint, SCHEDULER_FILE)


def parameter_names(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its integer ids in `state_dict()`.

    Taken before FSDP replaces the parameters: the names survive sharding, the parameter objects do not.
    """
    names = {param: name for name, param in policy.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def indexed_optimizer_state(by_name: dict[str, Any]) -> dict[str, Any]:
    """A consolidated FSDP optimizer state (keyed by parameter name) in `optimizer.state_dict()`'s format.

    torch's full optimizer state dict names parameters; a plain optimizer numbers them in param_groups order.
    Written in the plain format, an FSDP checkpoint loads into a single-GPU run like any other.
    """
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in by_name["param_groups"]],
    }


def consolidate_fsdp_files(folder: Path) -> None:
    """Accelerate's FSDP FULL_STATE_DICT files (gathered weights, name-keyed optimizer state; both torch.save)
    rewritten as policy.safetensors and a plain optimizer_state.pth: the formats every other checkpoint has."""
    save_file(load_tensors(folder / FSDP_MODEL_FILE), folder / POLICY_FILE, metadata={"format": "pt"})
    (folder / FSDP_MODEL_FILE).unlink()
    torch.save(indexed_optimizer_state(load_tensors(folder / "optimizer.bin")), folder / OPTIMIZER_FILE)
    (folder / "optimizer.bin").unlink()


def load_sharded_optimizer(
    checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> None:
    """Load optimizer_state.pth (plain format, from any run) into an optimizer over FSDP-sharded parameters.

    torch scatters each rank's shard from the full state; `names` (from `parameter_names`) maps ids to names.
    """
    indexed = load_tensors(checkpoint / OPTIMIZER_FILE)
    count = sum(len(group["params"]) for group in indexed["param_groups"])
    if count != len(names):
        raise TrainError(
            f"{checkpoint / OPTIMIZER_FILE} holds {count} parameters, this policy's optimizer {len(names)}: "
            "the checkpoint comes from another policy or optimizer."
        )
    by_name = {
        "state": {names[i]: value for i, value in indexed["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


class StateSnapshot:
    """A checkpoint's policy weights and optimizer state, copied into CPU buffers that are reused from one
    checkpoint to the next (pinned when the state is on a GPU, so the copy is one DMA per tensor).

    Taking it is a memory copy; serialising it (safetensors, torch.save) is the slow part, left to the writer
    thread while training goes on. The files are those of a synchronous save, except that optimizer_state.pth
    holds CPU tensors where a GPU run's synchronous save would tag them with the GPU (loading maps them to CPU
    either way). The price: host memory for one checkpoint's tensors, for the whole run, taken at the first save;
    pinned buffers come from torch's host allocator, which rounds each up to a power of two
    (`--async_checkpoint false` does without).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None
        self.policy: dict[str, torch.Tensor] = {}
        self.policy_metadata: dict[str, str] | None = None
        self.optimizer: dict[str, Any] | None = None

    def _copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        if tensor.is_cuda and self._copied is None:
            self._copied = torch.cuda.Event()
        return buffer

    def take_policy(self, policy: torch.nn.Module) -> None:
        """First in a save (from save_state's pre-hook): starts a new snapshot."""
        self._copied, self.optimizer = None, None
        weights = policy.state_dict()
        tied = tied_names(weights)
        self.policy_metadata = tied or None  # save_model's header: {dropped: kept}, or none
        self.policy = {name: self._copy(f"policy/{name}", t) for name, t in weights.items() if name not in tied}

    def take_optimizer(self, state_dict: dict[str, Any]) -> None:
        """Tensors into the reused buffers; anything else (param_groups, nested values) deep-copied, since the
        training thread goes on changing the optimizer while the writer serialises this."""
        self.optimizer = {
            "state": {
                index: {
                    key: self._copy(f"optimizer/{index}/{key}", v) if torch.is_tensor(v) else copy.deepcopy(v)
                    for key, v in values.items()
                }
                for index, values in state_dict["state"].items()
            },
            "param_groups": copy.deepcopy(state_dict["param_groups"]),
        }

    def mark_taken(self) -> None:
        """After save_state (training thread): marks the end of the copies queued on the GPU stream."""
        if self._copied is not None:
            self._copied.record()

    def write(self, folder: Path) -> None:
        """In the writer thread: the same files a synchronous save writes."""
        if self.optimizer is None:
            raise RuntimeError("the optimizer state was not captured by this save (its state_dict hook did not run)")
        if self._copied is not None:
            self._copied.synchronize()
        save_file(self.policy, folder / POLICY_FILE, metadata=self.policy_metadata)
        torch.save(self.optimizer, folder / OPTIMIZER_FILE)


def describe(error: Exception) -> str:
    """For the one-line error: an OSError says what it is ("[Errno 28] No space left on device"), others not."""
    return str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"


class Checkpointer:
    """Writes checkpoints through Accelerate's save_state, on every rank, with our files from its save hook."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        preprocessor: PolicyProcessorPipeline,
        postprocessor: PolicyProcessorPipeline,
        train_config: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        asynchronous: bool = True,
    ):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.preprocessor, self.postprocessor = preprocessor, postprocessor
        self.train_config = train_config
        self._state: TrainerState | None = None
        self._error: Exception | None = None
        self._writer: threading.Thread | None = None
        self._background_failure: tuple[int, str] | None = None
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        self.asynchronous = asynchronous
        # Under FSDP, save_state gathers the shards itself (collectives, in the foreground): nothing to snapshot.
        self.snapshot = StateSnapshot() if asynchronous and not self.sharded else None
        self.optimizer = optimizer
        accelerator.register_save_state_pre_hook(self._save_hook)

    def _save_hook(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        """Write the policy and processors ourselves, in lerobot's formats, instead of Accelerate's model file.

        Runs on every rank. Popping the weights stops Accelerate from writing its own model.safetensors (under
        DDP with `module.` prefixes). Under FSDP the list is empty: Accelerate has already written the gathered
        weights, which `_finalize` turns into policy.safetensors.
        """
        weights.clear()
        if not self.accelerator.is_main_process:
            return
        policy = self.accelerator.unwrap_model(models[0])
        try:
            if self.snapshot is not None:
                self.snapshot.take_policy(policy)
            self._write_policy_files(Path(output_dir), policy)
        except Exception as error:  # e.g. disk full, no pinned memory: reported by save() after the barrier,
            self._error = error  # on every rank, so that no rank is left waiting

    def _take_optimizer(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Optimizer state_dict post-hook, registered only while save() runs save_state: the state goes into the
        snapshot, and save_state gets only the param_groups, so the optimizer.bin it writes in the foreground is a
        few KB instead of twice the policy. The writer thread replaces that file by optimizer_state.pth.

        Why a hook: save_state serialises every prepared optimizer before it returns and has no option to leave
        one out; torch's state_dict post-hook is the public place between it and the tensors.
        """
        if self.accelerator.is_main_process:
            try:
                self.snapshot.take_optimizer(state_dict)
            except Exception as error:  # reported by save() on every rank, as in _save_hook
                self._error = error
        return {"state": {}, "param_groups": state_dict["param_groups"]}

    def _write_policy_files(self, folder: Path, policy: PreTrainedPolicy) -> None:
        if not self.sharded and self.snapshot is None:
            save_model(policy, str(folder / POLICY_FILE))
        policy.config._save_pretrained(folder)
        self.preprocessor.save_pretrained(folder, config_filename=PREPROCESSOR_FILE)
        self.postprocessor.save_pretrained(folder, config_filename=POSTPROCESSOR_FILE)
        (folder / TRAIN_CONFIG_FILE).write_text(json.dumps(self.train_config, indent=2))
        (folder / STATE_FILE).write_text(self._state.to_json())

    def save(self, state: TrainerState, on_published: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint-<step>; every rank must call it (save_state and barriers are collective).

        Training is blocked only while save_state runs with the snapshot hooks: the policy and optimizer tensors
        are copied to CPU memory, the small files (processors, configs, scheduler) written to
        `.tmp-checkpoint-<step>`. Serialising the snapshot, flushing to disk, hashing into the manifest and the
        rename that publishes the folder run in a background thread of the main process, which then calls
        `on_published(folder)` (Hub push, pruning). One write is in flight at a time: the next save, or `wait()`,
        first waits for it, so a slow disk holds training back instead of piling up copies. Synchronous
        (`asynchronous=False`), all of it happens before save() returns.

        A failed write (disk full, I/O error) on any rank, now or in the background, stops every rank with one
        clear error (at this save, or at the next save or wait), removes the partial folder and leaves the
        previous checkpoint as it was.
        """
        self.wait()
        final = self.output_dir / f"checkpoint-{state.step}"
        tmp = self.output_dir / f"{TMP_PREFIX}{state.step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._state, self._error = state, None
        hook = self.optimizer.register_state_dict_post_hook(self._take_optimizer) if self.snapshot is not None else None
        try:
            self.accelerator.save_state(str(tmp))
        except Exception as error:  # Accelerate's own files failed to write (torch.save raises RuntimeError
            self._error = error  # on a full disk): reported on every rank below
        finally:
            if hook is not None:
                hook.remove()
        if self.snapshot is not None and self.accelerator.is_main_process:
            self.snapshot.mark_taken()
        self.accelerator.wait_for_everyone()  # save_state has no barrier of its own: all ranks' files are in
        errors = [e for e in gather_object([describe(self._error) if self._error else None]) if e]
        if errors:
            self._fail(state.step, errors[0], tmp)
        if self.accelerator.is_main_process and self.asynchronous:
            self._writer = threading.Thread(
                target=self._publish, args=(tmp, final, on_published), name=f"write-{final.name}"
            )
            self._writer.start()
        elif self.accelerator.is_main_process:
            self._publish(tmp, final, on_published)
        if not self.asynchronous:
            self.wait()  # a failed write stops every rank now
        return final

    def wait(self) -> None:
        """Block until the checkpoint in flight is published; every rank must call it. Raises, on every rank,
        the error of a write that failed in the background."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failure, self._background_failure = self._background_failure, None
        failures = [f for f in gather_object([failure]) if f]
        if failures:
            self._fail(*failures[0])

    def _publish(self, tmp: Path, final: Path, on_published: Callable[[Path], None] | None) -> None:
        """The background half of a save (main process): flush, manifest, rename; then the callback."""
        try:
            self._finalize(tmp, final)
        except Exception as error:  # a thread's exception would vanish: every rank raises it at the next wait()
            shutil.rmtree(tmp, ignore_errors=True)
            self._background_failure = (step_from_name(final), describe(error))
            return
        log.info("Saved %s", final)
        if on_published is not None:
            try:
                on_published(final)
            except Exception as error:  # a thread's exception would vanish: say it, the checkpoint is safe
                log.warning("After saving %s: %s: %s", final.name, type(error).__name__, error)

    def _fail(self, step: int, error: str, tmp: Path | None = None) -> NoReturn:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp or self.output_dir / f"{TMP_PREFIX}{step}", ignore_errors=True)
        previous = [p.name for s, p in list_checkpoints(self.output_dir) if s < step]
        raise TrainError(
            f"Writing checkpoint-{step} failed ({error}); training stops here. "
            + (f"The previous checkpoint, {previous[-1]}, is intact: " if previous else "")
            + "fix the cause (e.g. free disk space) and rerun with --resume_from_checkpoint latest."
        )

    def _finalize(self, tmp: Path, final: Path) -> None:
        """Accelerate's files under our names, the manifest last, then the rename that publishes the folder."""
        if self.sharded:
            consolidate_fsdp_files(tmp)
        if self.snapshot is not None:
            (tmp / "optimizer.bin").unlink()  # save_state's stand-in with param_groups only (_take_optimizer)
            self.snapshot.write(tmp)
        for theirs, ours in ACCELERATE_FILES.items():
            if (tmp / theirs).exists():
                (tmp / theirs).rename(tmp / ours)
        for rng_file in tmp.glob("random_states_*.pkl"):
            rng_file.unlink()
        write_manifest(tmp)
        if final.exists():  # a corrupt or abandoned checkpoint of the same step: replaced only now
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(self.output_dir)

    def prune(self, keep: int, protected: Callable[[Path], bool]) -> None:
        """--save_total_limit: delete all but the newest `keep` checkpoints, sparing the protected ones
        (the one resumed from, one still uploading)."""
        for _, path in list_checkpoints(self.output_dir)[:-keep]:
            if protected(path):
                log.info("Keeping %s beyond --save_total_limit: it is being uploaded or was resumed from", path.name)
            else:
                shutil.rmtree(path)


# What a lerobot pretrained folder holds under its own names, copied from a checkpoint's files of the same bytes.
EXPORT_COPIES = {
    POLICY_FILE: ("model.safetensors", POLICY_FILE),
    PREPROCESSOR_FILE: ("policy_preprocessor.json", PREPROCESSOR_FILE),
    POSTPROCESSOR_FILE: ("policy_postprocessor.json", POSTPROCESSOR_FILE),
    POLICY_CONFIG_FILE: (POLICY_CONFIG_FILE,),
}

# Training state a deployed model does not need (the optimizer alone is twice the policy's size).
NOT_EXPORTED = {MANIFEST_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE}


def export(checkpoint: Path, dest: Path) -> list[Path]:
    """A checkpoint as a model folder: lerobot's names (from_pretrained, make_pre_post_processors) and the spec's
    (policy.safetensors, preprocessor_config.json, postprocessor_config.json), processor stats, configs.

    Copies files instead of re-serialising the policy, so the export is the checkpoint's exact bytes and needs
    no model in memory (under FSDP none holds all the weights). Staged in a temporary folder, then moved file
    by file, so no file in `dest` is ever half-written.
    """
    if not checkpoint.is_dir():
        raise TrainError(f"Cannot export {checkpoint}: there is no such checkpoint folder.")
    problem = verify(checkpoint) if (checkpoint / MANIFEST_FILE).is_file() else None
    missing = [name for name in EXPORT_COPIES if not (checkpoint / name).is_file()]
    if problem or missing:
        raise TrainError(
            f"Cannot export {checkpoint}: "
            + (problem or f"it has no {', '.join(missing)}, which a deployable model folder needs")
            + "."
        )
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".tmp-export-{os.getpid()}-{int(time.time())}"
    staging.mkdir()
    for source in sorted(checkpoint.iterdir()):
        if source.name in NOT_EXPORTED or not source.is_file():
            continue
        names = EXPORT_COPIES.get(source.name, (source.name,))
        shutil.copyfile(source, staging / names[0])
        for alias in names[1:]:
            os.link(staging / names[0], staging / alias)  # same bytes, one copy on disk
    written = []
    for path in sorted(staging.iterdir()):
        _fsync(path)
        written.append(path.replace(dest / path.name))
    staging.rmdir()
    _fsync(dest)
    return written
