"""Tiny offline stand-ins for pretrained models that lerobot's VLA policies download from the Hub.

    vlm = smolvlm(tmp / "vlm")                    # for --policy.vlm_model_name=DIR
    policy = smolvla_policy(tmp / "policy", vlm)  # a lerobot pretrained SmolVLA folder, like lerobot/smolvla_base
    paligemma_tokenizer(tmp / "tok")              # served as google/paligemma-3b-pt-224, for the pi0 family
    fast_tokenizer(tmp / "fast")                  # served as lerobot/fast-action-tokenizer, for pi0-fast

Everything is built here, from a fixed seed, without network access: a SmolVLM-architecture config with small
dimensions and random weights, a tokenizer trained on a few sentences with `tokenizers`, and a SmolVLA policy
saved with lerobot's own `save_pretrained`, processors included. Same arguments, same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from accel_train import demo_dataset

# The tokens SmolVLM's processor and SmolVLA look up by name (SmolVLA reads fake_image_token_id and
# global_image_token_id from the tokenizer).
IMAGE_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
SENTENCES = [
    demo_dataset.TASK,
    "Pick up the red cube and put it in the blue container.",
    "Move the arm to the cube, grasp it, carry it and release it.",
    "Open the gripper. Close the gripper. Go back home.",
]
IMAGE_SIZE = 64  # the vision tower's input: SmolVLA needs --policy.resize_imgs_with_padding=[64,64]
PATCH_SIZE = 16
SCALE_FACTOR = 2  # pixel shuffle: (64 / 16)^2 / 2^2 = 4 image tokens per camera


def bpe(specials: list[str], vocab_size: int = 300, every_byte: bool = False) -> Any:
    """A byte-level BPE tokenizer (the `tokenizers` backend) trained on SENTENCES, `specials` first; with
    `every_byte`, all 256 bytes are in its vocabulary, so any text encodes without <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if every_byte else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    backend.train_from_iterator(SENTENCES, trainer)
    return backend


def smolvlm(folder: Path, seed: int = 0) -> Path:
    """A SmolVLM-architecture model folder (config, random weights, processor) that AutoConfig,
    AutoProcessor, AutoTokenizer and AutoModelForImageTextToText load offline."""
    from transformers import (
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    backend = bpe(["<unk>", "<|im_start|>", "<pad>", *IMAGE_TOKENS.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        extra_special_tokens=IMAGE_TOKENS,
        model_max_length=512,
    )
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    size = {"longest_edge": IMAGE_SIZE}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=image_seq_len,
    )
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


PALIGEMMA = "google/paligemma-3b-pt-224"  # the repo id the pi0 family's processors load their tokenizer from
PALIGEMMA_VOCABULARY = 1024  # tests/pi_stand_in.py's models embed this many tokens
FAST = "lerobot/fast-action-tokenizer"  # pi0-fast's default --policy.action_tokenizer_name
FAST_VOCABULARY = 512
# The FAST action tokenizer is remote code in its Hub repo; lerobot ships the same processor class.
FAST_CODE = "from lerobot.policies.molmoact2.molmoact2_hf_model.action_tokenizer import UniversalActionProcessor\n"


def paligemma_tokenizer(folder: Path) -> Path:
    """A tokenizer folder that AutoTokenizer loads in place of PaliGemma's: pi0 and pi0.5 embed its ids, pi0-fast
    also encodes its prompts ("Task: ..., State: 12 200 ...;", "Action: ", "|") and writes FAST action tokens as the
    last ids of its vocabulary below the skipped ones (real PaliGemma's vocabulary ends with 1024 <loc> and 128
    <seg> tokens). Trained on a few sentences, every byte in it, then filled with <loc> tokens to
    PALIGEMMA_VOCABULARY, so that here the action ids land on <loc> tokens, never on text."""
    import json

    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text_vocabulary = PALIGEMMA_VOCABULARY - PI0FastConfig.fast_skip_tokens - FAST_VOCABULARY - 1  # below FAST's
    spec = json.loads(bpe(["<unk>", "<pad>", "<bos>", "<eos>"], text_vocabulary, every_byte=True).to_str())
    vocabulary = spec["model"]["vocab"]
    vocabulary.update({f"<loc{i:04d}>": i for i in range(len(vocabulary), PALIGEMMA_VOCABULARY)})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", pad_token="<pad>",
        bos_token="<bos>", eos_token="<eos>", model_max_length=512,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


def fast_tokenizer(folder: Path, seed: int = 0) -> Path:
    """A folder that AutoProcessor loads with trust_remote_code in place of the FAST action tokenizer: lerobot's
    copy of its processor class, its BPE fitted (FAST's own `fit`) on random-walk action chunks shaped like
    normalised demo actions (50 steps x 7 joints)."""
    import json

    import numpy as np
    from lerobot.policies.molmoact2.molmoact2_hf_model.action_tokenizer import UniversalActionProcessor

    walks = np.random.default_rng(seed).normal(0, 0.2, (64, 50, 7)).cumsum(axis=1)
    processor = UniversalActionProcessor.fit(list(walks), vocab_size=FAST_VOCABULARY)
    assert len(processor.bpe_tokenizer) <= FAST_VOCABULARY  # its ids stay in paligemma_tokenizer's <loc> range
    processor.save_pretrained(folder)
    (folder / "processing_fast.py").write_text(FAST_CODE)
    config_file = folder / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoProcessor": "processing_fast.UniversalActionProcessor"}
    config_file.write_text(json.dumps(config, indent=2))
    return folder


def smolvla_config(vlm: Path, features: dict | None = None, **fields):
    """A SmolVLA config on top of the stand-in VLM: the demo dataset's features (or `features`, lerobot's
    dataset feature spec) and sizes that train fast on a CPU; `fields` override any field."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.utils.feature_utils import dataset_to_policy_features

    policy_features = dataset_to_policy_features(features or demo_dataset.features())
    defaults = {
        "vlm_model_name": str(vlm),
        "load_vlm_weights": False,
        "resize_imgs_with_padding": (IMAGE_SIZE, IMAGE_SIZE),
        "chunk_size": 5,
        "n_action_steps": 5,
        "device": "cpu",
        "push_to_hub": False,
    }
    config = SmolVLAConfig(**{**defaults, **fields})
    config.output_features = {k: f for k, f in policy_features.items() if k == "action"}
    config.input_features = {k: f for k, f in policy_features.items() if k != "action"}
    return config


def standard_stats(features: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Normalisation statistics of a standard normal for every non-image feature (what pretraining would
    have measured on its own data; a fine-tune replaces them with its dataset's)."""
    stats = {}
    for key, feature in features.items():
        if feature["dtype"] in ("video", "image"):
            continue
        shape = tuple(feature["shape"])
        stats[key] = {
            "mean": torch.zeros(shape),
            "std": torch.ones(shape),
            "min": torch.full(shape, -3.0),
            "max": torch.full(shape, 3.0),
        }
    return stats


def smolvla_policy(
    folder: Path, vlm: Path, features: dict | None = None, seed: int = 0, vlm_name: str | None = None, **fields
) -> Path:
    """A "pretrained" SmolVLA folder as `lerobot-train` writes one: config.json, model.safetensors,
    policy_preprocessor.json / policy_postprocessor.json and their statistics. Loads with
    `SmolVLAPolicy.from_pretrained(folder)` and `make_pre_post_processors(config, pretrained_path=folder)`.

    The saved files name the VLM `vlm_name` (a Hub repo id holding the `vlm` folder, as lerobot/smolvla_base
    names HuggingFaceTB/SmolVLM2-500M-Video-Instruct), or the `vlm` folder itself."""
    from lerobot.policies import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.processor import TokenizerProcessorStep

    features = features or demo_dataset.features()
    config = smolvla_config(vlm, features, **fields)
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(config)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=standard_stats(features))
    if vlm_name is not None:
        config.vlm_model_name = vlm_name
        for step in preprocessor.steps:
            if isinstance(step, TokenizerProcessorStep):
                step.tokenizer_name = vlm_name
    policy.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return folder
