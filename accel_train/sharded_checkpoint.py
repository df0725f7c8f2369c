"""Sharded checkpoints: every process writes the part of the policy and optimizer state it holds, any number of
processes loads them back, and one process without a GPU turns them into the consolidated files.

The consolidated checkpoint (accel_train.checkpointer) gathers every tensor into the main process, which alone writes
policy.safetensors and optimizer_state.pth. Here each process writes its own part, in parallel: under FSDP its
shards; without FSDP (every process holds a replica) about 1/N of the tensors (`written_here`). Written with
torch.distributed.checkpoint (DCP) in the format of its HuggingFace storage: one safetensors file per process, each
chunk's place in its tensor in the file's header (`DCP_SHARDING_INFO`). Loading reads those headers (JSON) and the
tensors (torch's HuggingFaceStorageReader): nothing read is unpickled. (DCP's default FileSystemReader pickle.loads
its `.metadata` and torch.loads non-tensor items with weights_only=False; a checkpoint can come from a stranger on
the Hub. DCP's collectives do exchange their plans with pickle, between the processes of one run.) What is not a
tensor (the optimizer's hyperparameters, the names the consolidated files need) goes into a JSON file beside them.

Tensors are named by their fully qualified names in the policy, which neither the number of processes nor FSDP
changes: a checkpoint written by N processes loads into M, with or without FSDP, each process reading only the
parts of the chunks it holds.

Saving blocks the training thread while it copies its part into CPU buffers kept from one save to the next (pinned
on a GPU, where it only queues the copies); a writer thread writes them, tensor by tensor from those buffers, and
runs DCP's collectives over a gloo group of their own.

Layout inside a checkpoint folder:
    shards/
        shard-00001-model-00001-of-00001.safetensors   process 0's tensors
        shard-00002-model-00001-of-00001.safetensors   process 1's (a process with nothing to write has no file)
        ...
        index.json                                     everything else, written last, by the main process

Tensor names in the shards (`SHARD_MODEL`, `SHARD_OPTIMIZER`):
    model/<fqn>                    the policy's state dict; a weight tied under several names once, under the name
                                   safetensors' save_model keeps; for an adapter (PEFT) policy only what the
                                   consolidated format saves (adapters, modules_to_save), under the live names
    optimizer/<fqn>/<state key>    the optimizer's tensors, e.g. optimizer/head.weight/exp_avg

index.json:
    format          FORMAT
    world_size      processes that wrote the shards
    files           {shard file: bytes}
    tensors         {shard tensor name: {"shape": [...], "dtype": "float32"}}, every tensor the shards hold
    model           [fqn, ...]: the policy tensors, in state-dict order
    tied            {dropped name: kept name}, save_model's header (empty for an adapter policy)
    adapter_names   {fqn: name in PEFT's adapter file}, or null for a plain policy
    optimizer       param_groups (as the optimizer's state_dict gives them, `params` as fqns; the keys whose values
                    were tuples in `tuples`, one list per group) and state ([fqn, [keys in order], {non-tensor
                    values}] per parameter with state, in the optimizer's order)
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import _remove_duplicate_names
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    SAVED_OFFSETS_KEY,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from accel_train.errors import TrainError, first_line

SHARDS_DIR = "shards"
SHARD_INDEX_FILE = "index.json"
SHARD_SUFFIX = ".safetensors"
SHARD_FILE = "shard-{:05d}-model-00001-of-00001" + SHARD_SUFFIX  # torch's HuggingFace writer's name, process i - 1
SHARD_MODEL = "model/"
SHARD_OPTIMIZER = "optimizer/"
FORMAT = 1

# dcp.save/load with no_dist=True (one process, or the export) warn each time that they assume one process: intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def is_adapted(policy: torch.nn.Module) -> bool:
    """A policy wrapped with PEFT adapters (--peft)."""
    return hasattr(policy, "peft_config")


def adapter_names(policy: torch.nn.Module) -> dict[str, str]:
    """{fqn: name in PEFT's adapter file} for what PEFT's `get_peft_model_state_dict` saves of the policy: the
    tensors of the consolidated adapter checkpoint, matched by identity (PEFT renames them)."""
    from peft.utils import get_peft_model_state_dict

    own = policy.state_dict(keep_vars=True)
    key_of = {id(tensor): key for key, tensor in own.items()}
    return {key_of[id(t)]: saved for saved, t in get_peft_model_state_dict(policy, state_dict=own).items()}


def tied_names(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{dropped name: kept name} for weights tied under several names: the choice save_model makes.

    safetensors' `_remove_duplicate_names` is what `save_model` calls; it has no public twin, and the copies, the
    loaders and the export must choose exactly as save_model does for their files to match its files. FSDP's
    sharded tensors (DTensor) have no storage of their own to compare and are never tied here.
    """
    local = {name: tensor for name, tensor in state_dict.items() if not isinstance(tensor, DTensor)}
    return {dropped: kept for kept, group in _remove_duplicate_names(local).items() for dropped in group}


def tied_weights(policy: torch.nn.Module) -> dict[str, str]:
    """{dropped: kept} for the policy's tensors registered under several names, as save_model chooses: its own
    choice for plain tensors (`tied_names`); FSDP's DTensors, which have no storage to compare, by identity
    (FSDP2 registers one DTensor under every name), keeping the first name in sorted order as save_model does."""
    state = policy.state_dict(keep_vars=True)
    tied = tied_names(state)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        if isinstance(tensor, DTensor):
            groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        tied.update({name: min(names) for name in names if name != min(names)})
    return tied


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list):
        for item in value:
            _check_json(item, where)
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_json(item, where)
    else:
        raise TypeError(f"the sharded checkpoint stores {where} as JSON, and {type(value).__name__} is not JSON")


def _optimizer_index(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An FQN-keyed optimizer state dict -> (index.json's `optimizer`, its tensors by shard name)."""
    groups, tuples = [], []
    for group in state_dict["param_groups"]:
        tuples.append([key for key, value in group.items() if isinstance(value, tuple)])
        groups.append({key: list(value) if isinstance(value, tuple) else value for key, value in group.items()})
        _check_json(groups[-1], "the optimizer's param_groups")
    state, tensors = [], {}
    for fqn, values in state_dict["state"].items():
        plain = {key: value for key, value in values.items() if not torch.is_tensor(value)}
        _check_json(plain, f"the optimizer state of {fqn}")
        tensors.update({f"{SHARD_OPTIMIZER}{fqn}/{k}": v for k, v in values.items() if torch.is_tensor(v)})
        state.append([fqn, list(values), plain])
    return {"param_groups": groups, "tuples": tuples, "state": state}, tensors


def _param_groups(optimizer: dict[str, Any]) -> list[dict[str, Any]]:
    """index.json's param_groups as the optimizer's state_dict gives them: with their tuples (Adam's betas)."""
    return [
        {key: tuple(value) if key in tuples else value for key, value in group.items()}
        for group, tuples in zip(optimizer["param_groups"], optimizer["tuples"], strict=True)
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TrainError(f"The sharded checkpoint names an unknown dtype {name!r}.")
    return dtype


class _Staging:
    """CPU copies of this process's tensors, in buffers kept from one save to the next (pinned when the tensor is
    on a GPU, so the copy is one DMA the training thread only queues). A DTensor's local shard is copied; DCP plans
    with a stand-in of the same layout whose local tensor is on the meta device, so the writer thread never
    touches the live tensors."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._stand_ins: dict[str, DTensor] = {}
        self._copied: torch.cuda.Event | None = None

    def _buffer(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        pin = tensor.is_cuda
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype or buffer.is_pinned() != pin:
            buffer = self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        return buffer.copy_(tensor.detach(), non_blocking=pin)

    def _stand_in(self, key: str, tensor: DTensor) -> DTensor:
        stand_in = self._stand_ins.get(key)
        if stand_in is None or stand_in.shape != tensor.shape or stand_in.placements != tensor.placements:
            local = torch.empty(tensor.to_local().shape, dtype=tensor.dtype, device="meta")
            stand_in = DTensor.from_local(
                local,
                tensor.device_mesh,
                tensor.placements,
                run_check=False,
                shape=tensor.shape,
                stride=tensor.stride(),
            )
            self._stand_ins[key] = stand_in
        return stand_in

    def stage(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(what DCP saves: buffers and stand-ins, the local buffer of each stand-in)."""
        self._copied = None
        staged, local = {}, {}
        for key, tensor in tensors.items():
            if isinstance(tensor, DTensor):
                local[key] = self._buffer(key, tensor.to_local())
                staged[key] = self._stand_in(key, tensor)
            else:
                staged[key] = self._buffer(key, tensor)
        if any(tensor.is_cuda for tensor in tensors.values()):  # the copies are queued on the current stream
            self._copied = torch.cuda.Event()
            self._copied.record()
        return staged, local

    def wait_copied(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()


class _StagedPlanner(DefaultSavePlanner):
    """DCP's default planner, reading each DTensor's data from its staged CPU copy instead of the stand-in."""

    def __init__(self, local: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._local = local

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self._local:
            return self._local[index.fqn]
        return super().lookup_object(index)


def written_here(tensors: dict[str, torch.Tensor], world: int, rank: int) -> dict[str, torch.Tensor]:
    """What process `rank` of `world` writes of `tensors`: its shard of each DTensor, and the plain tensors (replicas
    in every process: the parameters without FSDP, buffers, the optimizer's step counts) given to it. Each replica
    goes to the process with the fewest bytes so far, in order: every process holds the same names and shapes in
    the same order, so all make the same choice. Only these are staged: without FSDP each process copies and writes
    about 1/N of the state. (DCP's own deduplication also picks one writer per replica, but at planning, in the
    writer thread, after every process has copied them all.)"""
    replicas = [key for key, tensor in tensors.items() if not isinstance(tensor, DTensor)]
    owners = dict(zip(replicas, replica_owners([tensors[k].numel() * tensors[k].element_size() for k in replicas],
                                               world), strict=True))  # fmt: skip
    return {key: tensor for key, tensor in tensors.items() if owners.get(key, rank) == rank}


def replica_owners(sizes: list[int], world: int) -> list[int]:
    """The process that writes each replicated tensor of `sizes` bytes, in order: the one given the fewest bytes so
    far (accel_train.plan counts with it)."""
    given, owners = [0] * world, []
    for size in sizes:
        owners.append(given.index(min(given)))
        given[owners[-1]] += size
    return owners


class _ShardWriter(HuggingFaceStorageWriter):
    """torch's HuggingFace storage writer (its planning, one file per process, the header metadata its reader
    reads: `DCP_SHARDING_INFO`, each chunk's offsets in its tensor), writing each tensor from its staged buffer
    straight into the file. torch's own write_data first serialises the whole file into one bytes object
    (safetensors.torch.save), as much memory again as the process's part of the state."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        items = {item.index.fqn: item for item in plan.items}  # one chunk per tensor and process
        if len(items) != len(plan.items):
            raise ValueError("a process holds several chunks of one tensor; the shard writer writes one")
        name = SHARD_FILE.format(plan.storage_data["shard_index"])
        chunks = {fqn: item.tensor_data for fqn, item in items.items()}
        specs = {
            fqn: {"shape": list(c.chunk.sizes), "dtype": _dtype_name(c.properties.dtype)} for fqn, c in chunks.items()
        }
        offsets = {fqn: {SAVED_OFFSETS_KEY: list(c.chunk.offsets)} for fqn, c in chunks.items()}
        metadata = {
            CUSTOM_METADATA_KEY: json.dumps(offsets),
            DCP_VERSION_KEY: str(HF_DCP_VERSION),
            FORMAT_KEY: FORMAT_VALUE,
        }
        if items:  # like torch's: no file for a process with nothing to write
            _write_safetensors(Path(self.path) / name, specs, metadata, lambda fqn: planner.resolve_data(items[fqn]))
        results = [WriteResult(item.index, item.tensor_storage_size() or 0, name) for item in plan.items]
        future: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        future.set_result(results)
        return future


@dataclass(frozen=True)
class Staged:
    """A save's staged half: where it goes, this process's CPU copies, and index.json but its `files`."""

    shards: Path
    staged: dict[str, Any]
    local: dict[str, torch.Tensor]
    index: dict[str, Any]


@contextmanager
def _unwrapped(what: str) -> Iterator[None]:
    """DCP reports a failure on any process as a CheckpointException, on every process; it derives from
    BaseException, so `except Exception` would let it through (a writer thread would die with it unreported). The
    first failing process's own exception is raised instead (an OSError stays an OSError: "[Errno 28] ...")."""
    try:
        yield
    except CheckpointException as error:
        rank, (first, _) = min(error.failures.items())
        if isinstance(first, (OSError, TrainError)):
            raise first from None
        raise RuntimeError(f"{what} failed on process {rank}: {type(first).__name__}: {first}") from None


class ShardedState:
    """The policy's and optimizer's state as sharded checkpoints; every process of `group` calls every method.

    `policy` is the unwrapped policy (FSDP2-sharded or not), `optimizer` the torch optimizer (not Accelerate's
    wrapper), `group` a gloo process group over all processes (CPU tensors; the writer thread's collectives go
    through it, so they never interleave with training's on the default group), or None in a single process.
    """

    def __init__(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None):
        if group is None and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("ShardedState needs a process group when several processes run")
        self.policy, self.optimizer, self.group = policy, optimizer, group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.is_main = self.rank == 0
        self.world_size = 1 if group is None else dist.get_world_size(group)
        self.adapter_names = adapter_names(policy) if is_adapted(policy) else None
        self.tied = {} if self.adapter_names is not None else tied_weights(policy)
        self._staging = _Staging()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sharded-checkpoint")
        self._pending: Future | None = None

    def _model_names(self, state: dict[str, torch.Tensor]) -> list[str]:
        if self.adapter_names is not None:
            return [name for name in state if name in self.adapter_names]
        return [name for name in state if name not in self.tied]

    def _live_state(self, saving: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The policy's and optimizer's state dicts, keyed by fqn, holding the live (local or sharded) tensors."""
        options = StateDictOptions(full_state_dict=False)
        model = get_model_state_dict(self.policy, options=options)
        if saving and not self.optimizer.state:
            # Before the first step torch's get_optimizer_state_dict creates the state by a step at learning rate 0,
            # which Adam counts (its bias correction): the checkpoint holds no state, as the optimizer does.
            names = {param: name for name, param in self.policy.named_parameters()}
            fqns = [names[param] for group in self.optimizer.param_groups for param in group["params"]]
            groups = self.optimizer.state_dict()["param_groups"]
            return model, {
                "state": {},
                "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in groups],
            }
        return model, get_optimizer_state_dict(self.policy, self.optimizer, options=options)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the tensors to write, by shard name; index.json but its `files`)."""
        model, optimizer = self._live_state(saving=True)
        names = self._model_names(model)
        tensors = {SHARD_MODEL + name: model[name] for name in names}
        optimizer_index, optimizer_tensors = _optimizer_index(optimizer)
        tensors.update(optimizer_tensors)
        index = {
            "format": FORMAT,
            "world_size": self.world_size,
            "tensors": {key: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for key, t in tensors.items()},
            "model": names,
            "tied": self.tied,
            "adapter_names": self.adapter_names,
            "optimizer": optimizer_index,
        }
        return tensors, index

    def stage_and_save(self, folder: Path, blocking: bool = False) -> Future:
        """Write the state into `folder`/shards. The calling thread waits for the previous save, then copies this
        process's tensors into CPU buffers (on a GPU it only queues the copies); a writer thread writes them and,
        on the main process, index.json. Returns that write's future; `wait()` raises its error. With `blocking`,
        returns when it is written."""
        staged = self.stage(folder)
        self._pending = self._writer.submit(self.write, staged)
        if blocking:
            self.wait()
        return self._pending

    def stage(self, folder: Path) -> Staged:
        """The first half of a save, in the training thread: this process's tensors copied into CPU buffers."""
        self.wait()
        shards = Path(folder) / SHARDS_DIR
        if shards.is_dir() and any(shards.iterdir()):
            raise FileExistsError(f"{shards} is not empty: a sharded checkpoint is written into a new folder")
        tensors, index = self._state()
        staged, local = self._staging.stage(written_here(tensors, self.world_size, self.rank))
        return Staged(shards, staged, local, index)

    def write(self, job: Staged) -> None:
        """The second half, in a writer thread of every process (collective over the group): DCP's save (plans
        gathered to the main process and scattered back, write results gathered to it, finish), then, on the main
        process once every process has written, a check that the shards hold every tensor whole, and index.json.
        A failure on any process raises on every process, as the OSError (or other error) it was."""
        self._staging.wait_copied()
        with _unwrapped(f"Writing {job.shards}"):
            dcp.save(
                job.staged,
                storage_writer=_ShardWriter(str(job.shards), save_distributed=True),
                planner=_StagedPlanner(job.local),
                process_group=self.group,
                no_dist=self.group is None,
            )
        if self.is_main:
            index = job.index
            index["files"] = {path.name: path.stat().st_size for path in sorted(job.shards.glob(f"*{SHARD_SUFFIX}"))}
            check_shards(job.shards, index)
            _write_json(job.shards / SHARD_INDEX_FILE, index)

    def wait(self) -> None:
        """Block until the save in flight is written: this process's shards and DCP's finish step (on the main
        process also index.json). Raises the writer's error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        self._writer.shutdown()

    def load(self, folder: Path, with_optimizer: bool = True) -> None:
        """Load `folder`/shards into the live policy and optimizer (without `with_optimizer`, the policy only:
        --init_from), whatever the number of processes that wrote them and whether either run used FSDP. Every
        process reads the parts of the chunks it holds."""
        self.wait()
        shards = Path(folder) / SHARDS_DIR
        index = read_index(shards)
        check_shards(shards, index)
        if not with_optimizer:
            model = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=False))
            index = {**index, "optimizer": {"param_groups": [], "state": []}}
            optimizer = {"param_groups": [], "state": {}}
        else:
            model, optimizer = self._live_state()
        targets = self._targets(shards, index, model, optimizer)
        with _unwrapped(f"Reading {shards}"):
            dcp.load(
                targets,
                storage_reader=HuggingFaceStorageReader(str(shards)),
                process_group=self.group,
                no_dist=self.group is None,
            )
        loaded = {name: targets[SHARD_MODEL + name] for name in index["model"]}
        for dropped, kept in index["tied"].items():
            loaded[dropped] = loaded[kept]
        # An adapter checkpoint holds the trained tensors only; the frozen base is the policy's own.
        strict = StateDictOptions(full_state_dict=False, strict=self.adapter_names is None)
        set_model_state_dict(self.policy, loaded, options=strict)
        state = {
            fqn: {key: values[key] if key in values else targets[f"{SHARD_OPTIMIZER}{fqn}/{key}"] for key in keys}
            for fqn, keys, values in index["optimizer"]["state"]
        }
        if not with_optimizer:
            return
        # Not strict: a parameter that never had a gradient has no state, here as in the optimizer's own state_dict.
        set_optimizer_state_dict(
            self.policy,
            self.optimizer,
            {"state": state, "param_groups": _param_groups(index["optimizer"])},
            options=StateDictOptions(full_state_dict=False, strict=False),
        )

    def _targets(self, shards: Path, index: dict, model: dict, optimizer: dict) -> dict[str, torch.Tensor]:
        """The live tensors DCP loads into, by shard name; a readable error when the checkpoint does not fit."""
        if (index["adapter_names"] is None) != (self.adapter_names is None):
            kinds = ("an adapter (PEFT)", "a plain")
            saved, live = kinds[index["adapter_names"] is None], kinds[self.adapter_names is None]
            raise TrainError(f"{shards} holds {saved} policy's state, the policy being built is {live} one (--peft).")
        _same_names(shards, "policy tensors", index["model"], self._model_names(model))
        saved_groups = [group["params"] for group in index["optimizer"]["param_groups"]]
        live_groups = [group["params"] for group in optimizer["param_groups"]]
        _same_names(shards, "optimizer parameters", sum(saved_groups, []), sum(live_groups, []))
        if list(map(sorted, saved_groups)) != list(map(sorted, live_groups)):
            raise TrainError(
                f"{shards} holds optimizer parameter groups of {[len(g) for g in saved_groups]} parameters, this "
                f"policy's optimizer groups of {[len(g) for g in live_groups]}: another optimizer setup."
            )
        targets = {SHARD_MODEL + name: model[name] for name in index["model"]}
        for fqn, keys, values in index["optimizer"]["state"]:
            live = optimizer["state"].get(fqn, {})
            for key in (k for k in keys if k not in values):
                if not torch.is_tensor(live.get(key)):
                    raise TrainError(f"{shards} holds optimizer state '{key}' for {fqn}, which this optimizer lacks.")
                targets[f"{SHARD_OPTIMIZER}{fqn}/{key}"] = live[key]
        for key, tensor in targets.items():
            if tuple(index["tensors"][key]["shape"]) != tuple(tensor.shape):
                raise TrainError(
                    f"{shards} has '{key}' of shape {tuple(index['tensors'][key]['shape'])}, the policy being built "
                    f"expects {tuple(tensor.shape)}: the checkpoint has another architecture."
                )
        return targets


def _same_names(shards: Path, what: str, saved: list[str], live: list[str]) -> None:
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise TrainError(
            f"{shards} does not fit the policy being built: {len(missing)} missing {what} "
            f"({', '.join(missing[:3])}...) and {len(unexpected)} unexpected ones ({', '.join(unexpected[:3])}...). "
            "The checkpoint comes from another policy type, architecture or adapter setting (--peft)."
        )


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as file:
        json.dump(value, file)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


def read_index(shards: Path) -> dict[str, Any]:
    """index.json of a sharded checkpoint (JSON only), with a readable error when it is missing or foreign."""
    path = shards / SHARD_INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainError(
            f"Could not read {path} ({first_line(error)}): the sharded checkpoint is incomplete."
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise TrainError(f"{path} is of sharded checkpoint format {found!r}; this accel-train reads format {FORMAT}.")
    return index


def check_shards(shards: Path, index: dict[str, Any]) -> Metadata:
    """The shards' DCP metadata, read from their safetensors headers; a readable error when a file is missing,
    truncated or unreadable, or when the chunks do not make up every tensor of index.json whole."""
    for name, size in index["files"].items():
        path = shards / name
        if not path.is_file():
            raise TrainError(f"{path} is missing: the sharded checkpoint is incomplete.")
        if path.stat().st_size != size:
            raise TrainError(f"{path} has {path.stat().st_size} bytes instead of {size}: it is truncated or damaged.")
        try:
            with safetensors.safe_open(path, "pt"):
                pass
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise TrainError(f"{path} is not a readable safetensors file ({first_line(error)}).") from None
    extra = sorted({p.name for p in shards.glob(f"*{SHARD_SUFFIX}")} - set(index["files"]))
    if extra:
        raise TrainError(f"{shards} holds shard files that its {SHARD_INDEX_FILE} does not list: {', '.join(extra)}.")
    metadata = HuggingFaceStorageReader(str(shards)).read_metadata()
    for key, spec in index["tensors"].items():
        stored = metadata.state_dict_metadata.get(key)
        chunks = getattr(stored, "chunks", None)
        if chunks is None or tuple(stored.size) != tuple(spec["shape"]) or not _tiles(chunks, spec["shape"]):
            raise TrainError(f"{shards}'s files do not hold all of '{key}': a shard file is missing or foreign.")
    return metadata


def _tiles(chunks: list[ChunkStorageMetadata], shape: list[int]) -> bool:
    """Whether the chunks cover a tensor of `shape` exactly: inside it, disjoint, as many elements as it has."""
    boxes = [(list(c.offsets), list(c.sizes)) for c in chunks if math.prod(c.sizes)]
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(shape):
        return False
    if any(o < 0 or o + s > n for offsets, sizes in boxes for o, s, n in zip(offsets, sizes, shape, strict=True)):
        return False
    return not any(
        all(a < c + d and c < a + b for a, b, c, d in zip(*boxes[i], *boxes[j], strict=True))
        for i in range(len(boxes))
        for j in range(i)
    )


# Export: the consolidated files from the shards, one tensor in memory at a time.


class _IndexedReader(HuggingFaceStorageReader):
    """The HuggingFace reader, reading the shards' headers once for the many one-tensor loads of an export."""

    _metadata: Metadata | None = None

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


def export_consolidated(shards: Path, dest: Path, with_optimizer: bool = True) -> list[Path]:
    """Write dest/policy.safetensors and (`with_optimizer`) dest/optimizer_state.pth, the consolidated checkpoint's
    files of the state
    in `shards` (a plain policy's file as safetensors' save_model writes it, an adapter policy's as PEFT names its
    tensors; the optimizer's state_dict with integer ids, torch.save's format). No process group, no GPU: each tensor
    is read whole from its chunks, written and dropped, so memory holds about the largest tensor."""
    from accel_train.checkpoint import OPTIMIZER_FILE, POLICY_FILE  # not at the top: see tied_weights

    index = read_index(shards)
    check_shards(shards, index)
    reader = _IndexedReader(str(shards))

    def read(key: str) -> torch.Tensor:
        spec = index["tensors"][key]
        tensor = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
        dcp.load(
            {key: tensor}, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True
        )
        return tensor

    dest.mkdir(parents=True, exist_ok=True)
    renamed = index["adapter_names"] or {}
    policy = {renamed.get(fqn, fqn): SHARD_MODEL + fqn for fqn in index["model"]}
    specs = {name: index["tensors"][key] for name, key in policy.items()}
    _write_safetensors(dest / POLICY_FILE, specs, index["tied"] or None, lambda name: read(policy[name]))
    if not with_optimizer:
        return [dest / POLICY_FILE]
    _write_optimizer(dest / OPTIMIZER_FILE, index, read)
    return [dest / POLICY_FILE, dest / OPTIMIZER_FILE]


def _raw(tensor: torch.Tensor) -> Any:
    """A tensor's bytes as a buffer (no copy), for file.write and zlib.crc32."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _safetensors_dtypes(dtypes: set[torch.dtype]) -> dict[torch.dtype, tuple[int, str]]:
    """{dtype: (its place in safetensors' order of tensors, its name in a safetensors header)}, as the installed
    safetensors writes them: read from the header of a file of one tiny tensor per dtype."""
    dtypes = sorted(dtypes, key=str)
    probe = safetensors.torch.save({str(i): torch.zeros(1, dtype=d) for i, d in enumerate(dtypes)})
    (length,) = struct.unpack("<Q", probe[:8])
    header = json.loads(probe[8 : 8 + length])
    names = [name for name in header if name != "__metadata__"]
    return {dtypes[int(name)]: (place, header[name]["dtype"]) for place, name in enumerate(names)}


def _write_safetensors(
    path: Path, specs: dict[str, dict], metadata: dict[str, str] | None, read: Callable[[str], torch.Tensor]
) -> None:
    """The file safetensors' save_file writes, one tensor in memory at a time: safetensors has no streaming writer
    (save_file serialises every tensor into one buffer first). Its format: the header's length (8 bytes, little
    endian), the header (compact JSON: `__metadata__` first, then each tensor's dtype, shape and data_offsets,
    padded with spaces to a multiple of 8 bytes), then the tensors' bytes, in safetensors' order: by dtype (its
    order, probed), then name."""
    dtypes = _safetensors_dtypes({_dtype(spec["dtype"]) for spec in specs.values()})
    order = sorted(specs, key=lambda name: (dtypes[_dtype(specs[name]["dtype"])][0], name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype = _dtype(specs[name]["dtype"])
        size = math.prod(specs[name]["shape"]) * dtype.itemsize
        header[name] = {
            "dtype": dtypes[dtype][1],
            "shape": specs[name]["shape"],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            file.write(_raw(read(name)))
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


def _write_optimizer(path: Path, index: dict[str, Any], read: Callable[[str], torch.Tensor]) -> None:
    """torch.save of the optimizer's integer-indexed state_dict, one tensor in memory at a time: the file is written
    with torch.serialization.skip_data from tensors that hold no memory (FakeTensors: shapes and dtypes only), which
    leaves each storage's bytes empty, then each tensor's bytes are written into its place and its CRC into the zip
    records."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    optimizer = index["optimizer"]
    ids = {fqn: i for i, fqn in enumerate(fqn for group in optimizer["param_groups"] for fqn in group["params"])}
    keys: list[str] = []  # the shard tensors in the order torch.save numbers their storages: the pickling order
    state: dict[int, dict[str, Any]] = {}
    with FakeTensorMode():
        for fqn, names, values in optimizer["state"]:
            state[ids[fqn]] = {}
            for name in names:
                if name in values:
                    state[ids[fqn]][name] = values[name]
                    continue
                keys.append(f"{SHARD_OPTIMIZER}{fqn}/{name}")
                spec = index["tensors"][keys[-1]]
                state[ids[fqn]][name] = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
    groups = [{**group, "params": [ids[fqn] for fqn in group["params"]]} for group in _param_groups(optimizer)]
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({"state": state, "param_groups": groups}, tmp)
    _fill_storages(tmp, [lambda key=key: read(key) for key in keys])
    tmp.replace(path)


STORAGE_RECORD = re.compile(r"^[^/]+/data/(\d+)$")


def _fill_storages(path: Path, tensors: list[Callable[[], torch.Tensor]]) -> None:
    """Write storage k's bytes (the k-th tensor) into a torch.save file written with skip_data, and the CRC-32 of
    each into its zip records: the data descriptor after the bytes (torch writes records with one) and the central
    directory entry."""
    with zipfile.ZipFile(path) as archive:
        records = {int(m[1]): info for info in archive.infolist() if (m := STORAGE_RECORD.match(info.filename))}
        directory = archive.start_dir
    if sorted(records) != list(range(len(tensors))):
        raise RuntimeError(f"torch.save wrote {len(records)} storages for {len(tensors)} tensors")
    crcs = {}
    with open(path, "r+b") as file:
        for k, take in enumerate(tensors):
            info, raw = records[k], _raw(take())
            if info.file_size != raw.nbytes or not info.flag_bits & 0x08:
                raise RuntimeError(f"{info.filename}: torch.save's record is not the {raw.nbytes} bytes expected")
            file.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            file.seek(info.header_offset + 30 + name_length + extra_length)
            file.write(raw)
            crcs[info.filename] = crc = zlib.crc32(raw)
            signature = file.read(4) == b"PK\x07\x08"  # the data descriptor: [signature], CRC-32, sizes
            file.seek(file.tell() - (0 if signature else 4))
            file.write(struct.pack("<I", crc))
        _patch_central_directory(file, directory, crcs)
        file.flush()
        os.fsync(file.fileno())


def _patch_central_directory(file: Any, offset: int, crcs: dict[str, int]) -> None:
    """Set the CRC-32 of the named records in the zip's central directory, which starts at `offset`."""
    file.seek(offset)
    while (entry := file.read(46))[:4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack("<HHH", entry[28:34])
        name = file.read(name_length).decode()
        after = file.tell() + extra_length + comment_length
        if name in crcs:
            file.seek(offset + 16)
            file.write(struct.pack("<I", crcs[name]))
        offset = after
        file.seek(offset)
