"""The `accel-train` command: training (the default), and tools that look at a run's output.

accel-train [TRAINING FLAGS]            train (`accel-train --help` lists the flags)
accel-train plot OUT                    OUT/training_curves.png from OUT/metrics.jsonl
accel-train checkpoints OUT|hf://U/R    list checkpoints: step, size, verified, pushed, age  [--json]
accel-train export CKPT DIR [--merge]   a lerobot pretrained folder (config.json, model.safetensors,
                                        processors) from a checkpoint folder or hf://USER/REPO[/checkpoint-N];
                                        an adapter (--peft) checkpoint exports as a PEFT adapter, or with
                                        --merge as a full policy (its base fetched and verified); a sharded
                                        checkpoint also gives optimizer_state.pth, written from its shards
accel-train plan [--num_processes N] [--fsdp | --config_file ACCELERATE.yaml] [--json] [TRAINING FLAGS]
                                        memory per process (weights, gradients, optimizer state), checkpoint
                                        sizes and the host memory a save needs, from the policy built on the
                                        meta device (accel_train/plan.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from accel_train import adapters, catalog, hub, plan, plot, train
from accel_train import checkpoint as ckpt
from accel_train.errors import TrainError

TOOLS = ("plot", "checkpoints", "export", "plan")


def export(source: str, dest: Path, merge: bool = False) -> list[Path]:
    write = adapters.export_merged if merge else export_files
    if not hub.is_hub_uri(source):
        return write(Path(source), dest)
    with tempfile.TemporaryDirectory() as scratch:  # downloaded and verified, then exported, then dropped
        return write(hub.fetch_checkpoint(source, Path(scratch)), dest)


def export_files(checkpoint: Path, dest: Path) -> list[Path]:
    """The model folder; from a sharded checkpoint also optimizer_state.pth, so that dest holds the documented
    files (a consolidated checkpoint holds them already)."""
    return ckpt.export(checkpoint, dest, with_optimizer=ckpt.is_sharded(checkpoint))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in TOOLS:
        return train.main(args)
    if args[0] == "plan":  # the training command's flags, which only the training parser knows
        return plan.main(args[1:])
    parser = argparse.ArgumentParser(prog=f"accel-train {args[0]}")
    if args[0] == "plot":
        parser.add_argument("output_dir", type=Path)
    elif args[0] == "checkpoints":
        parser.add_argument("target", help="an output dir, or hf://USER/REPO[@revision]")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    else:
        parser.add_argument("checkpoint", help="a checkpoint folder, or hf://USER/REPO[/checkpoint-N][@revision]")
        parser.add_argument("dest", type=Path)
        parser.add_argument("--merge", action="store_true", help="fold an adapter checkpoint into its base")
    options = parser.parse_args(args[1:])
    try:
        if args[0] == "plot":
            print(plot.plot(options.output_dir))
        elif args[0] == "checkpoints":
            print(catalog.render(catalog.rows(options.target), options.json))
        else:
            written = export(options.checkpoint, options.dest, options.merge)
            print(f"Exported {len(written)} files to {options.dest}")
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
