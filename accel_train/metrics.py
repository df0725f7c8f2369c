"""What the main process shows and records: a tqdm bar, a log line per --log_freq steps, OUT/metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (written by a run that died after its last checkpoint) so a resumed run's
    metrics continue without duplicated steps. Rewritten atomically."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Main-process only; other ranks get an instance whose calls do nothing visible."""

    def __init__(self, output_dir: Path, start_step: int, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        if enabled:
            truncate_after(self.path, start_step)
        self.bar = tqdm(
            initial=start_step,
            total=total_steps,
            desc="Training",
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            # Under SLURM and in CI there is no terminal: print the bar rarely instead of every update.
            mininterval=1.0 if os.isatty(2) else 30.0,
        )

    def step(self) -> None:
        self.bar.update(1)

    def record(self, metrics: dict[str, Any]) -> None:
        """One log line and one metrics.jsonl record."""
        if not self.enabled:
            return
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", smp_s=f"{metrics['samples_per_s']:.1f}"
        )
        log.info(
            "step %d  loss %.4f  lr %.2e  grad_norm %.3f  samples/s %.1f  epoch %d",
            metrics["step"],
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            metrics["samples_per_s"],
            metrics["epoch"],
        )
        with open(self.path, "a") as file:
            file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        self.bar.close()
