"""Fine-tuning a pretrained lerobot policy (`--policy.path`, lerobot-train's flags): from a folder or the Hub
(pinned to a commit), with --rename_map, resumed exactly without the base, and clear errors for what does not fit.

The pretrained policy is the tiny ACT of the `trained` fixture: its output dir is a lerobot pretrained folder
(config.json, model.safetensors, policy_preprocessor.json, ...), as a colleague's lerobot-train run leaves it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, base_args, losses, run_cli, same_weights
from conftest import base_args as demo_args
from hub_server import HubServer
from safetensors.torch import load_file, save_file
from test_bad_input import fails

from accel_train.checkpoint import sha256

PRETRAINED_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")


def pretrained_copy(trained: Path, dest: Path) -> Path:
    """The pretrained policy's files (not the run's checkpoints), in a folder of their own."""
    dest.mkdir(parents=True)
    for path in trained.iterdir():
        if path.is_file() and (path.name in PRETRAINED_FILES or path.name.startswith("policy_")):
            shutil.copyfile(path, dest / path.name)
    return dest


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_fine_tune_starts_from_the_pretrained_weights(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """With a learning rate of 0, one step leaves the weights exactly as pretrained."""
    base = pretrained_copy(trained, tmp_path / "base")
    out = tmp_path / "out"
    frozen = ["--optimizer.type=sgd", "--optimizer.lr=0", "--policy.optimizer_lr_backbone=0"]
    args = base_args(tiny_dataset, out, "--steps", "1", "--save_freq", "1", "--policy.path", str(base), *frozen)
    result = run_cli(args)
    assert_ok(result)
    assert f"Fine-tuning {base}" in result.stderr
    assert same_weights(out / "model.safetensors", base / "model.safetensors")
    recorded = json.loads((out / "checkpoint-1" / "train_config.json").read_text())
    assert recorded["base_policy"] == {"path": str(base), "revision": None, "commit": None,
                                       "sha256": sha256(base / "model.safetensors")}  # fmt: skip
    assert recorded["policy"]["type"] == "act" and recorded["policy"]["pretrained_path"] is None


def test_fine_tune_resumes_exactly_without_the_pretrained_folder(
    trained: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    base = pretrained_copy(trained, tmp_path / "base")
    flags = ["--policy.path", str(base), "--policy.n_action_steps=3", "--image_transforms.enable=true",
             "--save_freq", "3"]  # fmt: skip
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert_ok(run_cli(base_args(tiny_dataset, straight, "--steps", "6", *flags)))
    assert_ok(run_cli(base_args(tiny_dataset, out, "--steps", "3", *flags)))
    shutil.rmtree(base)  # a full fine-tune's checkpoint holds every weight: the base is not needed again
    second = run_cli(base_args(tiny_dataset, out, "--steps", "6", "--resume_from_checkpoint", "latest", *flags))
    assert_ok(second)
    assert "its config and weights win over --policy.path" in second.stderr
    assert losses(out) == losses(straight) and len(losses(out)) == 6
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["n_action_steps"] == 3  # the override was kept


def test_fine_tune_from_the_hub_pins_the_revision_to_its_commit(
    trained: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    base = pretrained_copy(trained, tmp_path / "base")
    with HubServer() as hub:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("test-user/act-base")
        first = api.upload_folder(repo_id="test-user/act-base", folder_path=base).oid
        api.create_branch("test-user/act-base", branch="v1", revision=first)
        weights = load_file(base / "model.safetensors")
        moved_on = {name: tensor + 1 for name, tensor in weights.items()}  # main moves on: new weights
        save_file(moved_on, base / "model.safetensors", metadata={"format": "pt"})
        api.upload_folder(repo_id="test-user/act-base", folder_path=base)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "home")}
        out = tmp_path / "out"
        args = base_args(tiny_dataset, out, "--steps", "1", "--save_freq", "1", "--policy.path=test-user/act-base",
                         "--policy.pretrained_revision=v1")  # fmt: skip
        result = run_cli(args, env=env)
        assert_ok(result)
    recorded = json.loads((out / "checkpoint-1" / "train_config.json").read_text())["base_policy"]
    assert recorded["path"] == "test-user/act-base" and recorded["revision"] == "v1" and recorded["commit"] == first
    assert recorded["sha256"] == sha256(trained / "model.safetensors")  # v1's weights, not main's


def test_rename_map_maps_dataset_cameras_to_the_policy_s(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    base = pretrained_copy(trained, tmp_path / "base")

    def rename_front(config: dict) -> None:
        features = config["input_features"]
        config["input_features"] = {
            ("observation.images.camera1" if k == "observation.images.front" else k): v for k, v in features.items()
        }

    edit_config(base, rename_front)
    rename = '--rename_map={"observation.images.front": "observation.images.camera1"}'
    out = tmp_path / "out"
    args = base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "1", "--policy.path", str(base), rename)
    assert_ok(run_cli(args))
    resumed = run_cli(base_args(tiny_dataset, out, "--steps", "3", "--resume_from_checkpoint", "latest"))
    assert_ok(resumed)  # the rename map came back from the checkpoint's config: no flag needed
    saved = json.loads((out / "checkpoint-3" / "train_config.json").read_text())
    assert saved["rename_map"] == {"observation.images.front": "observation.images.camera1"}


@pytest.fixture
def base(trained: Path, tmp_path: Path) -> Path:
    return pretrained_copy(trained, tmp_path / "base")


def test_missing_features_name_them_and_suggest_a_rename_map(capsys, tiny_dataset: Path, base: Path, tmp_path):
    def rename(config: dict) -> None:
        features = config["input_features"]
        features["observation.images.camera1"] = features.pop("observation.images.front")

    edit_config(base, rename)
    hint = """--rename_map='{"observation.images.front": "observation.images.camera1"}'"""
    fails(capsys, base_args(tiny_dataset, tmp_path / "out", "--policy.path", str(base)),
          "expects observation.images.camera1, which the dataset 'local/piper_demo' does not have",
          "observation.images.front", hint)  # fmt: skip


def test_other_bad_fine_tunes(capsys, tiny_dataset: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    nowhere = tmp_path / "nowhere"
    fails(capsys, base_args(tiny_dataset, out, "--policy.path", str(nowhere)),
          f"--policy.path={nowhere}: there is no such folder here", "the Hub could not be asked")  # fmt: skip
    unknown = '--rename_map={"observation.images.top": "x"}'
    fails(capsys, base_args(tiny_dataset, out, "--policy.path", str(base), unknown),
          "--rename_map renames observation.images.top, which the dataset 'local/piper_demo' does not")  # fmt: skip
    fails(capsys, base_args(tiny_dataset, out, "--policy.path", str(base), "--init_from", str(base)),
          "both name the weights to start from")  # fmt: skip
    fails(capsys, base_args(tiny_dataset, out, '--rename_map={"observation.images.front": "x"}'),
          "--rename_map maps dataset keys to those of a pretrained policy")  # fmt: skip
    fails(capsys, base_args(tiny_dataset, out, "--policy.path", str(base), "--policy.type=diffusion"),
          "holds a 'act' policy, but --policy.type asks for 'diffusion'")  # fmt: skip
    other = tmp_path / "diffusion.yaml"
    other.write_text("policy:\n  type: diffusion\n")
    fails(capsys, [*base_args(tiny_dataset, out, "--policy.path", str(base)), "--config", str(other)],
          "sets the policy type 'diffusion', but this run continues a 'act' policy", code=2)  # fmt: skip
    edit_config(base, lambda c: c["input_features"]["observation.state"].update(shape=[6]))
    fails(capsys, base_args(tiny_dataset, out, "--policy.path", str(base)),
          "expects 'observation.state' of shape (6,), but the dataset 'local/piper_demo' has shape (7,)",
          "this act policy takes only the size it was trained with")  # fmt: skip
    assert not list(out.glob("checkpoint-*"))


LORA = ["--peft.method_type=LORA", "--peft.r=4", '--peft.target_modules=["linear1","linear2"]', "--save_freq", "2"]


def test_lora_checkpoints_are_small_resume_exactly_on_the_verified_base_and_load_in_lerobot(
    trained: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    base = pretrained_copy(trained, tmp_path / "base")
    flags = ["--policy.path", str(base), *LORA]
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert_ok(run_cli(base_args(tiny_dataset, straight, "--steps", "4", *flags)))
    assert_ok(run_cli(base_args(tiny_dataset, out, "--steps", "2", *flags)))
    adapter, full = out / "checkpoint-2" / "policy.safetensors", base / "model.safetensors"
    assert adapter.stat().st_size < full.stat().st_size / 100  # the adapters only, not the frozen base
    assert (out / "checkpoint-2" / "optimizer_state.pth").stat().st_size < full.stat().st_size / 100

    original = full.read_bytes()
    full.write_bytes(original[:-8] + bytes(8))  # the base changes under the checkpoint
    resume = base_args(tiny_dataset, out, "--steps", "4", "--resume_from_checkpoint", "latest")
    changed = run_cli(resume)
    assert changed.returncode == 1 and "has changed" in changed.stderr and "Point --policy.path" in changed.stderr
    shutil.move(base, tmp_path / "copy")
    gone = run_cli(resume)
    assert gone.returncode == 1 and f"trained on the pretrained policy in {base}, which is not there" in gone.stderr
    (tmp_path / "copy" / "model.safetensors").write_bytes(original)
    assert_ok(run_cli([*resume, "--policy.path", str(tmp_path / "copy")]))  # a copy of the original base
    assert losses(out) == losses(straight)
    assert same_weights(out / "adapter_model.safetensors", straight / "adapter_model.safetensors")

    # The final model is a PEFT adapter that lerobot's own loading puts on its base.
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy
    from peft.utils import get_peft_model_state_dict

    shutil.copytree(tmp_path / "copy", base)
    config = PreTrainedConfig.from_pretrained(straight)
    config.pretrained_path, config.device = straight, "cpu"
    policy = make_policy(config, ds_meta=LeRobotDatasetMetadata("local/piper_demo", root=tiny_dataset))
    loaded, saved = get_peft_model_state_dict(policy), load_file(straight / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)

    # Merged into its base: a plain policy that acts as the adapted one does.
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    from accel_train.cli import main as cli

    assert cli(["export", str(straight / "checkpoint-4"), str(tmp_path / "merged"), "--merge"]) == 0
    merged = ACTPolicy.from_pretrained(tmp_path / "merged")
    assert not merged.config.use_peft
    preprocessor, _ = make_pre_post_processors(config, pretrained_path=str(straight))
    batch = preprocessor(LeRobotDataset("local/piper_demo", root=tiny_dataset, video_backend="pyav")[0])
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.predict_action_chunk(batch), policy.predict_action_chunk(batch))


def test_lora_on_two_processes_resumes_exactly(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """A LoRA fine-tune under torchrun (2 processes, gloo): 4 steps straight, and its checkpoint at step 2 resumed
    into another output dir to 4, give the same losses and adapters, bit for bit; the checkpoint holds the
    adapters only."""
    from test_datasets import TORCHRUN

    base = pretrained_copy(trained, tmp_path / "base")
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert_ok(run_cli(base_args(tiny_dataset, straight, "--steps", "4", "--policy.path", str(base), *LORA,
                                "--batch_size", "4"), TORCHRUN))  # fmt: skip
    resume = ["--steps", "4", "--batch_size", "4", "--resume_from_checkpoint", str(straight / "checkpoint-2")]
    resumed = run_cli(base_args(tiny_dataset, out, *resume), TORCHRUN)
    assert_ok(resumed)
    assert "2 processes" in resumed.stderr and "no longer bit-identical" not in resumed.stderr
    assert losses(out) == losses(straight)[2:] and len(losses(straight)) == 4
    assert same_weights(out / "adapter_model.safetensors", straight / "adapter_model.safetensors")
    adapters = load_file(straight / "checkpoint-2" / "policy.safetensors")
    assert adapters and all("lora_" in key for key in adapters), sorted(adapters)[:5]


def test_peft_targets_that_match_nothing(capsys, tiny_dataset: Path, base: Path, tmp_path: Path) -> None:
    fails(capsys, base_args(tiny_dataset, tmp_path / "out", "--policy.path", str(base), "--peft.method_type=LORA",
                            '--peft.target_modules=["no_such_layer"]'),
          "Could not add LORA adapters to the act policy", "its linear layers include")  # fmt: skip


@pytest.fixture(scope="session")
def smolvla_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny "pretrained" SmolVLA on a tiny SmolVLM stand-in, both built offline (tests/stand_ins.py)."""
    import stand_ins

    root = tmp_path_factory.mktemp("smolvla")
    return stand_ins.smolvla_policy(root / "policy", stand_ins.smolvlm(root / "vlm"))


def test_smolvla_lora_from_the_hub_resumes_exactly_on_another_machine(
    smolvla_base: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """SmolVLA from a Hub repo with LoRA on its default targets: a resume with an empty cache fetches the base
    at the recorded commit, verifies it, and continues bit-identically. Its checkpoints are a fraction of a full
    fine-tune's."""
    common = ["--dataset_id", "local/piper_demo", "--batch_size", "4", "--save_freq", "2"]

    def base_args(dataset: Path, out: Path, *extra: str) -> list[str]:  # without the demo config's ACT
        return demo_args(dataset, out, *extra)[2:]

    full = tmp_path / "full"
    args = base_args(tiny_dataset, full, "--steps", "2", "--policy.path", str(smolvla_base), *common)
    assert_ok(run_cli(args))
    with HubServer() as hub:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("test-user/smolvla-base")
        commit = api.upload_folder(repo_id="test-user/smolvla-base", folder_path=smolvla_base).oid

        def machine(name: str) -> dict[str, str]:
            return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / name)}

        # A schedule that --steps does not rescale (SmolVLA shortens its warm-up and decay to a shorter run).
        schedule = ["--policy.scheduler_warmup_steps=1", "--policy.scheduler_decay_steps=2"]
        lora = ["--policy.path=test-user/smolvla-base", "--peft.method_type=LORA", "--peft.r=4", *schedule, *common]
        straight, out = tmp_path / "straight", tmp_path / "out"
        assert_ok(run_cli(base_args(tiny_dataset, straight, "--steps", "4", *lora), env=machine("a")))
        assert_ok(run_cli(base_args(tiny_dataset, out, "--steps", "2", *lora), env=machine("b")))
        resume = base_args(tiny_dataset, out, "--steps", "4", "--resume_from_checkpoint", "latest", *common)
        assert_ok(run_cli(resume, env=machine("c")))  # an empty cache: the base comes from the Hub again
    assert losses(out) == losses(straight) and len(losses(out)) == 4
    assert same_weights(out / "adapter_model.safetensors", straight / "adapter_model.safetensors")
    base = json.loads((out / "checkpoint-4" / "train_config.json").read_text())["base_policy"]
    assert base["path"] == "test-user/smolvla-base" and base["commit"] == commit
    adapter_size = (out / "checkpoint-2" / "policy.safetensors").stat().st_size
    full_size = (full / "checkpoint-2" / "policy.safetensors").stat().st_size
    print(f"SmolVLA checkpoint: LoRA {adapter_size} bytes, full fine-tune {full_size} bytes")
    assert adapter_size < full_size / 10
