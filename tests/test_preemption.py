"""All ranks stop after the same step when only one gets the signal, and agree on it without a collective at
every step."""

import os
import re
import subprocess
import sys
from pathlib import Path

from preemption_worker import SIGNAL_STEP

WORKER = Path(__file__).with_name("preemption_worker.py")


def test_one_rank_signalled_all_stop_at_the_same_step_checking_every_few_steps() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(WORKER)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stops = dict(re.findall(r"rank (\d) stopped (\d+ after \d+ checks)", result.stdout))
    assert stops.keys() == {"0", "1"}, result.stdout
    assert stops["0"].split()[0] == stops["1"].split()[0]  # the same step, and the same checks, on both ranks
    step, checks = (int(v) for v in stops["0"].split()[::2])
    assert SIGNAL_STEP <= step <= SIGNAL_STEP + 20  # acted on within a few checks of ~5 steps
    assert checks < step / 2  # not an all-reduce at every step
    assert "by SIGUSR1" in result.stdout and "by a signal on another rank" in result.stdout
