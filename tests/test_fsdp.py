"""FSDP2 through the trainer, launched as the README says: `accelerate launch --config_file
configs/accelerate/fsdp.yaml --num_processes 2 accel_train/train.py ...`, on CPU (gloo).

Accelerate 1.16 sets FSDP up only on GPUs: on CPU its plugin is dropped and the run is plain DDP, so these runs go
through tests/fsdp_on_cpu.py, a shim that takes Accelerate's GPU branch for CPU processes and nothing else. Every
test reads the trainer's own start-up line of what this process holds (a fraction of the unsharded parameters
only when they are DTensor shards), so a fallback to DDP fails them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, assert_ok, base_args, free_port, losses, run_cli, same_weights, two_node_slurm
from safetensors.torch import load_file
from test_finetune import LORA, pretrained_copy
from test_layout_and_launch import SPEC_FILES
from test_pi import STAND_IN_SIZES, pi_args, pi_tokenizers  # noqa: F401 (a fixture)
from test_policies import smolvla, vlm  # noqa: F401 (a fixture)

from accel_train import checkpoint as ckpt
from accel_train.errors import UsageError
from accel_train.sharding import check_fsdp_settings, choose_units, dtype_uniform, joint_parts, size_units

SHIM = REPO / "tests" / "fsdp_on_cpu.py"
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"


def fsdp(processes: int = 2, config: Path = FSDP_CONFIG) -> list[str]:
    """The launcher: `accelerate launch` with the shipped FSDP config, through the CPU shim."""
    port = free_port()  # for this run's rendezvous
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            str(processes), "--main_process_port", str(port), str(SHIM)]  # fmt: skip


def sharding(log: str) -> tuple[int, float]:
    """(units, this process's share of the parameter bytes) from the start-up line."""
    found = re.search(r"FSDP: (\d+) units; this process holds parameters \S+ of \S+ \((\d\.\d+)x\)", log)
    assert found, log[-3000:]
    return int(found[1]), float(found[2])


def act_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    """The demo config's ACT with validation on (one of the two episodes held out)."""
    return ["--config", str(REPO / "configs" / "demo.yaml"), "--dataset_root", str(dataset), "--demo_dataset=false",
            "--output_dir", str(out), "--num_workers", "0", "--log_freq", "1", "--val_episodes", "1",
            "--save_freq", "3", *extra]  # fmt: skip


def val_records(out: Path) -> list[dict]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if any(key.startswith("val_") for key in r)]


@pytest.fixture(scope="module")
def act_fsdp_straight(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    result = run_cli(act_args(tiny_dataset, out, "--steps", "6"), fsdp())
    assert_ok(result)
    units, share = sharding(result.stderr)
    # ACT of the demo config: 1 encoder, 1 decoder and 1 VAE-encoder layer, 8 ResNet-18 blocks, and the root.
    assert "FSDP units: 11 layers (accel-train's layers for act)" in result.stderr and units == 12
    assert share <= 0.55
    return out


def test_act_under_the_shipped_fsdp_config_resumes_bit_identically(
    act_fsdp_straight: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """6 straight steps == 3 + resume to 6, bit for bit (losses, validation, final weights); the checkpoints hold
    the documented files, written once (no Accelerate FSDP file), and the final model is exported."""
    straight, out = act_fsdp_straight, tmp_path / "run"
    assert_ok(run_cli(act_args(tiny_dataset, out, "--steps", "3"), fsdp()))
    resumed = run_cli(act_args(tiny_dataset, out, "--steps", "6", "--resume_from_checkpoint", "latest"), fsdp())
    assert_ok(resumed)
    assert "no longer bit-identical" not in resumed.stderr
    assert losses(out) == losses(straight) and [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6]
    # Validation at steps 3 and 6, the action error at the end (the first part's own end adds one at step 3).
    assert [r for r in val_records(out) if r["step"] == 6 or "val_loss" in r] == val_records(straight)
    assert len(val_records(straight)) == 3
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")
    for checkpoint in (straight / "checkpoint-3", straight / "checkpoint-6"):
        assert all((checkpoint / name).is_file() for name in SPEC_FILES)
        assert not list(checkpoint.glob("*.bin")) and ckpt.verify(checkpoint) is None
    optimizer = torch.load(straight / "checkpoint-6" / ckpt.OPTIMIZER_FILE, weights_only=True)  # the plain format
    assert optimizer["state"] and all(isinstance(index, int) for index in optimizer["state"])
    final = load_file(straight / "model.safetensors")
    assert set(load_file(straight / "checkpoint-6" / ckpt.POLICY_FILE)) == set(final)
    assert (straight / "config.json").is_file() and (straight / "preprocessor_config.json").is_file()


def test_fsdp_checkpoints_cross_to_one_process_and_back(
    act_fsdp_straight: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """An FSDP checkpoint resumes in one process, and a one-process checkpoint under FSDP. Same global batch (16
    = 2 x 8 = 1 x 16) and data order; what changes is the rank each sample is on, hence its dropout and VAE noise
    (drawn per rank) and the order of the sums: close, not bit-identical, and the log says so."""
    one = tmp_path / "one"
    from_fsdp = run_cli(act_args(tiny_dataset, one, "--steps", "4", "--batch_size", "16",
                                 "--resume_from_checkpoint", str(act_fsdp_straight / "checkpoint-3")))  # fmt: skip
    assert_ok(from_fsdp)
    assert "no longer bit-identical" in from_fsdp.stderr and "FSDP" not in from_fsdp.stderr
    (_, reference), (_, resumed) = losses(act_fsdp_straight)[3], losses(one)[0]
    assert abs(resumed - reference) < 0.15 * reference, (resumed, reference)

    back = run_cli(act_args(tiny_dataset, one, "--steps", "5", "--resume_from_checkpoint", "latest"), fsdp())
    assert_ok(back)
    assert "no longer bit-identical" in back.stderr and sharding(back.stderr)[1] <= 0.55
    (_, reference), (_, resumed) = losses(act_fsdp_straight)[4], losses(one)[1]
    assert [s for s, _ in losses(one)] == [4, 5] and abs(resumed - reference) < 0.15 * reference


def straight_and_resumed(launcher: list[str], args, env=None, final: str = "model.safetensors") -> tuple[str, str]:
    """3 steps straight saving at 2, and checkpoint-2 resumed into another folder to 3: the same losses and final
    weights (`final`). Returns both logs."""
    straight, out = args("straight", "--steps", "3"), args("out", "--steps", "3")
    first = run_cli(straight, launcher, env=env)
    assert_ok(first)
    straight_dir = Path(straight[straight.index("--output_dir") + 1])
    resumed = run_cli([*out, "--resume_from_checkpoint", str(straight_dir / "checkpoint-2")], launcher, env=env)
    assert_ok(resumed)
    out_dir = Path(out[out.index("--output_dir") + 1])
    assert "no longer bit-identical" not in resumed.stderr
    assert len(losses(straight_dir)) == 3 and losses(out_dir) == losses(straight_dir)[2:]
    assert same_weights(out_dir / final, straight_dir / final)
    return first.stderr, resumed.stderr


def test_smolvla_shards_every_layer_and_resumes_bit_identically(
    tiny_dataset: Path,
    vlm: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """The stand-in SmolVLA (1 vision-encoder layer, 2 language-model layers, 2 action-expert layers; the VLM
    frozen, as by default): each layer is a unit, the joint attention's layers included."""

    def args(name: str, *extra: str) -> list[str]:
        return ["--dataset.repo_id", "local/piper_demo", "--dataset.root", str(tiny_dataset), "--demo_dataset=false",
                "--batch_size", "4", "--log_freq", "1", "--val_episodes", "1", "--save_freq", "2", "--num_workers",
                "0", "--output_dir", str(tmp_path / name), *smolvla(vlm), *extra]  # fmt: skip

    log, _ = straight_and_resumed(fsdp(), args)
    assert "FSDP units: 5 layers (accel-train's layers for smolvla)" in log
    assert sharding(log)[1] <= 0.55


def test_pi0_shards_every_layer_and_resumes_bit_identically(
    pi_tokenizers: dict[str, str],  # noqa: F811 (the fixture)
    tiny_dataset: Path,
    tmp_path: Path,
) -> None:
    """pi0 at stand-in sizes (1 SigLIP layer, 2 PaliGemma layers, 2 expert layers): each layer is a unit. In
    lerobot's bf16 (`--policy.dtype=bfloat16` keeps norms and vision embeddings in fp32) with gradient
    checkpointing: the fp32 modules are units of their own, as FSDP2 needs one dtype per unit. (In fp32 the same
    5 layers are the units, and nothing else: tests/test_fsdp.py's unit tests and the start-up line.)"""
    variant = ["--policy.dtype=bfloat16", "--policy.gradient_checkpointing=true"]

    def args(name: str, *extra: str) -> list[str]:
        return pi_args(tiny_dataset, tmp_path / name, "--policy.type", "pi0", "--num_workers", "0", "--val_episodes",
                       "1", *variant, *extra)  # fmt: skip

    log, _ = straight_and_resumed([*fsdp(), STAND_IN_SIZES[1]], args, env=pi_tokenizers)
    units, share = sharding(log)
    assert share <= 0.55
    # The 5 layers, the fp32 norms and vision embeddings split out of the bf16 layers and root, and the root.
    split = re.search(r"FSDP units: 5 layers \(accel-train's layers for pi0\), (\d+) modules in a dtype", log)
    assert split and units == 6 + int(split[1]), log[-3000:]


def test_lora_under_fsdp_checkpoints_adapters_and_resumes_bit_identically(
    trained: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """LoRA on the demo ACT under FSDP (frozen base and adapters sharded together in each layer's unit): the
    checkpoint holds the adapters only, in PEFT's format, and a resume continues bit for bit."""
    base = pretrained_copy(trained, tmp_path / "base")

    def args(name: str, *extra: str) -> list[str]:
        return base_args(tiny_dataset, tmp_path / name, "--policy.path", str(base), *LORA, *extra)

    log, _ = straight_and_resumed(fsdp(), args, final="adapter_model.safetensors")
    assert sharding(log)[1] <= 0.55
    adapters = load_file(tmp_path / "straight" / "checkpoint-2" / ckpt.POLICY_FILE)
    assert adapters and all(re.search(r"\.lora_[AB]\.weight$", key) for key in adapters), sorted(adapters)[:5]


def test_a_config_naming_classes_the_policy_lacks_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    """One paragraph naming the missing class and the policy's own classes; nothing written."""
    config = tmp_path / "fsdp.yaml"
    named = "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_transformer_layer_cls_to_wrap: GemmaDecoderLayer\n"
    config.write_text(FSDP_CONFIG.read_text().replace("fsdp_config:\n", "fsdp_config:\n" + named))
    out = tmp_path / "out"
    result = run_cli(act_args(tiny_dataset, out, "--steps", "2"), fsdp(config=config))
    assert result.returncode != 0
    message = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "names GemmaDecoderLayer, which the act policy does not have" in message
    assert "ACTEncoderLayer" in message and "BasicBlock" in message and "Traceback" not in message
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


def fake_fsdp_accelerator(
    state_dict_type: str = "FULL_STATE_DICT", mixed_precision: str = "no", version: int = 2, **plugin_options: bool
):
    from accelerate.utils import DistributedType

    state_dict = SimpleNamespace(name=state_dict_type)
    plugin = SimpleNamespace(fsdp_version=version, state_dict_type=state_dict, **plugin_options)
    return SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=mixed_precision,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"state_dict_type": "SHARDED_STATE_DICT"}, "set fsdp_state_dict_type: FULL_STATE_DICT"),
        ({"mixed_precision": "fp16"}, "Use --mixed_precision bf16"),
        ({"version": 1}, "Set fsdp_version: 2"),
        ({"activation_checkpointing": True}, "--policy.gradient_checkpointing=true"),
    ],
)
def test_fsdp_settings_the_trainer_cannot_honour_are_refused(settings: dict, expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        check_fsdp_settings(fake_fsdp_accelerator(**settings))
    check_fsdp_settings(fake_fsdp_accelerator())  # the shipped settings pass


def test_units_of_a_joint_layer_and_of_mixed_dtypes() -> None:
    """A joint layer's unit is the modules lerobot calls (projections, norms, MLP); a module whose trainable
    parameters are in another dtype than the rest of its unit gets a unit of its own; SIZE_BASED_WRAP never picks
    a container without a forward (ModuleDict), which fully_shard refuses."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2), 0)
    parts = joint_parts(layer)
    attention = layer.self_attn
    assert parts == [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, layer.mlp,
                     layer.input_layernorm, layer.post_attention_layernorm]  # fmt: skip
    layer.input_layernorm.to(torch.float64)
    root = torch.nn.Sequential(layer, torch.nn.LayerNorm(16).to(torch.float64), torch.nn.Linear(16, 16))
    units = dtype_uniform([parts], root)
    assert units == [layer.input_layernorm, [p for p in parts if p is not layer.input_layernorm], root[1]]

    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleDict({"a": torch.nn.Linear(40, 40), "b": torch.nn.Linear(4, 4)})
    assert size_units(holder, 1000) == [holder.blocks["a"]]

    # A VLA's joint layers: a wrap policy whose units would sit inside them (never gathered) is refused.
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    by_size = SimpleNamespace(auto_wrap_policy=size_based_auto_wrap_policy, min_num_params=10)
    by_class = SimpleNamespace(
        auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=["LlamaMLP"]
    )
    for plugin in (by_size, by_class):
        with pytest.raises(UsageError, match="run as one joint attention"):
            choose_units(root, "smolvla", plugin)
    assert choose_units(root, "act", by_class)[0] == [layer.mlp]


def test_multi_node_slurm_script_takes_the_fsdp_config(tiny_dataset: Path, tmp_path: Path) -> None:
    """`ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml sbatch --nodes 2 launch/slurm_multi_node.sbatch OUT ...`:
    2 "nodes" of 1 CPU process each (a stand-in srun starts the script's per-node command twice, with
    SLURM_NODEID 0 and 1), one FSDP run across both; the shim comes in through PYTHONPATH (tests/fsdp_site)."""
    env = {**two_node_slurm(tmp_path), "ACCELERATE_CONFIG": str(FSDP_CONFIG),
           "PYTHONPATH": str(REPO / "tests" / "fsdp_site")}  # fmt: skip
    out = tmp_path / "out"
    script = [str(REPO / "launch" / "slurm_multi_node.sbatch"), str(out),
              *act_args(tiny_dataset, out, "--steps", "2", "--save_freq", "2", "--val_episodes", "0")]  # fmt: skip
    job = subprocess.run(["bash", *script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert sharding(job.stdout + job.stderr)[1] <= 0.55
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and ckpt.verify(out / "checkpoint-2") is None


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pi0 has 4B parameters: a GPU check")
def test_pi0_at_real_size_under_fsdp_on_a_gpu(
    pi_tokenizers: dict[str, str],  # noqa: F811 (the fixture)
    tiny_dataset: Path,
    tmp_path: Path,
) -> None:
    """pi0 (default variants) under the shipped FSDP config on one GPU, bf16 (FSDP2's policy) with gradient
    checkpointing: 4 steps train, checkpoint at 2 and 4; prints peak GPU memory and samples/s (scripts/gpu_check.sh
    reports them)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                "--num_processes", "1", "--main_process_port", str(free_port())]  # fmt: skip
    options = ["--policy.type", "pi0", "--mixed_precision", "bf16", "--policy.gradient_checkpointing=true",
               "--num_workers", "2", "--steps", "4"]  # fmt: skip
    out = tmp_path / "out"
    result = run_cli(pi_args(tiny_dataset, out, *options), launcher, env=pi_tokenizers, timeout=900)
    assert_ok(result)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and ckpt.verify(out / "checkpoint-4") is None
    print(
        f"pi0 FSDP bf16 gradient checkpointing: peak GPU memory {max(r['gpu_peak_gb'] for r in records):.1f} GiB, "
        f"samples/s {records[-1]['samples_per_s']:.2f} (step 4), {sharding(result.stderr)[0]} FSDP units"
    )
