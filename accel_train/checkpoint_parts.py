"""The parts of a run's state that a checkpoint holds: each one named, its save and its load side by side.

`registry(ctx)` lists them in the order they are saved and loaded. `accel_train.checkpointer` calls every part's
`save(folder)` from Accelerate's save_state hook and every part's `load(folder)` from its load_state hook, so a
checkpoint is written and read through the same path (torchtitan's CheckpointManager over Stateful parts is the
model). Parts and their files (names in accel_train.checkpoint):

    policy        policy.safetensors (or PEFT adapters)   restored into the prepared policy
    optimizer     optimizer_state.pth                      restored into the optimizer
    shards        shards/ (--checkpoint_format sharded)    the policy and optimizer in place of the two above:
                                                           every process writes and reads its own part
    scheduler     scheduler_state.pth                      restored into the LR schedule (when it has one)
    scaler        scaler_state.pth                         restored into the fp16 GradScaler (with fp16)
    trainer       trainer_state.json                       step, data position, counters: read to build the run
                                                           (accel_train.start), counters restored into the policy
    config        train_config.json, config.json,          read to build the run (accel_train.start)
                  adapter_config.json
    processors    preprocessor_config.json, ...            read to build the run (accel_train.model)

The last three are read before the policy exists (they say what to build), by `checkpoint.read_*` and
`model.build_processors`; their `load` restores only what lives in the built run (the trainer's counters).

`save(folder)` runs in the training thread on every rank, while training waits: it copies what it must into
reused CPU buffers (`TensorCopies`) and writes small files on the main process. It returns the slow rest as a
`Deferred` that the checkpointer's writer thread runs on every rank once every rank's saves succeeded: first the
collective halves of all parts (gathering FSDP shards, writing sharded checkpoints), then the main process's file
writes, so that a failed write on one process never leaves the others waiting in a gather; or None.

Accelerate's own `register_for_checkpointing` is not used: its load_state unpickles those objects' files
(torch.load with weights_only=False), and checkpoints may come from strangers.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import safetensors
import torch
from accelerate import Accelerator
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
    POSTPROCESSOR_FILE,
    PREPROCESSOR_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    TrainerState,
    load_tensors,
)
from accel_train.errors import TrainError
from accel_train.model import PolicyParts
from accel_train.sharded_checkpoint import ShardedState, adapter_names, is_adapted, tied_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deferred:
    """The background half of a part's save: `collective` on every process (the parts' in order, all before any
    `write`), then `write`, which writes this process's files."""

    collective: Callable[[], None] | None = None
    write: Callable[[], None] | None = None


class Part(Protocol):
    """One named part of a run's state, saved into and loaded from a checkpoint folder by the same object."""

    name: str

    def save(self, folder: Path) -> Deferred | None: ...

    def load(self, folder: Path) -> None: ...


@dataclass
class RunState:
    """What the parts work on: the prepared policy parts and how this run saves them."""

    accelerator: Accelerator
    parts: PolicyParts
    train_config: dict[str, Any]
    asynchronous: bool  # --async_checkpoint: copy now, serialise in the writer thread
    fsdp: bool  # the policy's parameters are FSDP2 shards (DTensor)
    gather_group: torch.distributed.ProcessGroup | None = None  # FSDP: the writer threads' gathers
    parameter_names: list[str] = field(default_factory=list)  # FSDP: the optimizer's ids -> names
    trainer_state: TrainerState | None = None  # the state of the step being saved (set by the checkpointer)

    @property
    def policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.parts.policy)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parts.optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def registry(run: RunState, sharded: bool) -> list[Part]:
    """Every part of the run's state, in the order a checkpoint saves and loads them: the policy and optimizer
    consolidated, or `sharded` (--checkpoint_format sharded, or a sharded checkpoint being loaded)."""
    tensors = [ShardedTensors(run)] if sharded else [PolicyWeights(run), OptimizerState(run)]
    return [*tensors, SchedulerState(run), ScalerState(run), TrainerFile(run), ConfigFiles(run), ProcessorFiles(run)]


def gathered(copies: TensorCopies, state: Any, prefix: str, run: RunState, write: Callable[[Any], None]) -> Deferred:
    """Under FSDP: this rank's rows of `state` copied now; gathered to the main process in the collective half,
    then written by `write` (which gets the full state on the main process)."""
    taken = {"rows": copies.take(state, prefix, local=True)}

    def gather() -> None:
        taken["full"] = copies.gather(taken["rows"], run.gather_group, run.is_main)

    return Deferred(gather, lambda: write(taken["full"]))


# The policy


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
        names = {saved: fqn for fqn, saved in adapter_names(policy).items()}
        weights = {names[saved]: tensor for saved, tensor in weights.items()}  # every name checked above
        set_model_state_dict(policy, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    for dropped, kept in tied_names(policy.state_dict()).items():
        weights.setdefault(dropped, weights[kept])
    set_model_state_dict(policy, weights, options=StateDictOptions(full_state_dict=True, strict=True))


class PolicyWeights:
    """policy.safetensors: the policy's weights (or adapters), consolidated, as save_model writes them."""

    name = "policy"

    def __init__(self, run: RunState):
        self.run = run
        self.copies = TensorCopies() if run.asynchronous or run.fsdp else None

    def save(self, folder: Path) -> Deferred | None:
        run, policy = self.run, self.run.policy
        if run.fsdp:
            return gathered(self.copies, policy_state(policy), "policy", run, lambda w: self._write(folder, w, None))
        if not run.is_main:
            return None
        if self.copies is None:
            write_policy_file(policy, folder / POLICY_FILE)
            return None
        weights = policy_state(policy)
        tied = tied_names(weights)  # save_model's header: {dropped: kept}
        copied = self.copies.take({k: v for k, v in weights.items() if k not in tied}, "policy")
        return Deferred(write=lambda: self._write(folder, copied, tied or None))

    def _write(self, folder: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
        if self.run.is_main:
            self.copies.wait_copied()
            save_file(weights, folder / POLICY_FILE, metadata=metadata)

    def load(self, folder: Path) -> None:
        (load_sharded_policy_weights if self.run.fsdp else load_policy_weights)(self.run.policy, folder)


# The optimizer


def parameter_names(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its integer ids in `state_dict()`.

    Taken before FSDP replaces the parameters: the names survive sharding, the parameter objects do not.
    """
    names = {param: name for name, param in policy.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def load_optimizer(checkpoint: Path, optimizer: torch.optim.Optimizer) -> None:
    try:
        optimizer.load_state_dict(load_tensors(checkpoint / OPTIMIZER_FILE))
    except (ValueError, KeyError) as error:
        raise TrainError(f"{checkpoint / OPTIMIZER_FILE} does not fit this policy's optimizer ({error}).") from None


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


class OptimizerState:
    """optimizer_state.pth: torch's optimizer state_dict, integer-indexed, whole (under FSDP gathered)."""

    name = "optimizer"

    def __init__(self, run: RunState):
        self.run = run
        self.copies = TensorCopies() if run.asynchronous or run.fsdp else None

    def save(self, folder: Path) -> Deferred | None:
        run = self.run
        if run.fsdp:
            return gathered(self.copies, run.optimizer.state_dict(), "optimizer", run, lambda s: self._write(folder, s))
        if not run.is_main:
            return None
        if self.copies is None:
            torch.save(run.optimizer.state_dict(), folder / OPTIMIZER_FILE)
            return None
        copied = self.copies.take(run.optimizer.state_dict(), "optimizer")
        return Deferred(write=lambda: self._write(folder, copied))

    def _write(self, folder: Path, state: dict[str, Any]) -> None:
        if self.run.is_main:
            self.copies.wait_copied()
            torch.save(state, folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        run = self.run
        if run.fsdp:
            load_sharded_optimizer(folder, run.parts.policy, run.optimizer, run.parameter_names)
        else:
            load_optimizer(folder, run.optimizer)


class ShardedTensors:
    """shards/: the policy's weights (or adapters) and the optimizer state, every process writing the part it holds
    and reading the part it needs, from any number of writers (accel_train.sharded_checkpoint). Built at its first
    use, after FSDP has sharded the policy."""

    name = "shards"

    def __init__(self, run: RunState):
        self.run = run
        self._state: ShardedState | None = None

    @property
    def state(self) -> ShardedState:
        if self._state is None:
            self._state = ShardedState(self.run.policy, self.run.optimizer, self.run.gather_group)
        return self._state

    def save(self, folder: Path) -> Deferred:
        staged = self.state.stage(folder)  # this process's part copied now; written once every rank has copied
        return Deferred(collective=lambda: self.state.write(staged))

    def load(self, folder: Path, with_optimizer: bool = True) -> None:
        self.state.load(folder, with_optimizer)


# The small parts


class SchedulerState:
    """scheduler_state.pth: the LR schedule's state_dict, when the policy has a schedule."""

    name = "scheduler"

    def __init__(self, run: RunState):
        self.run = run

    def save(self, folder: Path) -> None:
        if self.run.is_main and self.run.parts.scheduler is not None:
            torch.save(self.run.parts.scheduler.state_dict(), folder / SCHEDULER_FILE)

    def load(self, folder: Path) -> None:
        scheduler = self.run.parts.scheduler
        if scheduler is None:
            return
        if (folder / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(load_tensors(folder / SCHEDULER_FILE))
        else:
            log.warning("%s has no %s: the LR schedule restarts at its beginning.", folder, SCHEDULER_FILE)


class ScalerState:
    """scaler_state.pth: the fp16 GradScaler's state (--mixed_precision fp16 only)."""

    name = "scaler"

    def __init__(self, run: RunState):
        self.run = run
        self.scaler = run.accelerator.scaler  # read once: the checkpointer hides it from Accelerate around save_state

    def save(self, folder: Path) -> None:
        if self.run.is_main and self.scaler is not None:
            torch.save(self.scaler.state_dict(), folder / SCALER_FILE)

    def load(self, folder: Path) -> None:
        if self.scaler is not None and (folder / SCALER_FILE).is_file():
            self.scaler.load_state_dict(load_tensors(folder / SCALER_FILE))


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


class TrainerFile:
    """trainer_state.json: the step, data position and run shape (read by accel_train.start to build the run),
    and the policy's plain-attribute counters (restored into the built policy)."""

    name = "trainer"

    def __init__(self, run: RunState):
        self.run = run

    def save(self, folder: Path) -> None:
        state = self.run.trainer_state
        state.counters = module_counters(self.run.policy)
        if self.run.is_main:
            (folder / STATE_FILE).write_text(state.to_json())

    def load(self, folder: Path) -> None:
        if (folder / STATE_FILE).is_file():
            restore_module_counters(self.run.policy, TrainerState.from_file(folder / STATE_FILE).counters)


class ConfigFiles:
    """train_config.json (the run's options), config.json (lerobot's policy config) and, for adapters, PEFT's
    adapter_config.json: read by accel_train.start to build the resumed run; nothing to restore after."""

    name = "config"

    def __init__(self, run: RunState):
        self.run = run

    def save(self, folder: Path) -> None:
        if not self.run.is_main:
            return
        policy = self.run.policy
        policy.config._save_pretrained(folder)
        if is_adapted(policy):
            policy.peft_config["default"].save_pretrained(folder)  # adapter_config.json
        (folder / TRAIN_CONFIG_FILE).write_text(json.dumps(self.run.train_config, indent=2))

    def load(self, folder: Path) -> None:
        """Read before the run is built (accel_train.start)."""


class ProcessorFiles:
    """The processor pipelines with their statistics, in lerobot's format: read by accel_train.model's
    build_processors, which builds the pipelines from them (their steps come from these files)."""

    name = "processors"

    def __init__(self, run: RunState):
        self.run = run

    def save(self, folder: Path) -> None:
        if self.run.is_main:
            self.run.parts.preprocessor.save_pretrained(folder, config_filename=PREPROCESSOR_FILE)
            self.run.parts.postprocessor.save_pretrained(folder, config_filename=POSTPROCESSOR_FILE)

    def load(self, folder: Path) -> None:
        """Built from the files before the run (accel_train.model.build_processors)."""


# Copies for the writer thread


@dataclass(frozen=True)
class LocalRows:
    """A rank's rows of a tensor that FSDP2 shards on dim 0 (a CPU copy), and the full tensor's shape."""

    key: str
    rows: torch.Tensor
    shape: torch.Size


class TensorCopies:
    """A part's state copied into CPU buffers that are reused from one checkpoint to the next (pinned when the
    state is on a GPU, so the copy is one DMA per tensor), so that the writer thread serialises it while training
    goes on. The price: host memory for the part's tensors, for the whole run, taken at the first save; pinned
    buffers come from torch's host allocator, which rounds each up to a power of two. Under FSDP each process
    keeps buffers for its rows, and the main process also for the full state it gathers and writes.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None

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

    def _copy_local(self, key: str, tensor: torch.Tensor) -> torch.Tensor | LocalRows:
        """This rank's part of a tensor: FSDP2's rows of a sharded one (its dim-0 chunk), or a copy of the whole."""
        if not isinstance(tensor, DTensor):
            return self._copy(key, tensor)
        if tensor.placements != (Shard(0),):  # not FSDP2's layout: gathered now, in the foreground
            return self._copy(key, tensor.full_tensor())
        return LocalRows(key, self._copy(key, tensor.to_local()), tensor.shape)

    def take(self, state: Any, prefix: str, local: bool = False) -> Any:
        """`state` (nested dicts and lists) with every tensor copied into its reused buffer (with `local`, FSDP
        shards as this rank's `LocalRows`); anything else deep-copied, since training goes on changing the live
        state while the writer serialises this. In the training thread."""
        self._copied = None
        copy_tensor = self._copy_local if local else self._copy
        taken = _map_tensors(state, prefix, lambda key, tensor: copy_tensor(key, tensor))
        if self._copied is not None:
            self._copied.record()  # the end of the copies queued on the GPU stream
        return taken

    def wait_copied(self) -> None:
        """In the writer thread: the copies queued on the GPU have landed."""
        if self._copied is not None:
            self._copied.synchronize()

    def gather(self, taken: Any, group: torch.distributed.ProcessGroup, is_main: bool) -> Any:
        """In the writer thread of every rank, over `group` (its own, so as not to interleave with training's
        collectives): each `LocalRows` of `taken` gathered to the main process, which gets the full tensors (the
        other ranks get None in their place). The same order on every rank: the dicts' order. Every buffer is
        reused from one checkpoint to the next, as `_copy`'s are: allocating the full state anew at each save made
        the main process's memory grow by about a checkpoint each time (freed memory that glibc's per-thread
        arenas keep)."""
        self.wait_copied()
        main = torch.distributed.get_global_rank(group, 0)

        def full(key: str, value: Any) -> Any:
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
            whole = self._buffer(f"{value.key}/full", value.shape, dtype)  # safetensors wants tensors that own
            return whole.copy_(out[:total])

        return _map_tensors(taken, "", full)


def _map_tensors(value: Any, key: str, function: Callable[[str, Any], Any]) -> Any:
    """`value` with function(key path, leaf) applied to each tensor or LocalRows leaf; other leaves deep-copied."""
    if torch.is_tensor(value) or isinstance(value, LocalRows):
        return function(key, value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, f"{key}/{k}", function) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_tensors(v, f"{key}/{i}", function) for i, v in enumerate(value)]
    return copy.deepcopy(value)
