#!/usr/bin/env bash
# GPU check (one GPU, under 8 minutes on an H200): bf16 and fp16 training on the demo dataset, checkpoint,
# resume, and the exact-resume comparison (N steps straight vs K steps + resume to N); an FSDP checkpoint (Accelerate,
# configs/accelerate/fsdp.yaml, one process, ACT with validation) resumed without FSDP, against fp32 straight; pi0 with
# --checkpoint_format sharded, saved and resumed, the time a sharded and a consolidated save block training
# (tests/test_pi_checkpoint_gpu.py, at most 2.5 minutes); pi0 trained and resumed in bf16 (tests/test_pi.py, at most
# 4 minutes); pi0 under the FSDP config in bf16 with gradient checkpointing, peak GPU memory and samples/s
# (tests/test_fsdp.py, at most 2.5 minutes). Writes docs/gpu_check.md.
#   bash scripts/gpu_check.sh            (after `make .venv/.installed` or with the venv carried along)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
report=docs/gpu_check.md
mkdir -p docs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$work/gpu.txt"
common=(--config configs/demo.yaml --dataset_root "$work/piper_demo" --num_workers 4 --log_freq 1)

launcher=("$py")  # what `run` starts accel_train/train.py with

run() {  # run NAME ARGS...: time one training run, keep its log
    local name=$1
    shift
    local start
    start=$(date +%s.%N)
    "${launcher[@]}" accel_train/train.py "${common[@]}" "$@" > "$work/$name.log" 2>&1
    echo "$name $(echo "$(date +%s.%N) - $start" | bc)" >> "$work/times.txt"
}

for precision in bf16 fp16; do
    run "$precision-straight" --output_dir "$work/$precision-straight" --mixed_precision "$precision" --steps 60 --save_freq 60
    run "$precision-part1" --output_dir "$work/$precision-resumed" --mixed_precision "$precision" --steps 37 --save_freq 37
    run "$precision-part2" --output_dir "$work/$precision-resumed" --mixed_precision "$precision" --steps 60 \
        --save_freq 60 --resume_from_checkpoint latest
done

# FSDP checkpoint -> plain resume: the consolidated files must continue like an fp32 run that never used FSDP.
run fp32-straight --output_dir "$work/fp32-straight" --steps 60 --save_freq 60
launcher=("$py" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1)
run fsdp-part1 --output_dir "$work/fsdp-resumed" --steps 37 --save_freq 37
launcher=("$py")
run fsdp-part2 --output_dir "$work/fsdp-resumed" --steps 60 --save_freq 60 --resume_from_checkpoint latest

# pi0 at real size with sharded checkpoints: bf16 weights and the action expert trained, so that a checkpoint is
# ~9.5 GB, not fp32 full fine-tuning's 42 GB (tests/test_pi_checkpoint_gpu.py says why). First of the pi0 checks and
# its files removed after it: the disk (64 GiB) holds few pi0 checkpoints. Bounded like the checks below.
sharded_status=0
timeout 150 "$py" -m pytest -m slow tests/test_pi_checkpoint_gpu.py -q -s -p no:cacheprovider \
    --basetemp "$work/pytest-sharded" > "$work/pi0_sharded.log" 2>&1 || sharded_status=$?
rm -rf "$work/pytest-sharded"

# pi0 (default variants, 4B parameters) in bf16: trains, checkpoints and resumes (tests/test_pi.py; its tokenizer
# is a stand-in served by the tests' Hub). Bounded so that the rest of the report is always written.
pi0_status=0
timeout 240 "$py" -m pytest -m slow tests/test_pi.py -q -s -p no:cacheprovider > "$work/pi0.log" 2>&1 || pi0_status=$?
fsdp_status=0
timeout 150 "$py" -m pytest -m slow tests/test_fsdp.py -q -s -p no:cacheprovider > "$work/pi0_fsdp.log" 2>&1 \
    || fsdp_status=$?

"$py" - "$work" "$report" "$pi0_status" "$fsdp_status" "$sharded_status" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

work, report = Path(sys.argv[1]), Path(sys.argv[2])
lines = ["# GPU check", "", f"GPU: {(work / 'gpu.txt').read_text().strip()}", "", "Command: `bash scripts/gpu_check.sh`", ""]
lines += ["| precision | steps/s (straight) | final loss | max abs weight diff, resumed vs straight | losses identical | scaler state saved |", "|---|---|---|---|---|---|"]
times = dict(line.split() for line in (work / "times.txt").read_text().splitlines())
for precision in ("bf16", "fp16"):
    straight, resumed = work / f"{precision}-straight", work / f"{precision}-resumed"
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    la = [json.loads(l)["loss"] for l in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    scaler = (resumed / "checkpoint-37" / "scaler_state.pth").is_file()
    lines.append(f"| {precision} | {60 / float(times[f'{precision}-straight']):.2f} (incl. start-up) | {la[-1]:.4f} | {diff:.3g} | {la == lb} | {scaler} |")
a, b = load_file(work / "fp32-straight" / "model.safetensors"), load_file(work / "fsdp-resumed" / "model.safetensors")
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
ckpt = sorted(p.name for p in (work / "fsdp-resumed" / "checkpoint-37").iterdir())
validation = [json.loads(l) for l in (work / "fsdp-resumed" / "metrics.jsonl").read_text().splitlines() if "val_" in l]
lines += ["", f"FSDP (1 process) 37 steps, then resumed without FSDP to 60, vs fp32 straight: max abs weight diff {diff:.3g}; "
          f"FSDP checkpoint files: {', '.join(ckpt)}; validation records under FSDP: {validation[:2]}"]
status = int(sys.argv[3])
pi0 = [line for line in (work / "pi0.log").read_text().splitlines() if line.startswith("pi0 bf16") or " passed" in line
       or " failed" in line or " skipped" in line]
outcome = {0: "passed", 124: "timed out after 240 s"}.get(status, f"failed (exit {status})")
lines += ["", f"pi0 bf16 train + resume (`pytest -m slow tests/test_pi.py`): {outcome}", *[f"    {line}" for line in pi0]]
status = int(sys.argv[4])
fsdp = [line for line in (work / "pi0_fsdp.log").read_text().splitlines() if line.startswith("pi0 FSDP") or " passed" in line
        or " failed" in line or " skipped" in line or line.startswith("E ")][:20]
outcome = {0: "passed", 124: "timed out after 150 s"}.get(status, f"failed (exit {status})")
lines += ["", f"pi0 under configs/accelerate/fsdp.yaml, bf16, gradient checkpointing (`pytest -m slow tests/test_fsdp.py`): {outcome}",
          *[f"    {line}" for line in fsdp]]
status = int(sys.argv[5])
sharded = [line for line in (work / "pi0_sharded.log").read_text().splitlines() if line.startswith("pi0 sharded")
           or " passed" in line or " failed" in line or " skipped" in line or line.startswith("E ")][:20]
outcome = {0: "passed", 124: "timed out after 150 s"}.get(status, f"failed (exit {status})")
lines += ["", f"pi0 sharded checkpoint saved and resumed, bf16, action expert trained "
          f"(`pytest -m slow tests/test_pi_checkpoint_gpu.py`): {outcome}", *[f"    {line}" for line in sharded]]
report.write_text("\n".join(lines) + "\n")
print(report.read_text())
PY
