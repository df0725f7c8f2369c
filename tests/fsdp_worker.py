"""One process of the FSDP checkpoint test (tests/test_fsdp.py), started by torchrun on CPU (gloo).

Accelerate sets up FSDP only on GPUs, so this drives torch's FSDP2 (`fully_shard`) the way Accelerate does for
`configs/accelerate/fsdp.yaml` with FULL_STATE_DICT: it gathers the full weights and the name-keyed optimizer
state to rank 0 and writes them under Accelerate's file names; the trainer's own code does the rest
(`consolidate_fsdp_files`, `parameter_names`, `load_sharded_policy_weights`, `load_sharded_optimizer`).

    python fsdp_worker.py --shard|--plain --steps N [--load CHECKPOINT] --out FOLDER
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from accel_train import checkpoint as ckpt
from accel_train import checkpointer


class Policy(torch.nn.Module):
    """Shaped like ACT where it matters here: a partly frozen backbone, a buffer, and optimizer groups that are
    not in named_parameters() order (lerobot puts the backbone in its own group, after the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        self.backbone[0].requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)) * self.scale


def param_groups(model: Policy) -> list[dict]:
    return [
        {"params": [p for n, p in model.named_parameters() if n.startswith("head")]},
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": 1e-3, "weight_decay": 0.0},
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard", action="store_true")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)
    model = Policy()
    names = checkpointer.parameter_names(model, torch.optim.AdamW(param_groups(model)))
    if args.shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model.head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(param_groups(model), lr=1e-2, weight_decay=0.1)
    if args.load and args.shard:  # after sharding, as the trainer restores after accelerator.prepare
        checkpointer.load_sharded_policy_weights(model, args.load)
        checkpointer.load_sharded_optimizer(args.load, model, optimizer, names)
    elif args.load:
        load_model(model, args.load / ckpt.POLICY_FILE)
        optimizer.load_state_dict(ckpt.load_tensors(args.load / ckpt.OPTIMIZER_FILE))

    data = torch.Generator().manual_seed(1 + (args.load is not None))
    for _ in range(args.steps):  # every rank sees the same batch, so the mean gradient is the one-process one
        x, y = torch.randn(32, 6, generator=data), torch.randn(32, 3, generator=data)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    args.out.mkdir(parents=True, exist_ok=True)
    if args.shard:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            torch.save(weights, args.out / checkpointer.FSDP_MODEL_FILE)
            torch.save(optimizer_state, args.out / "optimizer.bin")
            checkpointer.consolidate_fsdp_files(args.out)
    else:
        save_model(model, str(args.out / ckpt.POLICY_FILE))
        torch.save(optimizer.state_dict(), args.out / ckpt.OPTIMIZER_FILE)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: after FSDP2 on gloo, torch's C++ static destructors abort about one exit
    # in ten ("terminate called without an active exception") although every rank finished its work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
