"""Stop cleanly when the cluster says so: SLURM's warning signal (`#SBATCH --signal=USR1@120`) or SIGTERM."""

from __future__ import annotations

import logging
import math
import signal
import time
from types import FrameType

import torch
import torch.distributed as dist
from accelerate import Accelerator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# With several processes the ranks agree on a stop through an all-reduce, a host synchronisation: it runs about
# every CHECK_EVERY_S seconds of training, so a signal is acted on within seconds and most steps pay nothing.
CHECK_EVERY_S = 2.0
MAX_CHECK_STEPS = 1000


class PreemptionWatch:
    """Notes a stop signal; at optimizer step boundaries, says whether any rank got one.

    With several processes, `should_stop` exchanges the flag only at the steps where all ranks check: every
    `interval` steps, where `interval` follows from the slowest rank's step time at the previous check, so every
    rank computes the same next check step and all stop after the same step.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self.interval = 1
        self.next_check = 0  # the first boundary checks, and measures the step time
        self._last_check: tuple[int, float] | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # only a flag here: the step in flight finishes first

    def should_stop(self, step: int) -> bool:
        """True on every rank, at the same step, once a rank got a signal."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if step < self.next_check:
            return False
        now = time.perf_counter()
        step_s = (now - self._last_check[1]) / (step - self._last_check[0]) if self._last_check else 0.0
        # One all-reduce carries both: whether any rank got a signal, and the slowest rank's step time.
        values = torch.tensor([float(self.received is not None), step_s], device=self.accelerator.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        stop, slowest_step_s = bool(values[0].item() > 0), values[1].item()
        steps = math.floor(CHECK_EVERY_S / slowest_step_s) if slowest_step_s > 0 else 1
        self.interval = min(max(steps, 1), MAX_CHECK_STEPS)
        self.next_check = step + self.interval
        self._last_check = (step, now)
        return stop

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
