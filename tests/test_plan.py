"""`accel-train plan`: its figures, computed on the meta device, against real runs at stand-in sizes (the tensor
bytes each process holds after a step, read by tests/plan_measure.py, and the checkpoint files' tensors); pi0 at its
real size in seconds; the JSON keys; LoRA; bad input."""

from __future__ import annotations

import importlib
import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pi_stand_in
import plan_measure
import pytest
import torch
from conftest import REPO, TRAIN, assert_ok, base_args
from safetensors.torch import load_file
from test_finetune import LORA, pretrained_copy
from test_fsdp import fsdp

from accel_train import checkpoint as ckpt
from accel_train import cli, plan
from accel_train.train import run

MEASURE = REPO / "tests" / "plan_measure.py"
ONE_STEP = ["--steps", "1", "--save_freq", "1", "--batch_size", "2"]


def planned(*args: str) -> dict:
    return json.loads(plan.run([*args, "--json"]))


def file_bytes(checkpoint: Path) -> tuple[int, int]:
    """The tensor bytes of a checkpoint's policy.safetensors and optimizer_state.pth."""
    policy = sum(t.nbytes for t in load_file(checkpoint / ckpt.POLICY_FILE).values())
    state = torch.load(checkpoint / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    return policy, sum(v.nbytes for values in state.values() for v in values.values() if torch.is_tensor(v))


def assert_same(planned_figures: dict, measured: dict) -> None:
    mine = planned_figures["per_process"]
    assert (mine["weights_bytes"], mine["gradients_bytes"], mine["optimizer_bytes"]) == (
        measured["weights"], measured["gradients"], measured["optimizer"]
    ), (mine, measured)  # fmt: skip


def measured_run(args: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A real run in this process, measured after its first step (tests/plan_measure.py)."""
    plan_measure.install(out / "measured", monkeypatch.setattr)
    run(args)
    return json.loads((out / "measured" / "rank0.json").read_text())


@pytest.fixture(scope="module")
def act_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, dict]:
    """The demo ACT, one step, a checkpoint at it: its flags, output dir and what it held."""
    out = tmp_path_factory.mktemp("plan") / "act"
    args = base_args(tiny_dataset, out, *ONE_STEP)
    with pytest.MonkeyPatch.context() as patch:
        return args, out, measured_run(args, out, patch)


def test_plan_equals_what_a_run_holds_and_writes(act_run: tuple[list[str], Path, dict]) -> None:
    """One process: weights, gradients and optimizer state as the run held them; the checkpoint's files hold the
    planned bytes, to the byte."""
    args, out, measured = act_run
    figures = planned(*args)
    assert_same(figures, measured)
    files = figures["checkpoint_bytes"]["consolidated"]
    assert file_bytes(out / "checkpoint-1") == (files["weights"], files["optimizer"])
    assert figures["checkpoint_bytes"]["sharded"]["total"] == files["total"]


def test_plan_equals_what_each_fsdp_process_holds(tiny_dataset: Path, tmp_path: Path) -> None:
    """FSDP over 2 processes (the shipped config, through the CPU shim): rank 0 holds the planned shards, the
    largest; rank 1 no more; the consolidated checkpoint holds the planned bytes."""
    out = tmp_path / "fsdp"
    args = base_args(tiny_dataset, out, *ONE_STEP)
    command = [*fsdp(2), str(MEASURE), str(out / "measured"), str(TRAIN), *args]
    assert_ok(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300))
    figures = planned("--num_processes", "2", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"), *args)
    assert figures["fsdp"] and figures["fsdp_units"].startswith("11 layers (accel-train's layers for act)")
    ranks = [json.loads((out / "measured" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert_same(figures, ranks[0])
    assert all(ranks[1][key] <= ranks[0][key] for key in ranks[0])
    files = figures["checkpoint_bytes"]["consolidated"]
    assert file_bytes(out / "checkpoint-1") == (files["weights"], files["optimizer"])


def test_lora_plans_the_adapters_only(
    act_run: tuple[list[str], Path, dict], tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--peft: only the adapters train and are saved; the plan needs only the pretrained policy's config.json."""
    base = pretrained_copy(act_run[1], tmp_path / "base")  # the ACT run's final model
    flags = ["--policy.path", str(base), *LORA, *ONE_STEP]
    measured = measured_run(base_args(tiny_dataset, tmp_path / "lora", *flags), tmp_path / "lora", monkeypatch)

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((base / "config.json").read_bytes())
    flags[1] = str(config_only)
    figures = planned(*base_args(tiny_dataset, tmp_path / "lora", *flags))
    assert_same(figures, measured)
    assert 0 < figures["trainable_parameters"] < figures["parameters"] / 100
    files = figures["checkpoint_bytes"]["consolidated"]
    assert file_bytes(tmp_path / "lora" / "checkpoint-1") == (files["weights"], files["optimizer"])
    assert files["weights"] == 4 * figures["trainable_parameters"]  # fp32 adapters, nothing of the frozen base


def test_pi0_at_real_size_plans_in_seconds(tiny_dataset: Path) -> None:
    """pi0 as lerobot 0.6.1 builds it (PaliGemma 2B + the 300M expert + SigLIP: 4.03B parameters, the PaliGemma
    lm_head untied from its embeddings), 8 processes under FSDP in bf16: each holds 1/8 of the fp32 weights."""
    start = time.perf_counter()
    figures = planned("--num_processes", "8", "--fsdp", "--policy.type=pi0", "--mixed_precision", "bf16",
                      "--dataset.repo_id", "local/piper_demo", "--dataset.root", str(tiny_dataset))  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"pi0 plan: {seconds:.1f} s, {figures['parameters']:,} parameters")
    assert seconds < 30
    assert 4.0e9 < figures["parameters"] < 4.1e9 and figures["fsdp_units"].startswith("63 layers")
    weights = figures["checkpoint_bytes"]["consolidated"]["weights"]
    assert weights == 4 * figures["parameters"]  # fp32 (its float32 default), no buffers in the state dict
    assert weights / 8 < figures["per_process"]["weights_bytes"] < weights / 8 * 1.01
    reached = figures["trainable_parameters"] - figures["never_reached_parameters"]
    steps = figures["checkpoint_bytes"]["consolidated"]["optimizer"] - 8 * reached  # exp_avg, exp_avg_sq: fp32
    assert 0 < steps < 4 * 1000  # a 4-byte step per parameter tensor (fewer than 1000 of them)


@pytest.mark.parametrize("policy_type", ["pi0", "pi05"])
def test_never_reached_is_what_the_pi_loss_does_not_reach(
    policy_type: str, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At stand-in sizes (tests/pi_stand_in.py), on CPU: after a backward pass of lerobot's loss, the trainable
    parameters without a gradient are exactly plan.never_reached's."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    from accel_train.model import build_policy

    modeling = importlib.import_module(f"lerobot.policies.{policy_type}.modeling_{policy_type}")
    for name in ("get_gemma_config", "PaliGemmaForConditionalGenerationWithPiGemma", "PiGemmaForCausalLM"):
        monkeypatch.setattr(modeling, name, getattr(modeling, name))  # restored after the test
    pi_stand_in.shrink(modeling)
    cfg = plan.training_config(["--policy.type", policy_type, "--dataset.root", str(tiny_dataset)])
    repo_id, features = plan.dataset_features(cfg)
    cfg.policy.device = "cpu"
    policy = build_policy(cfg, SimpleNamespace(repo_id=repo_id, meta=SimpleNamespace(features=features)), None)
    batch = {key: torch.rand(2, 3, 64, 64) for key in features if key.startswith("observation.images.")}
    batch |= {"observation.state": torch.rand(2, 7), "action": torch.rand(2, cfg.policy.chunk_size, 7),
              OBS_LANGUAGE_TOKENS: torch.randint(0, 100, (2, 8)),
              OBS_LANGUAGE_ATTENTION_MASK: torch.ones(2, 8, dtype=torch.bool)}  # fmt: skip
    policy(batch)[0].backward()
    unreached = {p for p in policy.parameters() if p.requires_grad and p.grad is None}
    assert unreached and unreached == plan.never_reached(policy, policy_type)


def test_json_keys_and_text(act_run: tuple[list[str], Path, dict], capsys: pytest.CaptureFixture) -> None:
    args = act_run[0]
    assert cli.main(["plan", "--num_processes", "4", *args, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    per_process = {"weights_bytes", "gradients_bytes", "optimizer_bytes", "ddp_buckets_bytes", "total_bytes"}
    assert {"parameters", "trainable_parameters", "per_process", "checkpoint_bytes", "host_bytes"} <= set(figures)
    assert set(figures["per_process"]) == per_process and figures["per_process"]["ddp_buckets_bytes"] > 0
    for key in ("checkpoint_bytes", "host_bytes"):
        assert set(figures[key]) == {"consolidated", "sharded"}
        assert {"main_process", "other_processes"} <= set(figures[key]["sharded"])
    assert figures["checkpoint_bytes"]["sharded"]["main_process"] * 4 >= figures["checkpoint_bytes"]["sharded"]["total"]
    assert cli.main(["plan", *args]) == 0
    text = capsys.readouterr().out
    assert "Training state per process" in text and "scripts/gpu_check.sh" in text and "gpu_peak_gb" in text


@pytest.mark.parametrize(
    ("flags", "status", "message"),
    [
        (["--num_processes", "0"], 2, "--num_processes must be a whole number of at least 1"),
        (["--policy.type=nosuch"], 2, "invalid choice: 'nosuch'"),
        (["--dataset.root", "/nonexistent"], 1, "meta/info.json"),
    ],
)
def test_bad_input_is_one_message(flags: list[str], status: int, message: str, capsys) -> None:
    assert cli.main(["plan", "--dataset.repo_id", "local/piper_demo", *flags]) == status
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "Traceback" not in error and "\n" not in error
