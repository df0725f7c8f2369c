"""`accel-train plot OUT`: OUT/training_curves.png from OUT/metrics.jsonl (loss, validation loss, learning
rate, samples/s against step; resume points marked)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402

from accel_train.errors import TrainError  # noqa: E402
from accel_train.metrics import METRICS_FILE  # noqa: E402

CURVES_FILE = "training_curves.png"
PANELS = (("loss", "loss", True), ("lr", "learning rate", False), ("samples_per_s", "samples/s", False))


def read_records(output_dir: Path) -> list[dict]:
    path = output_dir / METRICS_FILE
    if not path.is_file():
        raise TrainError(f"{path} does not exist: plot needs the output dir of a training run.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(output_dir: Path) -> Path:
    records = read_records(output_dir)
    training = [r for r in records if "loss" in r]
    if not training:
        raise TrainError(f"{output_dir / METRICS_FILE} has no training records yet (one comes every --log_freq).")
    validation = [r for r in records if "val_loss" in r]
    resumes = [r["step"] for r in records if "resumed_from" in r]
    steps = [r["step"] for r in training]
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(8, 8), sharex=True)
    for axis, (key, label, log_scale) in zip(axes, PANELS, strict=True):
        axis.plot(steps, [r[key] for r in training], label="training loss" if key == "loss" else label)
        if key == "loss" and validation:
            val_steps, val_losses = [r["step"] for r in validation], [r["val_loss"] for r in validation]
            axis.plot(val_steps, val_losses, "o-", label="validation loss")
        for i, step in enumerate(resumes):
            axis.axvline(step, color="grey", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
        axis.set_ylabel(label)
        axis.set_yscale("log" if log_scale else "linear")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{output_dir.name}: {steps[-1]} steps")
    figure.tight_layout()
    target = output_dir / CURVES_FILE
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
