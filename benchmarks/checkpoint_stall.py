"""How long training is blocked per checkpoint: the trainer as it runs (`--mode async`: the state is copied to
CPU memory and written in the background) vs a synchronous save of the same state (`--mode sync`, i.e.
`--async_checkpoint false`: save() returns once the checkpoint is published). Times every Checkpointer.save
call of a short demo run.

    python benchmarks/checkpoint_stall.py --mode async|sync --dataset_root DIR --output_dir DIR
                                                                  prints {"mean_s": ..., "saves": N}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from accel_train import checkpoint, checkpointer  # noqa: E402
from accel_train.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("async", "sync"), required=True)
    parser.add_argument("--dataset_root", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args()
    durations: list[float] = []
    save = checkpointer.Checkpointer.save

    def timed_save(self: checkpointer.Checkpointer, state: checkpoint.TrainerState, *rest, **named) -> Path:
        start = time.perf_counter()
        path = save(self, state, *rest, **named)
        durations.append(time.perf_counter() - start)
        return path

    checkpointer.Checkpointer.save = timed_save
    demo = str(REPO / "configs" / "demo.yaml")
    train(config=demo, dataset_root=str(args.dataset_root), demo_dataset=False, output_dir=str(args.output_dir),
          steps=24, save_freq=4, log_freq=4, val_episodes=0, num_workers=1,
          async_checkpoint=args.mode == "async")  # fmt: skip
    # The last save is followed by the end-of-run wait in both modes: steady-state saves only.
    print(json.dumps({"mean_s": statistics.mean(durations[:-1]), "saves": len(durations) - 1}))


if __name__ == "__main__":
    main()
