"""Run a script with lerobot's pi0, pi0.5 and pi0-fast models at stand-in sizes, small enough to train on a CPU.

lerobot fixes these models' sizes in code, with no config field for them (docs/notes-pi0.md): two Gemma
variants in each modeling module's `get_gemma_config`, and a SigLIP-So400m vision tower, a 2048-wide projector
and a 257152-token vocabulary set where the PaliGemma config is built. The smallest that runs has 4B
parameters. This launcher replaces exactly those numbers, in each of the three modeling modules, and then runs
the script as `python SCRIPT ARGS` would. Everything else is lerobot's code, unchanged: the processors and
their tokenizer, the forward pass and its flow matching, the optimizer and schedule presets, the PEFT default
targets, save_pretrained and from_pretrained.

    python tests/pi_stand_in.py accel_train/train.py --policy.type=pi0 ...

A model saved under it fits only under it: elsewhere lerobot's pi0 loaders fall back to random weights (with a
printed warning), which accel-train refuses. Before running the script it builds each module's model on the meta
device and stops if the sizes did not apply (if lerobot built its models some other way, say).
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import torch
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0_fast import modeling_pi0_fast
from lerobot.policies.pi05 import modeling_pi05
from stand_ins import PALIGEMMA_VOCABULARY

# The expert attends jointly with the language model, layer by layer: same depth, heads and head size. lerobot
# reshapes the joint attention's output to 8 heads (modeling_pi0.compute_layer_complete): 8 heads it is.
GEMMA = {
    "gemma_2b": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 8},
    "gemma_300m": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 8, "num_kv_heads": 1, "head_dim": 8},
}
VISION = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def shrink(module: Any) -> None:
    """Stand-in sizes for one modeling module: its Gemma variants, and the vision tower, projector and vocabulary
    of the configs it builds, set just before it builds the models from them."""
    language_model = module.PaliGemmaForConditionalGenerationWithPiGemma

    def gemma_config(variant: str) -> Any:
        return module.GemmaConfig(**GEMMA[variant])

    def paligemma(config: Any) -> Any:
        for name, value in VISION.items():
            setattr(config.vision_config, name, value)
        config.vision_config.projection_dim = config.text_config.hidden_size
        config.text_config.vocab_size = PALIGEMMA_VOCABULARY
        return language_model(config=config)

    module.get_gemma_config = gemma_config
    module.PaliGemmaForConditionalGenerationWithPiGemma = paligemma
    if expert_model := getattr(module, "PiGemmaForCausalLM", None):  # pi0-fast has no action expert

        def expert(config: Any) -> Any:
            config.vocab_size = PALIGEMMA_VOCABULARY
            return expert_model(config=config)

        module.PiGemmaForCausalLM = expert


def check_shrunk(module: Any) -> None:
    """Build the module's PaliGemma (with its expert) on the meta device, as its policy does: stand-in sized."""
    with torch.device("meta"):
        if hasattr(module, "PaliGemmaWithExpertModel"):
            model = module.PaliGemmaWithExpertModel(
                module.get_gemma_config("gemma_2b"), module.get_gemma_config("gemma_300m"), precision="float32"
            )
        else:
            model = module.PI0FastPaliGemma(module.get_gemma_config("gemma_2b"), precision="float32")
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > 10**6:
        raise SystemExit(f"{module.__name__}: the stand-in sizes did not apply ({parameters:,} parameters)")


if __name__ == "__main__":
    for modeling in (modeling_pi0, modeling_pi05, modeling_pi0_fast):
        shrink(modeling)
        check_shrunk(modeling)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
