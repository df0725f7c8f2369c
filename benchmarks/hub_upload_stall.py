"""Training speed while a checkpoint upload runs in the background vs while none does, in one run.

Trains the demo ACT with --push_to_hub against the local Hub test server (real huggingface_hub client, real
sha256 and HTTP transfer of every checkpoint over loopback), logging every step; each metrics.jsonl record
says whether an upload was running. Reports mean steps/s of both kinds of step and their ratio.

    python benchmarks/hub_upload_stall.py [--steps 150] [--save_freq 25] [--out docs/hub_upload_stall.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hub_server import HubServer  # noqa: E402

UPLOAD_DELAY_S = 2.0


def measure(steps: int, save_freq: int) -> dict[str, float]:
    """Mean samples/s of steps with and without an upload running, their ratio, the checkpoint size."""
    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        # Loopback uploads finish within a step; a real Hub takes seconds to minutes. Each LFS upload and commit
        # is made 2 s slower by the server, so that many steps run while an upload is in flight.
        hub.set_delay(UPLOAD_DELAY_S)
        out = Path(tmp) / "out"
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": f"{tmp}/home",
               "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
        command = [
            sys.executable, str(REPO / "accel_train" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
            "--dataset_root", f"{tmp}/piper_demo", "--output_dir", str(out), "--steps", str(steps),
            "--save_freq", str(save_freq), "--log_freq", "1", "--val_episodes", "0", "--push_to_hub=true",
            "--hub_repo_id", "bench/upload",
        ]  # fmt: skip
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        checkpoint_mb = sum(p.stat().st_size for p in (out / f"checkpoint-{save_freq}").iterdir()) / 1e6
    # The first steps warm up; a step that ends in a checkpoint write is excluded (it measures the write).
    steady = [r for r in records[5:] if "hub_upload_active" in r and r["step"] % save_freq not in (0, 1)]
    during = [r["samples_per_s"] for r in steady if r["hub_upload_active"]]
    idle = [r["samples_per_s"] for r in steady if not r["hub_upload_active"]]
    return {
        "during": statistics.mean(during),
        "idle": statistics.mean(idle),
        "ratio": statistics.mean(during) / statistics.mean(idle),
        "during_count": len(during),
        "idle_count": len(idle),
        "checkpoint_mb": checkpoint_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--save_freq", type=int, default=25)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "hub_upload_stall.md")
    args = parser.parse_args()
    result = measure(args.steps, args.save_freq)
    text = f"""# Training speed during a background Hub upload

Command: `python benchmarks/hub_upload_stall.py --steps {args.steps} --save_freq {args.save_freq}`
Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; demo ACT, batch 8, 1 worker.
Checkpoint size: {result["checkpoint_mb"]:.0f} MB, uploaded to the local Hub test server over loopback, each LFS
upload and commit made {UPLOAD_DELAY_S:.0f} s slower by the server (as a remote Hub would be), so that steps run
during uploads.

| steps | mean samples/s | count |
|---|---|---|
| no upload running | {result["idle"]:.1f} | {result["idle_count"]} |
| upload running | {result["during"]:.1f} | {result["during_count"]} |

Ratio (upload running / none): **{result["ratio"]:.2f}x**
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
