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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--save_freq", type=int, default=25)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "hub_upload_stall.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        out = Path(tmp) / "out"
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": f"{tmp}/home",
               "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
        command = [
            sys.executable, str(REPO / "accel_train" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
            "--dataset_root", f"{tmp}/piper_demo", "--output_dir", str(out), "--steps", str(args.steps),
            "--save_freq", str(args.save_freq), "--log_freq", "1", "--push_to_hub=true",
            "--hub_repo_id", "bench/upload",
        ]  # fmt: skip
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        checkpoint_mb = sum(p.stat().st_size for p in (out / f"checkpoint-{args.save_freq}").iterdir()) / 1e6
    # The first steps warm up; a step that ends in a checkpoint write is excluded (it measures the write).
    steady = [r for r in records[5:] if r["step"] % args.save_freq not in (0, 1)]
    during = [r["samples_per_s"] for r in steady if r["hub_upload_active"]]
    idle = [r["samples_per_s"] for r in steady if not r["hub_upload_active"]]
    ratio = statistics.mean(during) / statistics.mean(idle)
    text = f"""# Training speed during a background Hub upload

Command: `python benchmarks/hub_upload_stall.py --steps {args.steps} --save_freq {args.save_freq}`
Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; demo ACT, batch 8, 1 worker.
Checkpoint size: {checkpoint_mb:.0f} MB, uploaded to the local Hub test server over loopback.

| steps | mean samples/s | count |
|---|---|---|
| no upload running | {statistics.mean(idle):.1f} | {len(idle)} |
| upload running | {statistics.mean(during):.1f} | {len(during)} |

Ratio (upload running / none): **{ratio:.2f}x**
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
