"""Run a script with Accelerate's FSDP enabled on CPU processes (gloo), for the tests: a launcher like pi_stand_in.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py accel_train/train.py ARGS

Accelerate 1.16 switches to `DistributedType.FSDP` in `AcceleratorState.__init__` only for the GPU-like
multi-process types; with gloo on CPU (`MULTI_CPU`) it drops the FSDP plugin without a word and the run is plain
DDP. torch's FSDP2 itself runs on CPU with gloo, so this shim takes, for `MULTI_CPU`, exactly the branch Accelerate
takes for `MULTI_GPU` (after the original `__init__`): distributed type FSDP, the plugin's mixed precision, the
plugin, and `PartialState`'s shared distributed type. Everything after that is Accelerate's and the trainer's
code, unchanged. It stops the run when Accelerate no longer needs the shim (FSDP already set: delete it) or when
the state it patches is not what it expects (read the new `AcceleratorState.__init__` and adapt it).
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self: AcceleratorState, *args: Any, **kwargs: Any) -> None:
    already = bool(AcceleratorState._shared_state)  # a later AcceleratorState() shares the first one's state
    _original_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if already or plugin is None:
        return
    if self.distributed_type == DistributedType.FSDP:
        raise SystemExit("tests/fsdp_on_cpu.py: this Accelerate enables FSDP on CPU by itself; remove the shim.")
    if self.distributed_type != DistributedType.MULTI_CPU or not hasattr(plugin, "set_mixed_precision"):
        raise SystemExit(
            f"tests/fsdp_on_cpu.py: expected a MULTI_CPU state with an FSDP plugin, found {self.distributed_type} "
            f"and {type(plugin).__name__}; Accelerate's AcceleratorState changed, adapt the shim."
        )
    self.distributed_type = DistributedType.FSDP
    if self._mixed_precision != "no":
        plugin.set_mixed_precision(self._mixed_precision)
    self.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
