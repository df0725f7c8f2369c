"""What each process of a real training run holds after its first optimizer step, for tests/test_plan.py: the bytes
of its weights (parameters and buffers; under FSDP its shards), gradients and optimizer state, read from the live
tensors and written to OUT/rank<r>.json. A launcher like tests/pi_stand_in.py:

    python tests/plan_measure.py OUT accel_train/train.py ARGS
    accelerate launch ... tests/fsdp_on_cpu.py tests/plan_measure.py OUT accel_train/train.py ARGS

or in the test's own process, `install(OUT, monkeypatch.setattr)` before `train()`.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from accel_train import model


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes this process holds of a tensor: its shard of an FSDP one."""
    held = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return held.numel() * held.element_size()


def install(out: Path, patch: Callable = setattr) -> None:
    """After the trainer prepares its policy parts, hook the optimizer: gradients before its first step, weights
    and optimizer state after it."""
    prepare = model.PolicyParts.prepare

    def prepare_and_measure(parts: model.PolicyParts, accelerator, policy_type: str) -> None:
        prepare(parts, accelerator, policy_type)
        optimizer, measured = parts.optimizer.optimizer, {}  # the torch optimizer inside Accelerate's wrapper
        policy = accelerator.unwrap_model(parts.policy)

        def before(opt: torch.optim.Optimizer, *_) -> None:
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            measured.setdefault("gradients", sum(map(local_bytes, grads)))

        def after(opt: torch.optim.Optimizer, *_) -> None:
            if "optimizer" in measured:
                return
            measured["weights"] = sum(map(local_bytes, [*policy.parameters(), *policy.buffers()]))
            state = [v for values in opt.state.values() for v in values.values() if torch.is_tensor(v)]
            measured["optimizer"] = sum(map(local_bytes, state))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(measured))

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)

    patch(model.PolicyParts, "prepare", prepare_and_measure)


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    script, sys.argv = sys.argv[2], sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
