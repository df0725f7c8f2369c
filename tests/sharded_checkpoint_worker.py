"""One process of tests/test_sharded_checkpoint.py: a small model (Linear layers of odd sizes, one weight tied under
two names, a layer that never gets a gradient, a buffer) trained with AdamW, saved and loaded as sharded
checkpoints. Runs under torchrun on CPU (gloo), or alone without a process group. Each argument after DIR is a task,
run in order:

    save:<mode>:<name>   train 3 steps and save DIR/<name>, training one more step while it is written; then save
                         DIR/<name>-next (the staging buffers reused). Rank 0 writes the full state of each,
                         DIR/<name>.pt and DIR/<name>-next.pt, the consolidated checkpoint's files of the first,
                         DIR/<name>-consolidated/, and DIR/<name>.json (world size, mode)
    load:<mode>:<name>   build the model from another seed, load DIR/<name> with unpickling made to fail, compare the
                         full state with DIR/<name>.pt bit for bit; at the world size and mode of the save, also train
                         one more step and compare with DIR/<name>-next.pt

<mode> is `fsdp` (FSDP2's fully_shard) or `plain` (a replica in every process, gradients averaged), with `+peft` a
LoRA adapter policy. Prints `ok <task>` on rank 0 for each task done, `fail <task> ...` on each rank where it
failed (and goes on with the next task).

    torchrun --nproc_per_node 2 sharded_checkpoint_worker.py DIR save:fsdp:a load:plain:a
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from accel_train.sharded_checkpoint import ShardedState

STEPS = 3
POLICY_FILE, OPTIMIZER_FILE = "policy.safetensors", "optimizer_state.pth"  # accel_train.checkpoint's names


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8, bias=False)
        self.mid = nn.Sequential(nn.Linear(8, 13), nn.Tanh(), nn.Linear(13, 8))  # 13 rows: uneven shards
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.embed.weight  # tied: one parameter under two names
        self.unused = nn.Linear(3, 3)  # never gets a gradient: no optimizer state
        self.gain = nn.Parameter(torch.tensor([1.0, 0.0]))  # 2 rows: FSDP leaves a third process none
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(x)) * self.scale) * self.gain[0] + self.gain[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def build(mode: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (its frozen base always from seed 0 with +peft, the adapters from `seed`) and its AdamW."""
    torch.manual_seed(0 if "peft" in mode else seed)
    net = Net()
    if "peft" in mode:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        lora = LoraConfig(r=2, target_modules=["mid.0"], modules_to_save=["mid.2"], init_lora_weights=False)
        net = get_peft_model(net, lora)
    if "fsdp" in mode:
        from torch.distributed.fsdp import fully_shard

        inner = net.base_model.model if "peft" in mode else net
        fully_shard(inner.mid[0])
        fully_shard(inner.mid[2])
        fully_shard(net)
    params = [p for p in net.parameters() if p.requires_grad]
    return net, torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, step: int, mode: str) -> None:
    generator = torch.Generator().manual_seed(1000 * step + rank())
    x, y = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    (net(x) - y).pow(2).mean().backward()
    if "fsdp" not in mode and world() > 1:
        for param in net.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world()
    optimizer.step()


def full_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every tensor whole, copied to CPU (collective; on rank 0, empty elsewhere)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(net, options=options)
    return copy.deepcopy({"model": model, "optimizer": get_optimizer_state_dict(net, optimizer, options=options)})


def same(a: Any, b: Any, where: str = "") -> None:
    """Equal bit for bit, dicts in the same order, tuples still tuples."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@contextmanager
def no_unpickling() -> Iterator[None]:
    """pickle.load/loads and torch.load without weights_only=True fail while this holds."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a sharded checkpoint load unpickled")

    torch_load = torch.load

    def weights_only_load(*args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is not True:
            raise AssertionError("a sharded checkpoint load called torch.load without weights_only=True")
        return torch_load(*args, weights_only=True, **kwargs)

    saved = pickle.load, pickle.loads
    pickle.load = pickle.loads = refuse
    torch.load = weights_only_load
    try:
        yield
    finally:
        pickle.load, pickle.loads = saved
        torch.load = torch_load


def gloo_group() -> dist.ProcessGroup | None:
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def save(folder: Path, mode: str, name: str) -> None:
    net, optimizer = build(mode, seed=0)
    state = ShardedState(net, optimizer, gloo_group())
    for step in range(1, STEPS + 1):
        train_step(net, optimizer, step, mode)
    saved = full_state(net, optimizer)
    state.stage_and_save(folder / name)  # written in the background while the next step trains
    train_step(net, optimizer, STEPS + 1, mode)
    after = full_state(net, optimizer)
    state.stage_and_save(folder / f"{name}-next", blocking=True)
    try:
        if rank() == 0:
            torch.save(saved, folder / f"{name}.pt")
            torch.save(after, folder / f"{name}-next.pt")
            (folder / f"{name}.json").write_text(json.dumps({"world": world(), "mode": mode}))
            write_consolidated(folder / f"{name}-consolidated", mode, saved)
    finally:
        if dist.is_initialized():
            dist.barrier()


def write_consolidated(folder: Path, mode: str, full: dict[str, Any]) -> None:
    """What accel_train.checkpointer writes for this state: save_model of the plain policy (an adapter policy's
    tensors as PEFT names them, save_file), torch.save of the integer-indexed optimizer state_dict."""
    folder.mkdir()
    net, optimizer = build(mode.replace("fsdp", "plain"), seed=0)
    net.load_state_dict(full["model"])
    names = {param: name for name, param in net.named_parameters()}  # checkpointer.parameter_names
    ids = {names[p]: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    saved = full["optimizer"]
    groups = [{**group, "params": [ids[fqn] for fqn in group["params"]]} for group in saved["param_groups"]]
    optimizer.load_state_dict({"state": {ids[fqn]: v for fqn, v in saved["state"].items()}, "param_groups": groups})
    if "peft" in mode:
        from peft.utils import get_peft_model_state_dict

        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(net).items()}, folder / POLICY_FILE)
    else:
        save_model(net, str(folder / POLICY_FILE))
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)


def load(folder: Path, mode: str, name: str) -> None:
    net, optimizer = build(mode, seed=1)
    state = ShardedState(net, optimizer, gloo_group())
    with no_unpickling():
        state.load(folder / name)
    states = {name: full_state(net, optimizer)}
    saved_with = folder / f"{name}.json"  # none for <name>-next
    if saved_with.is_file() and json.loads(saved_with.read_text()) == {"world": world(), "mode": mode}:
        train_step(net, optimizer, STEPS + 1, mode)
        states[f"{name}-next"] = full_state(net, optimizer)
    if rank() == 0:  # after the last collective: a failed comparison leaves no process waiting
        for saved, loaded in states.items():
            same(torch.load(folder / f"{saved}.pt", weights_only=True), loaded, saved)


def main() -> None:
    folder, tasks = Path(sys.argv[1]), sys.argv[2:]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    failed = False
    for task in tasks:
        action, mode, name = task.split(":")
        try:
            {"save": save, "load": load}[action](folder, mode, name)
        except Exception as error:  # the next task runs: every process went through the same collectives
            print(f"fail {task} on rank {rank()}: {type(error).__name__}: {error}", flush=True)
            failed = True
        else:
            if rank() == 0:
                print(f"ok {task}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
