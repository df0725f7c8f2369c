"""Saving and restoring a run's state: the one owner of both directions.

`Checkpointer.save(state)` writes `OUT/checkpoint-<step>/` (layout in accel_train.checkpoint) through Accelerate's
`save_state`, on every rank, with the policy and processors written by its save hook; `Checkpointer.restore(start)`
loads the same files back into the prepared policy, optimizer, LR schedule and fp16 scaler, and returns the
trainer state to continue from. Under FSDP the files are the same consolidated ones: saving gathers each rank's
shards to the main process, loading scatters the full tensors to the shards (torch's full state dicts), so an
FSDP checkpoint resumes on one GPU and the reverse.

Training waits only while the state is copied to CPU memory (`StateSnapshot`; under FSDP each rank's own shards);
gathering, serialising, flushing, hashing and publishing it run in a background thread.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import safetensors
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from lerobot.policies import PreTrainedPolicy
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Shard

from accel_train.checkpoint import (
    OPTIMIZER_FILE,
    POLICY_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    TMP_PREFIX,
    TRAIN_CONFIG_FILE,
    TrainerState,
    _fsync,
    list_checkpoints,
    load_tensors,
    name_for,
    step_from_name,
    tied_names,
    write_manifest,
)
from accel_train.config import Every, TrainConfig
from accel_train.data import StepShape, TrainingData
from accel_train.errors import TrainError
from accel_train.model import POSTPROCESSOR_FILE, PREPROCESSOR_FILE, PolicyParts
from accel_train.sharding import is_fsdp

if TYPE_CHECKING:
    from accel_train.hub import HubPusher
    from accel_train.start import Start

log = logging.getLogger(__name__)

# Accelerate's save_state names -> ours. Its per-rank `random_states_<rank>.pkl` are dropped: no RNG state is
# needed (see accel_train.checkpoint).
ACCELERATE_FILES = {"optimizer.bin": OPTIMIZER_FILE, "scheduler.bin": SCHEDULER_FILE, "scaler.pt": SCALER_FILE}


# Plain-attribute counters that steer training: VQ-BeT counts the steps of its VQ-VAE phase in
# `VqVae.optimized_steps` (lerobot 0.6.1), outside any state dict; a resume must continue the count.
MODULE_COUNTERS = ("optimized_steps",)


def module_counters(policy: torch.nn.Module) -> dict[str, int]:
    return {
        f"{name}.{attr}": value
        for name, module in policy.named_modules()
        for attr in MODULE_COUNTERS
        if isinstance(value := getattr(module, attr, None), int)
    }


def restore_module_counters(policy: torch.nn.Module, counters: dict[str, int]) -> None:
    modules = dict(policy.named_modules())
    for key, value in counters.items():
        name, _, attr = key.rpartition(".")
        if name in modules and attr in MODULE_COUNTERS:
            setattr(modules[name], attr, value)


def is_adapted(policy: torch.nn.Module) -> bool:
    """A policy wrapped with PEFT adapters (--peft)."""
    return hasattr(policy, "peft_config")


def policy_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the (unwrapped) policy: its whole state; or for an adapter fine-tune only what
    training changes (adapters, fully trained modules), in PEFT's own adapter format (`get_peft_model_state_dict`),
    so that the file is an adapter_model.safetensors; the frozen base comes from `base_policy`."""
    if is_adapted(policy):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(policy)
    return policy.state_dict()


def write_policy_file(policy: torch.nn.Module, path: Path) -> None:
    if is_adapted(policy):
        save_file({k: v.contiguous() for k, v in policy_state(policy).items()}, path)
    else:
        save_model(policy, str(path))


def check_policy_file(policy: torch.nn.Module, checkpoint: Path) -> None:
    """policy.safetensors must hold every tensor of `policy` (unwrapped), shape for shape: else a readable error."""
    path = checkpoint / POLICY_FILE
    try:
        with safetensors.safe_open(path, "pt") as file:  # reads the header only: names and shapes
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise TrainError(f"{path} is not a valid safetensors file ({error}); the checkpoint is damaged.") from None
    expected = policy_state(policy)
    missing = sorted(set(expected) - set(shapes) - set(tied_names(expected)))  # a tied weight is saved once
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise TrainError(
            f"{path} does not fit the {policy.config.type} policy being built: {len(missing)} missing tensors "
            f"({', '.join(missing[:3])}...) and {len(unexpected)} unexpected ones ({', '.join(unexpected[:3])}...). "
            "The checkpoint comes from another policy type, architecture or adapter setting (--peft)."
        )
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise TrainError(
                f"{path} has '{name}' of shape {shape}, the policy being built expects "
                f"{tuple(expected[name].shape)}: the checkpoint has another architecture."
            )


def load_policy_weights(policy: PreTrainedPolicy, checkpoint: Path) -> None:
    """Strictly load policy.safetensors into the (unwrapped) policy, with a readable error when it does not fit.
    An adapter checkpoint holds the trained tensors only: those, all of them, go into the adapted policy."""
    check_policy_file(policy, checkpoint)
    if is_adapted(policy):
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(checkpoint / POLICY_FILE))  # every name checked just above
    else:
        load_model(policy, checkpoint / POLICY_FILE, strict=True)


def load_sharded_policy_weights(policy: torch.nn.Module, checkpoint: Path) -> None:
    """Load policy.safetensors (consolidated, from any run) into a policy whose parameters FSDP has sharded.

    torch keeps each rank's shard of the full tensors; weights tied under several names are saved once and
    given back under each. An adapter checkpoint names its tensors as PEFT's adapter files do: each goes to the
    parameter that PEFT's own `get_peft_model_state_dict` names so (PEFT's loader would copy plain tensors into
    the sharded ones, which torch refuses).
    """
    check_policy_file(policy, checkpoint)
    weights = load_file(checkpoint / POLICY_FILE)
    if is_adapted(policy):
        from peft.utils import get_peft_model_state_dict

        own = policy.state_dict(keep_vars=True)
        key_of = {id(tensor): key for key, tensor in own.items()}
        names = {saved: key_of[id(t)] for saved, t in get_peft_model_state_dict(policy, state_dict=own).items()}
        weights = {names[saved]: tensor for saved, tensor in weights.items()}  # every name checked above
        set_model_state_dict(policy, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    for dropped, kept in tied_names(policy.state_dict()).items():
        weights.setdefault(dropped, weights[kept])
    set_model_state_dict(policy, weights, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer(checkpoint: Path, optimizer: torch.optim.Optimizer) -> None:
    try:
        optimizer.load_state_dict(load_tensors(checkpoint / OPTIMIZER_FILE))
    except (ValueError, KeyError) as error:
        raise TrainError(f"{checkpoint / OPTIMIZER_FILE} does not fit this policy's optimizer ({error}).") from None


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
    # Not strict: a trainable parameter that never had a gradient (pi0's lm_head, unused by its loss) has no Adam
    # state, in this file as in a plain optimizer's state_dict; the parameter count is checked above.
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False))


@dataclass(frozen=True)
class LocalRows:
    """A rank's rows of a tensor that FSDP2 shards on dim 0 (a CPU copy), and the full tensor's shape."""

    key: str
    rows: torch.Tensor
    shape: torch.Size


class StateSnapshot:
    """A checkpoint's policy weights and optimizer state, copied into CPU buffers that are reused from one
    checkpoint to the next (pinned when the state is on a GPU, so the copy is one DMA per tensor).

    Taking it is a memory copy; serialising it (safetensors, torch.save) is the slow part, left to the writer
    thread while training goes on. The files are those of a synchronous save, except that optimizer_state.pth
    holds CPU tensors where a GPU run's synchronous save would tag them with the GPU (loading maps them to CPU
    either way). The price: host memory for one checkpoint's tensors, for the whole run, taken at the first save;
    pinned buffers come from torch's host allocator, which rounds each up to a power of two
    (`--async_checkpoint false` does without, except under FSDP: there each process keeps buffers for its shards,
    and the main process also for the full state it gathers and writes).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None
        self.policy: dict[str, torch.Tensor] = {}
        self.policy_metadata: dict[str, str] | None = None
        self.optimizer: dict[str, Any] | None = None

    def _buffer(self, key: str, shape: torch.Size, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
        """The CPU buffer named `key`, allocated once and reused by every later checkpoint."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(shape, dtype=dtype, pin_memory=pin)
        return buffer

    def _copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffer(key, tensor.shape, tensor.dtype, pin=tensor.is_cuda)
        buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        if tensor.is_cuda and self._copied is None:
            self._copied = torch.cuda.Event()
        return buffer

    def take_policy(self, policy: torch.nn.Module) -> None:
        """First in a save (from save_state's pre-hook): starts a new snapshot."""
        self._copied, self.optimizer = None, None
        weights = policy_state(policy)
        tied = tied_names(weights)
        self.policy_metadata = tied or None  # save_model's header: {dropped: kept}, or none
        self.policy = {name: self._copy(f"policy/{name}", t) for name, t in weights.items() if name not in tied}

    def take_optimizer(self, state_dict: dict[str, Any], copy_tensor: Any = None) -> None:
        """Tensors into the reused buffers (through `copy_tensor`, `_copy` by default); anything else (param_groups,
        nested values) deep-copied, since the training thread goes on changing the optimizer while the writer
        serialises this."""
        copy_tensor = copy_tensor or self._copy
        self.optimizer = {
            "state": {
                index: {
                    key: copy_tensor(f"optimizer/{index}/{key}", v) if torch.is_tensor(v) else copy.deepcopy(v)
                    for key, v in values.items()
                }
                for index, values in state_dict["state"].items()
            },
            "param_groups": copy.deepcopy(state_dict["param_groups"]),
        }

    def _copy_local(self, key: str, tensor: torch.Tensor) -> torch.Tensor | LocalRows:
        """This rank's part of a tensor: FSDP2's rows of a sharded one (its dim-0 chunk), or a copy of the whole."""
        if not isinstance(tensor, DTensor):
            return self._copy(key, tensor)
        if tensor.placements != (Shard(0),):  # not FSDP2's layout: gathered now, in the foreground
            return self._copy(key, tensor.full_tensor())
        return LocalRows(key, self._copy(key, tensor.to_local()), tensor.shape)

    def take_shards(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Under FSDP, on every rank (from save_state's hook): this rank's shards of the policy's weights (or
        adapters) and of the optimizer state, copied into reused CPU buffers like `take_policy`, about 1/N of
        what a DDP process copies. `gather` assembles them in the writer thread."""
        self._copied = None
        self.policy_metadata = None  # FSDP's tensors are never tied (tied_names)
        self.policy = {name: self._copy_local(f"policy/{name}", t) for name, t in policy_state(policy).items()}
        self.take_optimizer(optimizer.state_dict(), self._copy_local)

    def gather(self, group: torch.distributed.ProcessGroup, is_main: bool) -> None:
        """In the writer thread of every rank, over `group` (its own, so as not to interleave with training's
        collectives): each sharded tensor's rows gathered to the main process, which then holds the full policy
        and optimizer state in the plain formats. The same order on every rank: the dicts' order. Every buffer is
        reused from one checkpoint to the next, as `_copy`'s are: allocating the full state anew at each save made
        the main process's memory grow by about a checkpoint each time (freed memory that glibc's per-thread
        arenas keep)."""
        if self._copied is not None:
            self._copied.synchronize()
        main = torch.distributed.get_global_rank(group, 0)

        def full(value: Any) -> Any:
            if not isinstance(value, LocalRows):
                return value
            world, total, rest, dtype = group.size(), value.shape[0], value.shape[1:], value.rows.dtype
            rows = -(-total // world)  # FSDP2 gives rank r rows [r * rows, (r + 1) * rows), the last ones fewer
            mine = value.rows
            if mine.shape[0] != rows:  # gloo gathers equal sizes: padded
                mine = self._buffer(f"{value.key}/padded", torch.Size((rows, *rest)), dtype)
                mine[: value.rows.shape[0]] = value.rows
            # The main process receives straight into one tensor of `world` equal chunks.
            out = self._buffer(f"{value.key}/gathered", torch.Size((rows * world, *rest)), dtype) if is_main else None
            torch.distributed.gather(mine, list(out.chunk(world)) if is_main else None, dst=main, group=group)
            if not is_main or rows * world == total:
                return out
            full = self._buffer(f"{value.key}/full", value.shape, dtype)  # safetensors wants tensors that own
            return full.copy_(out[:total])

        self.policy = {name: full(t) for name, t in self.policy.items()}
        self.optimizer["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in self.optimizer["state"].items()}

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
    """Saves the run's state as checkpoints and restores it from them.

    Built before `PolicyParts.prepare` (it names the parameters, which FSDP replaces), used after it: `restore`
    once, `save` whenever `due`, `wait` before the end. Saving writes through Accelerate's save_state on every
    rank, with our files from its save hook; the main process then publishes the folder, submits it to the Hub
    pusher and prunes old checkpoints (--save_total_limit).
    """

    def __init__(self, accelerator: Accelerator, parts: PolicyParts, cfg: TrainConfig, pusher: HubPusher | None):
        self.accelerator = accelerator
        self.parts = parts
        self.output_dir = cfg.output_dir
        self.train_config = cfg.to_dict()
        self.cfg = cfg
        self.pusher = pusher
        self.schedule = Every(cfg.save_freq, cfg.steps)
        self.resumed_from: Path | None = None
        self.sharded = is_fsdp(accelerator)
        # FSDP replaces the parameter objects; their names, taken now, map the optimizer's ids on load.
        self.parameter_names = parameter_names(parts.policy, parts.optimizer) if self.sharded else []
        self.asynchronous = cfg.async_checkpoint
        # Under FSDP the state is gathered into the snapshot, then written once (in the background unless
        # --async_checkpoint false).
        self.snapshot = StateSnapshot() if self.asynchronous or self.sharded else None
        # Under FSDP every rank's writer thread gathers shards over a group of its own (gloo: CPU tensors).
        # A timeout, so that a rank whose gather failed stops the others with an error rather than a hang.
        self._gather_group = (
            torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(minutes=10))
            if self.sharded
            else None
        )
        self._state: TrainerState | None = None
        self._error: Exception | None = None
        self._writer: threading.Thread | None = None
        self._background_failure: tuple[int, str] | None = None
        accelerator.register_save_state_pre_hook(self._save_hook)

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    # Restoring

    def restore(self, start: Start, data: TrainingData) -> TrainerState:
        """Load what `start` continues from into the prepared parts; return the state the run continues at.

        --init_from loads the policy's weights only (its processors were built from the checkpoint); a resume
        also loads the optimizer, the LR schedule and the fp16 scaler.
        """
        policy = self.accelerator.unwrap_model(self.parts.policy)
        if start.source is not None:
            load = load_sharded_policy_weights if self.sharded else load_policy_weights
            load(policy, start.source)
        if start.resume is not None:
            self._restore_training_state(start.resume)
            restore_module_counters(policy, start.saved.counters if start.saved else {})
            self.resumed_from = start.resume
        return starting_state(self.cfg, self.accelerator.num_processes, start, data)

    def _restore_training_state(self, checkpoint: Path) -> None:
        optimizer = self.parts.optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper
        if self.sharded:
            load_sharded_optimizer(checkpoint, self.parts.policy, optimizer, self.parameter_names)
        else:
            load_optimizer(checkpoint, optimizer)
        load_scheduler(checkpoint, self.parts.scheduler)
        scaler = self.accelerator.scaler
        if scaler is not None and (checkpoint / SCALER_FILE).is_file():
            scaler.load_state_dict(load_tensors(checkpoint / SCALER_FILE))

    # Saving

    def _save_hook(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        """Write the policy and processors ourselves, in lerobot's formats, instead of Accelerate's model file.

        Runs on every rank. Popping the weights stops Accelerate from writing its own model.safetensors (under
        DDP with `module.` prefixes). Under FSDP every rank copies its shards of the weights and optimizer state
        into the snapshot (`_save_state` keeps Accelerate from gathering and writing its own copies).
        """
        weights.clear()
        policy = self.accelerator.unwrap_model(self.parts.policy)
        try:
            if self.sharded:
                self.snapshot.take_shards(policy, self.parts.optimizer.optimizer)
            if not self.accelerator.is_main_process:
                return
            if self.snapshot is not None and not self.sharded:
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
        if self.snapshot is None:
            write_policy_file(policy, folder / POLICY_FILE)
        policy.config._save_pretrained(folder)
        if is_adapted(policy):
            policy.peft_config["default"].save_pretrained(folder)  # adapter_config.json
        self.parts.preprocessor.save_pretrained(folder, config_filename=PREPROCESSOR_FILE)
        self.parts.postprocessor.save_pretrained(folder, config_filename=POSTPROCESSOR_FILE)
        (folder / TRAIN_CONFIG_FILE).write_text(json.dumps(self.train_config, indent=2))
        self._state.counters = module_counters(policy)
        (folder / STATE_FILE).write_text(self._state.to_json())

    def save(self, state: TrainerState) -> Path:
        """Write checkpoint-<step>; every rank must call it (save_state and barriers are collective).

        Training is blocked only while save_state runs with the snapshot hooks: the policy and optimizer tensors
        are copied to CPU memory, the small files (processors, configs, scheduler) written to
        `.tmp-checkpoint-<step>`. Serialising the snapshot, flushing to disk, hashing into the manifest and the
        rename that publishes the folder run in a background thread of the main process, which then hands the
        folder to the Hub pusher and prunes. One write is in flight at a time: the next save, or `wait()`, first
        waits for it, so a slow disk holds training back instead of piling up copies. Synchronous
        (`--async_checkpoint false`), all of it happens before save() returns.

        A failed write (disk full, I/O error) on any rank, now or in the background, stops every rank with one
        clear error (at this save, or at the next save or wait), removes the partial folder and leaves the
        previous checkpoint as it was.
        """
        self.wait()
        final = self.output_dir / name_for(state.step)
        tmp = self.output_dir / f"{TMP_PREFIX}{state.step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._state, self._error = state, None
        self._save_state(tmp)
        self.accelerator.wait_for_everyone()  # save_state has no barrier of its own: all ranks' files are in
        errors = [e for e in gather_object([describe(self._error) if self._error else None]) if e]
        if errors:
            self._fail(state.step, errors[0], tmp)
        main = self.accelerator.is_main_process
        background = self._gather_and_publish if self.sharded else self._publish if main else None
        if background is not None and self.asynchronous:
            self._writer = threading.Thread(target=background, args=(tmp, final), name=f"write-{final.name}")
            self._writer.start()
        elif background is not None:
            background(tmp, final)
        if not self.asynchronous:
            self.wait()  # a failed write stops every rank now
        return final

    def _save_state(self, tmp: Path) -> None:
        """Accelerate's save_state, with the optimizer hook of the snapshot around it; errors kept for save()."""
        optimizer = self.parts.optimizer.optimizer
        snapshot_hook = self.snapshot is not None and not self.sharded  # under FSDP the save hook gathers it all
        hook = optimizer.register_state_dict_post_hook(self._take_optimizer) if snapshot_hook else None
        try:
            with self._without_fsdp_files():
                self.accelerator.save_state(str(tmp))
        except Exception as error:  # Accelerate's own files failed to write (torch.save raises RuntimeError
            self._error = error  # on a full disk): reported on every rank by save()
        finally:
            if hook is not None:
                hook.remove()
        if self.snapshot is not None and (self.accelerator.is_main_process or self.sharded):
            self.snapshot.mark_taken()

    @contextmanager
    def _without_fsdp_files(self) -> Iterator[None]:
        """Under FSDP, Accelerate's save_state gathers the policy and optimizer and writes them itself (torch.save,
        in the foreground) before its hooks run, with no option to leave them out; written so, a checkpoint was
        written twice (its files, then ours from them). Shown no prepared model or optimizer, save_state writes
        only the schedule and scaler and runs the hooks; our hook gathers once and the writer thread writes once.
        Accelerate has no public way to do this: `_models` and `_optimizers` are the lists save_state reads."""
        if not self.sharded:
            yield
            return
        accelerator = self.accelerator
        models, optimizers = accelerator._models, accelerator._optimizers
        accelerator._models, accelerator._optimizers = [], []
        try:
            yield
        finally:
            accelerator._models, accelerator._optimizers = models, optimizers

    def save_unless_saved(self, state: TrainerState) -> Path:
        """The checkpoint of `state.step`, written now unless it already is (a preemption right after a save)."""
        self.wait()
        path = self.output_dir / name_for(state.step)
        if not path.is_dir():
            self.save(state)
            self.wait()
        return path

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

    def _gather_and_publish(self, tmp: Path, final: Path) -> None:
        """Under FSDP, the background half of a save on every rank: the shards gathered to the main process
        (collective), which then publishes as `_publish` does."""
        try:
            self.snapshot.gather(self._gather_group, self.accelerator.is_main_process)
        except Exception as error:  # reported by every rank at the next wait(), as in _publish
            self._background_failure = (step_from_name(final), describe(error))
            return
        if self.accelerator.is_main_process:
            self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        """The background half of a save (main process): flush, manifest, rename; then push and prune."""
        try:
            self._finalize(tmp, final)
        except Exception as error:  # a thread's exception would vanish: every rank raises it at the next wait()
            shutil.rmtree(tmp, ignore_errors=True)
            self._background_failure = (step_from_name(final), describe(error))
            return
        log.info("Saved %s", final)
        try:
            if self.pusher is not None:
                self.pusher.submit(final, step_from_name(final))
            if self.cfg.save_total_limit:
                self.prune(self.cfg.save_total_limit)
        except Exception as error:  # a thread's exception would vanish: say it, the checkpoint is safe
            log.warning("After saving %s: %s: %s", final.name, type(error).__name__, error)

    def _fail(self, step: int, error: str, tmp: Path | None = None) -> NoReturn:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp or self.output_dir / f"{TMP_PREFIX}{step}", ignore_errors=True)
        previous = [p.name for s, p in list_checkpoints(self.output_dir) if s < step]
        raise TrainError(
            f"Writing {name_for(step)} failed ({error}); training stops here. "
            + (f"The previous checkpoint, {previous[-1]}, is intact: " if previous else "")
            + "fix the cause (e.g. free disk space) and rerun with --resume_from_checkpoint latest."
        )

    def _finalize(self, tmp: Path, final: Path) -> None:
        """Accelerate's files under our names, the manifest last, then the rename that publishes the folder."""
        if self.snapshot is not None:  # save_state's stand-in with param_groups only (_take_optimizer); none in FSDP
            (tmp / "optimizer.bin").unlink(missing_ok=True)
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

    def prune(self, keep: int) -> None:
        """--save_total_limit: delete all but the newest `keep` checkpoints, sparing the one resumed from and
        those still uploading."""
        for _, path in list_checkpoints(self.output_dir)[:-keep]:
            if path == self.resumed_from or (self.pusher is not None and self.pusher.is_uploading(path)):
                log.info("Keeping %s beyond --save_total_limit: it is being uploaded or was resumed from", path.name)
            else:
                shutil.rmtree(path)


def starting_state(cfg: TrainConfig, num_processes: int, start: Start, data: TrainingData) -> TrainerState:
    """The trainer state a run continues at; with another world size, batch or dataset mix, at the same sample.

    A checkpoint without trainer_state.json (another tool's, in the spec's four-file format) continues at the
    data position that `start.step` steps of this run's batch would reach.
    """
    step_samples = StepShape(cfg.batch_size, cfg.gradient_accumulation_steps, num_processes).samples
    state = TrainerState(
        step=0,
        seed=cfg.seed,
        num_processes=num_processes,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        policy_type=cfg.policy.type,
        datasets=data.describe(),
    )
    saved = start.saved if start.resume is not None else None
    if saved is None:
        for _ in range(start.step):
            state.advance(step_samples, data.epoch_samples)
        return state
    state.step, state.data, state.samples_seen = start.step, saved.data, saved.samples_seen
    changed = {
        name: (getattr(saved, name), getattr(state, name))
        for name in ("num_processes", "batch_size", "gradient_accumulation_steps", "seed")
        if getattr(saved, name) != getattr(state, name)
    }
    if saved.datasets and _mix_changed(saved.datasets, state.datasets):
        changed["dataset mix"] = (_mix_text(saved.datasets), _mix_text(state.datasets))
    state.data = state.data.fitted(step_samples, data.epoch_samples)  # after a smaller epoch or a larger step
    if changed:
        log.warning(
            "Resuming with a different %s: the run continues from step %d and sample %d of epoch %d, but "
            "is no longer bit-identical to an uninterrupted run.",
            ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in changed.items()),
            state.step,
            state.data.sample,
            state.data.epoch,
        )
    return state


def _mix_changed(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> bool:
    """Whether the data differs: everything recorded but where each dataset lies on this machine, and the commit
    where both runs read one (a streamed dataset's; a local copy has none to compare)."""
    if len(saved) != len(now):
        return True
    for a, b in zip(saved, now, strict=True):
        ignored = {"root"} | ({"commit"} if not ("commit" in a and "commit" in b) else set())
        if any(a.get(k) != b.get(k) for k in (a.keys() | b.keys()) - ignored):
            return True
    return False


def _mix_text(datasets: list[dict[str, Any]]) -> str:
    return " + ".join(
        f"{d['repo_id']}" + (f" episodes {d['episodes']}" if d.get("episodes") else "")
        + (f" weight {d['weight']:g}" if d.get("weight") else "") + f" [{d['epoch_samples']}/epoch]"
        + (f" at commit {d['commit'][:12]}" if d.get("commit") else "")
        for d in datasets
    )  # fmt: skip
