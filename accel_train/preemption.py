"""Stop cleanly when the cluster says so: SLURM's warning signal (`#SBATCH --signal=USR1@120`) or SIGTERM."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatch:
    """Notes a stop signal; the loop asks at each optimizer step boundary whether any rank got one."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # only a flag here: the step in flight finishes first

    def should_stop(self) -> bool:
        """True on every rank as soon as one rank got a signal, so that all save the same step and stop."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        # One scalar all-reduce per step: a signal may reach the ranks at slightly different steps.
        flag = torch.tensor(float(self.received is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
