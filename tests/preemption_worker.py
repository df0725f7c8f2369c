"""One process of tests/test_preemption.py, started by torchrun on CPU (gloo): a loop of short steps in which only
rank 1 gets SIGUSR1, at step SIGNAL_STEP. Prints `stopped <step> after <n> checks` on each rank.

    python preemption_worker.py
"""

import os
import signal
import time

import torch.distributed as dist
from accelerate import Accelerator

from accel_train import preemption

SIGNAL_STEP, STEP_S, MAX_STEPS = 12, 0.01, 500


def main() -> None:
    preemption.CHECK_EVERY_S = 0.05  # a check every ~5 steps of 10 ms
    accelerator = Accelerator(cpu=True)
    exchanges = 0
    with preemption.PreemptionWatch(accelerator) as watch:
        for step in range(1, MAX_STEPS + 1):
            time.sleep(STEP_S)
            if step == SIGNAL_STEP and accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            checks_before = watch.next_check
            stop = watch.should_stop(step)
            exchanges += watch.next_check != checks_before
            if stop:
                break
    print(
        f"rank {accelerator.process_index} stopped {step} after {exchanges} checks by {watch.signal_name}", flush=True
    )
    dist.barrier()
    dist.destroy_process_group()  # before exit, while gloo's threads are idle


if __name__ == "__main__":
    main()
