"""Adapter checkpoints (--peft) merged into their base: `accel-train export CKPT DIR --merge`.

An adapter checkpoint holds PEFT's adapter files (policy.safetensors in PEFT's adapter format, adapter_config.json)
and names its frozen base in train_config.json (`base_policy`: a folder, or a Hub repo at a commit, and the sha256
of its weights). Merging fetches that exact base, verifies it, adds the adapters and folds them into the weights:
a plain lerobot policy folder that `<Policy>.from_pretrained` loads without peft.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from accel_train import checkpoint as ckpt
from accel_train import pretrained
from accel_train.checkpoint_parts import load_policy_weights
from accel_train.config import BasePolicy
from accel_train.errors import TrainError

# Written by the merge itself (the weights, and the config without use_peft); the rest is copied.
MERGED_FILES = {ckpt.POLICY_FILE, ckpt.POLICY_CONFIG_FILE, ckpt.ADAPTER_CONFIG_FILE}


def export_merged(checkpoint: Path, dest: Path) -> list[Path]:
    """A full lerobot policy folder in `dest` from an adapter checkpoint and its verified base."""
    if not (checkpoint / ckpt.ADAPTER_CONFIG_FILE).is_file():
        raise TrainError(f"--merge: {checkpoint} is not an adapter (--peft) checkpoint; export it without --merge.")
    if problem := ckpt.verify(checkpoint):
        raise TrainError(f"Cannot export {checkpoint}: {problem}.")
    if ckpt.is_sharded(checkpoint):  # the merge reads policy.safetensors: written from the shards into a copy
        from accel_train.sharded_checkpoint import export_consolidated

        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / checkpoint.name
            shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns(ckpt.SHARDS_DIR))
            export_consolidated(checkpoint / ckpt.SHARDS_DIR, copy, with_optimizer=False)
            ckpt.write_manifest(copy)
            return export_merged(copy, dest)
    saved = ckpt.read_train_config(checkpoint) or {}
    if not saved.get("base_policy"):
        raise TrainError(f"{checkpoint} does not record the base policy its adapters were trained on.")
    base = BasePolicy(**saved["base_policy"])
    folder = pretrained.local_folder(base) if base.commit or pretrained.is_local(base.path) else None
    if folder is None:
        raise TrainError(f"The base policy {base.path} of {checkpoint} is not there any more; merging needs it.")
    pretrained.verify(base, folder)
    merged = _merge(checkpoint, folder)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".tmp-merge-") as staging:
        merged.save_pretrained(staging)  # config.json (use_peft false) and model.safetensors
        os.link(Path(staging) / ckpt.PRETRAINED_WEIGHTS, Path(staging) / ckpt.POLICY_FILE)
        for source in checkpoint.iterdir():
            if source.is_file() and source.name not in MERGED_FILES | ckpt.NOT_EXPORTED:
                names = ckpt.EXPORT_COPIES.get(source.name, (source.name,))
                for name in names:
                    shutil.copyfile(source, Path(staging) / name)
        return [path.replace(dest / path.name) for path in sorted(Path(staging).iterdir())]


def _merge(checkpoint: Path, base_folder: Path):
    """The base policy with the checkpoint's adapters folded into its weights (peft's merge_and_unload)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class
    from peft import PeftConfig, get_peft_model

    config = PreTrainedConfig.from_pretrained(checkpoint)
    config.use_peft, config.pretrained_path, config.device = False, None, "cpu"
    policy = get_policy_class(config.type).from_pretrained(base_folder, config=config)
    adapter_config = PeftConfig.from_pretrained(checkpoint)
    policy.name_or_path = adapter_config.base_model_name_or_path  # what PEFT expects the base to be called
    adapted = get_peft_model(policy, adapter_config)
    load_policy_weights(adapted, checkpoint)  # every adapter tensor, checked by name and shape
    merged = adapted.merge_and_unload()
    merged.config.use_peft = False
    return merged
