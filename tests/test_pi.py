"""The pi0 family (pi0, pi0.5, pi0-fast) offline. Their processors take the PaliGemma tokenizer, and pi0-fast also
the FAST action tokenizer, from tiny stand-ins served by the test Hub under the repo ids they load by default
(tests/stand_ins.py). Their smallest configuration has 4B parameters (docs/notes-pi0.md): on a CPU they train at
stand-in sizes (tests/pi_stand_in.py: lerobot's models with the sizes it fixes in code shrunk, everything else
theirs); at their real size with `pytest -m slow` where CUDA is (scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import stand_ins
import torch
from conftest import assert_ok, losses, run_cli, same_weights
from hub_server import HubServer
from safetensors.torch import load_file
from test_finetune import pretrained_copy

STAND_IN_SIZES = [sys.executable, str(Path(__file__).parent / "pi_stand_in.py")]  # a launcher for train.py


@pytest.fixture(scope="module")
def pi_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a process whose huggingface_hub finds the stand-in tokenizers as PaliGemma's and FAST's,
    under the repo ids the pi0 family loads by default."""
    from huggingface_hub import HfApi

    tmp = tmp_path_factory.mktemp("paligemma")
    tokenizers = {
        stand_ins.PALIGEMMA: stand_ins.paligemma_tokenizer(tmp / "paligemma"),
        stand_ins.FAST: stand_ins.fast_tokenizer(tmp / "fast"),
    }
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        for repo_id, folder in tokenizers.items():
            api.create_repo(repo_id)
            api.upload_folder(repo_id=repo_id, folder_path=folder)
        yield {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp / "home")}


def pi_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    """A run on the demo dataset that logs every step and saves every 2."""
    return [
        "--dataset.repo_id", "local/piper_demo", "--dataset.root", str(dataset), "--demo_dataset=false",
        "--batch_size", "2", "--log_freq", "1", "--val_episodes", "0", "--save_freq", "2", "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def straight_and_resumed(dataset: Path, tmp_path: Path, env: dict[str, str], *policy: str) -> tuple[Path, Path]:
    """3 steps straight, and its checkpoint at step 2 resumed in a new process into another folder to 3."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert_ok(run_cli(pi_args(dataset, straight, *policy, "--steps", "3"), STAND_IN_SIZES, env=env))
    resume = ["--steps", "3", "--resume_from_checkpoint", str(straight / "checkpoint-2")]
    resumed = run_cli(pi_args(dataset, out, *resume), STAND_IN_SIZES, env=env)
    assert_ok(resumed)
    assert "no longer bit-identical" not in resumed.stderr
    assert len(losses(straight)) == 3 and losses(out) == losses(straight)[2:]
    return straight, out


@pytest.mark.parametrize(
    ("policy", "options"),
    [("pi0", []), ("pi05", []), ("pi0_fast", []),
     ("pi0", ["--policy.dtype=bfloat16", "--policy.gradient_checkpointing=true"])],
    ids=["pi0", "pi05", "pi0_fast", "pi0-bf16-gradient-checkpointing"],
)  # fmt: skip
def test_pi_trains_and_resumes_exactly_at_stand_in_sizes(
    policy: str, options: list[str], pi_tokenizers: dict[str, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    """lerobot's pi0 / pi0.5 / pi0-fast code and processors, at stand-in sizes: a resume continues bit-identically
    (losses and final weights); pi0 also in lerobot's bf16 with gradient checkpointing (under FSDP:
    tests/test_fsdp.py)."""
    straight, out = straight_and_resumed(tiny_dataset, tmp_path, pi_tokenizers, "--policy.type", policy, *options)
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["type"] == policy


def test_pi0_lora_on_its_default_targets(pi_tokenizers: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """A stand-in pi0, saved by a run, fine-tuned with `--policy.path` (its weights checked in, see model.py's
    check_loaded) and LoRA on lerobot's default pi0 targets (the expert's q/v projections and the action and state
    projections): the checkpoint holds adapters on exactly those modules. (A LoRA resume is the same code for every
    policy: test_finetune.py resumes ACT's and SmolVLA's exactly.) A base that does not fit the policy's sizes,
    which lerobot's pi0 loader replaces by random weights with a printed warning, stops the run."""
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    pretrained, tuned = tmp_path / "pretrained", tmp_path / "tuned"
    assert_ok(run_cli(pi_args(tiny_dataset, pretrained, "--policy.type", "pi0", "--steps", "1"), STAND_IN_SIZES,
                      env=pi_tokenizers))  # fmt: skip
    base = pretrained_copy(pretrained, tmp_path / "base")
    lora = ["--policy.path", str(base), "--peft.method_type=LORA", "--peft.r=4", "--steps", "2"]
    assert_ok(run_cli(pi_args(tiny_dataset, tuned, *lora), STAND_IN_SIZES, env=pi_tokenizers))
    adapters = load_file(tuned / "checkpoint-2" / "policy.safetensors")
    assert adapters and all(re.search(r"\.lora_[AB]\.weight$", key) for key in adapters), sorted(adapters)[:5]
    adapted = {re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", key) for key in adapters}
    targets = PI0Policy._get_default_peft_targets(None)["target_modules"]
    assert all(re.fullmatch(targets, name) for name in adapted) and "model.state_proj" in adapted, sorted(adapted)
    misfit = ["--policy.path", str(base), "--policy.max_state_dim=16", "--steps", "1"]
    misfit = run_cli(pi_args(tiny_dataset, tmp_path / "misfit", *misfit), STAND_IN_SIZES, env=pi_tokenizers)
    assert misfit.returncode == 1 and "did not load into the pi0 policy" in misfit.stderr, misfit.stderr[-2000:]
    assert "Could not load state dict" in misfit.stdout  # lerobot's own warning, the run stopped after it


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pi0 has 4B parameters: a GPU check")
def test_pi0_trains_and_resumes_on_a_gpu(pi_tokenizers: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """pi0 (default variants) in bf16 on the demo dataset: 3 steps straight, and 2 steps + resume to 3. The losses
    are finite, the resumed run continues at step 3; how close its loss is to the straight run's is printed
    (GPU kernels need not be bit-reproducible)."""
    gpu = ["--policy.type", "pi0", "--mixed_precision", "bf16", "--num_workers", "2"]
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert_ok(run_cli(pi_args(tiny_dataset, straight, *gpu, "--steps", "3"), env=pi_tokenizers, timeout=900))
    assert_ok(run_cli(pi_args(tiny_dataset, out, *gpu, "--steps", "2"), env=pi_tokenizers, timeout=900))
    resumed = run_cli(pi_args(tiny_dataset, out, *gpu, "--steps", "3", "--resume_from_checkpoint", "latest"),
                      env=pi_tokenizers, timeout=900)  # fmt: skip
    assert_ok(resumed)
    assert "Resumed from" in resumed.stderr and [s for s, _ in losses(out)] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in losses(straight) + losses(out))
    gaps = [abs(a - b) for (_, a), (_, b) in zip(losses(straight), losses(out), strict=True)]
    print(f"pi0 bf16 losses straight {losses(straight)}, resumed {losses(out)}, largest gap {max(gaps):.3g}")
