"""tests/fsdp_on_cpu.py's shim in every Python process started with this folder on PYTHONPATH: for launchers that
start the trainer themselves (launch/slurm_multi_node.sbatch), where the shim cannot be put in front of it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsdp_on_cpu  # noqa: E402, F401 (patches Accelerate on import)
