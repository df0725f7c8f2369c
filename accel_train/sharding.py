"""FSDP2 for lerobot policies: the units a policy is sharded into, chosen per policy family, and what each process
then holds.

FSDP2 gathers a unit's parameters just before the unit's `forward` runs and frees them after, so a unit must sit
where a `forward` is called. Most layers are called that way (ACT's encoder and decoder layers, ResNet blocks,
Diffusion's U-Net blocks, the vision encoders' layers). The VLAs' language-model layers are not: lerobot's SmolVLA
(`smolvlm_with_expert.forward_attn_layer`) and pi0 family (`modeling_pi0.compute_layer_complete`) run the
language model's layer i and the action expert's layer i as one joint attention, calling each layer's norms,
projections and MLP directly and never the layer's own `forward`. Sharding those layers by class (what an
Accelerate wrap policy does) fails at the first forward, which is why lerobot-train shards only ACT. Here such
a "joint" layer is one unit made of the modules lerobot does call (its attention's projections, its norms, its
MLP): FSDP2's grouped `fully_shard([...])` gathers the whole layer when the first of them runs and frees it when
the last has run, once per layer, without copying lerobot's model code. Backward needs the layer gathered again
wherever a gradient reaches one of its parts: FSDP2 hooks only the last part's output, which the joint attention
may leave out of the loss (the language model's last layer feeds the expert only through its keys and values),
so each part's output gets the same hook (`regather_in_backward`).

The trainer applies its units when the Accelerate config names no wrap policy (configs/accelerate/fsdp.yaml); a
config that names one (TRANSFORMER_BASED_WRAP with class names, SIZE_BASED_WRAP) is applied here the same way,
after checking it. Accelerate then shards what is left into the root unit and moves the optimizer over.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from accel_train.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyUnits:
    """Module class names of one policy family: `layers` are units gathered around their own forward; each
    `joint` layer is one unit gathered around the calls lerobot makes to its parts."""

    layers: tuple[str, ...]
    joint: tuple[str, ...] = ()


# Read from lerobot 0.6.1 (transformers 5.5, torchvision's ResNets); tests/test_fsdp.py checks them.
RESNET_BLOCKS = ("BasicBlock", "Bottleneck")
PI_FAMILY = FamilyUnits(layers=("SiglipEncoderLayer",), joint=("_PiGemmaDecoderLayerBase",))
POLICY_UNITS = {
    "act": FamilyUnits(layers=("ACTEncoderLayer", "ACTDecoderLayer", *RESNET_BLOCKS)),
    "diffusion": FamilyUnits(layers=("DiffusionConditionalResidualBlock1d", "DiffusionRgbEncoder", *RESNET_BLOCKS)),
    "smolvla": FamilyUnits(layers=("SmolVLMEncoderLayer",), joint=("LlamaDecoderLayer",)),
    "pi0": PI_FAMILY,
    "pi05": PI_FAMILY,
    "pi0_fast": PI_FAMILY,
}
# Policy methods that run the model outside `forward` (validation, evaluation): FSDP2 gathers around them too.
INFERENCE_METHODS = ("predict_action_chunk", "select_action")

Unit = torch.nn.Module | list[torch.nn.Module]


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_settings(accelerator: Accelerator) -> None:
    """FSDP settings the trainer cannot honour, refused before anything is built or written."""
    if not is_fsdp(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UsageError(
            f"FSDP version {plugin.fsdp_version}: accel-train shards with FSDP2 (fully_shard). Set fsdp_version: 2 in "
            "the Accelerate config, as configs/accelerate/fsdp.yaml does."
        )
    if plugin.state_dict_type.name != "FULL_STATE_DICT":
        raise UsageError(
            f"FSDP with fsdp_state_dict_type {plugin.state_dict_type.name}: accel-train checkpoints hold one "
            "consolidated policy.safetensors and optimizer_state.pth, so set fsdp_state_dict_type: "
            "FULL_STATE_DICT in the Accelerate config (as configs/accelerate/fsdp.yaml does)."
        )
    for option, instead in (
        ("activation_checkpointing", "the policy's own --policy.gradient_checkpointing=true (SmolVLA, pi0 family)"),
        ("cpu_ram_efficient_loading", "false (each process builds the policy, then shards it)"),
    ):
        if getattr(plugin, option, False):
            raise UsageError(
                f"FSDP with fsdp_{option}: true, which accel-train does not apply (it shards the policy layer by "
                f"layer itself, before Accelerate sees it). Use {instead}; configs/accelerate/fsdp.yaml sets it "
                "false."
            )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError(
            "FSDP with --mixed_precision fp16 on CPU: FSDP2 keeps the gathered parameters in fp16, and on CPU "
            "Accelerate's autocast does not cast every layer's inputs to fp16 (convolutions meet fp32 inputs and "
            "fail). Use --mixed_precision bf16 (FSDP2's bf16 policy: bf16 compute and reductions, fp32 weights), or "
            "fp16 on GPUs."
        )


def joint_parts(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules lerobot calls of a joint layer: its attention's projections, then its other children (norms,
    MLP), those that hold parameters. Each runs once per pass, so the group's gather and free happen once."""
    attention = getattr(layer, "self_attn", None)
    parts = list(attention.children()) if attention is not None else []
    parts += [child for name, child in layer.named_children() if name != "self_attn"]
    return [part for part in parts if any(True for _ in part.parameters())]


def class_units(policy: torch.nn.Module, layers: Iterable[str], joint: Iterable[str] = ()) -> list[Unit]:
    """Every module of the named classes, innermost first (FSDP2 shards a nested unit before its parent)."""
    layers, joint = set(layers), set(joint)
    units: list[Unit] = []
    for module in reversed(list(policy.modules())):
        name = type(module).__name__
        if name in joint:
            units.append(joint_parts(module))
        elif name in layers:
            units.append(module)
    return units


def size_units(policy: torch.nn.Module, min_params: int) -> list[Unit]:
    """SIZE_BASED_WRAP as torch's size policy means it: the smallest modules that hold at least `min_params`
    parameters not already in a smaller unit, skipping containers without a forward (ModuleList, ModuleDict),
    which fully_shard refuses."""
    units: list[Unit] = []
    claimed: set[torch.nn.Parameter] = set()
    for module in reversed(list(policy.modules())):
        if module is policy or isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
            continue
        own = [p for p in module.parameters() if p not in claimed]
        if sum(p.numel() for p in own) >= min_params:
            units.append(module)
            claimed.update(own)
    return units


def _trainable(module: torch.nn.Module, claimed: set[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad and p not in claimed]


def dtype_uniform(units: list[Unit], policy: torch.nn.Module) -> list[Unit]:
    """The units, with a unit of their own for each module whose trainable parameters are not in its unit's main
    dtype (by bytes): FSDP2 requires one dtype for the trainable parameters of a unit, and lerobot's pi0 family
    keeps its norms and vision embeddings in fp32 with `--policy.dtype=bfloat16`. Such a module (a norm, an
    embedding, a convolution) is called through its forward, where its own unit is gathered. The root (the policy,
    sharded last by Accelerate) is split the same way."""
    result: list[Unit] = []
    claimed: set[torch.nn.Parameter] = set()
    for unit in [*units, policy]:
        tops = unit if isinstance(unit, list) else [unit]
        leaves = [m for top in tops for m in top.modules() if _trainable(m, claimed)]
        by_dtype: dict[torch.dtype, int] = {}
        for leaf in leaves:
            for p in _trainable(leaf, claimed):
                by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel() * p.element_size()
        main = max(by_dtype, key=by_dtype.get) if by_dtype else None
        for leaf in leaves:
            dtypes = {p.dtype for p in _trainable(leaf, claimed)}
            if dtypes == {main}:
                continue
            if len(dtypes) > 1:
                raise UsageError(
                    f"FSDP needs one dtype for the trainable parameters of a unit, and {type(leaf).__name__} holds "
                    f"{', '.join(sorted(map(str, dtypes)))} itself. Train in one dtype (--policy.dtype=float32 "
                    "with --mixed_precision bf16 gives bf16 compute with fp32 weights)."
                )
            result.append(leaf)
            claimed.update(leaf.parameters(recurse=False))
        if unit is not policy:
            result.append([part for part in unit if part not in result] if isinstance(unit, list) else unit)
            claimed.update(p for top in tops for p in top.parameters())
    return result


def classes_of(policy: torch.nn.Module) -> list[str]:
    """The policy's own module classes that hold parameters (torch.nn's building blocks left out)."""
    own = (m for m in policy.modules() if not type(m).__module__.startswith("torch.nn"))
    return sorted({type(m).__name__ for m in own if any(True for _ in m.parameters())})


def choose_units(policy: torch.nn.Module, policy_type: str, plugin) -> tuple[list[Unit], str]:
    """The units to shard before the root, and where they come from (for the start-up line)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    policy_fn = plugin.auto_wrap_policy.func if isinstance(plugin.auto_wrap_policy, functools.partial) else None
    policy_fn = policy_fn or plugin.auto_wrap_policy
    if policy_fn is transformer_auto_wrap_policy:
        names = list(plugin.transformer_cls_names_to_wrap or [])
        present = {type(m).__name__ for m in policy.modules()}
        missing = [n for n in names if n not in present]
        if missing or not names:
            raise UsageError(
                f"The Accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(missing) or 'no class'}, "
                f"which the {policy_type} policy does not have. Its module classes with parameters are: "
                f"{', '.join(classes_of(policy))}. Name some of those, or leave fsdp_auto_wrap_policy out of the "
                "config (as configs/accelerate/fsdp.yaml does) and the trainer chooses the units."
            )
        family = POLICY_UNITS.get(policy_type, FamilyUnits(()))
        inside = {type(m).__name__ for m in policy.modules() if m in _inside_joint_layers(policy, family.joint)}
        if inside & set(names):
            raise _joint_refusal(policy_type, f"names {', '.join(sorted(inside & set(names)))}, inside them")
        joint = [n for n in names if n in family.joint]
        return class_units(policy, names, joint), f"the config's classes ({', '.join(names)})"
    if policy_fn is size_based_auto_wrap_policy:
        if POLICY_UNITS.get(policy_type, FamilyUnits(())).joint:
            raise _joint_refusal(policy_type, "(SIZE_BASED_WRAP) picks modules by size, inside them too")
        return size_units(policy, plugin.min_num_params), f"the config's size rule ({plugin.min_num_params:,} params)"
    if policy_fn is not None:
        raise UsageError(
            f"The Accelerate config's FSDP wrap policy {policy_fn!r} is not one accel-train applies: use "
            "TRANSFORMER_BASED_WRAP with class names, SIZE_BASED_WRAP, or none (the trainer's units)."
        )
    family = POLICY_UNITS.get(policy_type)
    if family is None:
        return [], "none for this policy type: the whole policy is one unit"
    units = class_units(policy, family.layers, family.joint)
    if not units:
        raise UsageError(
            f"None of the {policy_type} policy's layer classes that accel-train shards "
            f"({', '.join(family.layers + family.joint)}) is in the policy built by this lerobot version; its "
            f"classes are {', '.join(classes_of(policy))}. "
            "Name the layer classes in the Accelerate config (fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
            "fsdp_transformer_layer_cls_to_wrap: ...)."
        )
    return units, f"accel-train's layers for {policy_type}"


def _inside_joint_layers(policy: torch.nn.Module, joint: Iterable[str]) -> set[torch.nn.Module]:
    joint = set(joint)
    return {m for layer in policy.modules() if type(layer).__name__ in joint for m in layer.modules() if m is not layer}


def _joint_refusal(policy_type: str, what: str) -> UsageError:
    joint = ", ".join(POLICY_UNITS[policy_type].joint)
    return UsageError(
        f"The Accelerate config's FSDP wrap policy {what}: the {policy_type} policy's language-model layers "
        f"({joint}) run as one joint attention that calls their parts directly, never a module's forward inside "
        "them, so a unit there is never gathered. Leave fsdp_auto_wrap_policy out of the config (as "
        f"configs/accelerate/fsdp.yaml does) for accel-train's units, or name {joint} itself."
    )


def fsdp_kwargs(accelerator: Accelerator) -> dict:
    """fully_shard's settings from the Accelerate plugin, as Accelerate's own fsdp2_prepare_model builds them."""
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    return {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }


def shard_units(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, policy_type: str, accelerator) -> int:
    """Shard the policy's units (before `accelerator.prepare`, which shards the rest as the root) and point the
    optimizer at the sharded parameters. Returns the number of units, the root included."""
    plugin = accelerator.state.fsdp_plugin
    if accelerator.mixed_precision != "no":  # fp32 master weights, as Accelerate would upcast them, before sharding
        for param in policy.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    layers, origin = choose_units(policy, policy_type, plugin)
    units = dtype_uniform(layers, policy)
    before = {param: name for name, param in policy.named_parameters()}
    kwargs = fsdp_kwargs(accelerator)
    for unit in units:
        fully_shard(unit, **kwargs)
        if isinstance(unit, list):
            regather_in_backward(unit)
    plugin.auto_wrap_policy = None  # applied: Accelerate only shards the root now
    after = dict(policy.named_parameters())
    # fully_shard replaces each parameter by a sharded one; the optimizer must hold those (Accelerate does the same
    # for the root's parameters in prepare, by name).
    for group in optimizer.param_groups:
        group["params"] = [after[before[param]] for param in group["params"]]
    split = len(units) - len(layers)
    log.info(
        "FSDP units: %d layers (%s)%s and the root.",
        len(layers),
        origin,
        f", {split} modules in a dtype of their own" if split else "",
    )
    return len(units) + 1


def regather_in_backward(parts: list[torch.nn.Module]) -> None:
    """A joint layer's parts (one FSDP2 unit): when a gradient reaches the output of any of them, gather the layer
    (FSDPModule.unshard, a no-op when it is gathered already) before autograd uses its parameters."""
    owner = parts[0]

    def unshard(grad: torch.Tensor) -> torch.Tensor:
        owner.unshard()
        return grad

    def hook_outputs(module: torch.nn.Module, args: tuple, output: object) -> None:
        for tensor in output if isinstance(output, tuple | list) else (output,):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(unshard)

    for part in parts:
        part.register_forward_hook(hook_outputs)


def gather_for_inference(policy: torch.nn.Module) -> None:
    """After prepare: the policy's inference methods gather the root's parameters as `forward` does."""
    if isinstance(policy, FSDPModule):
        for method in INFERENCE_METHODS:
            if hasattr(policy, method):
                register_fsdp_forward_method(policy, method)


@dataclass(frozen=True)
class Footprint:
    """Bytes of training state, this process's share and the unsharded total: parameters, their gradients (one per
    trainable parameter, in its dtype) and the optimizer's state (`per_param` tensors like each trainable one)."""

    params: tuple[int, int]
    grads: tuple[int, int]
    optimizer: tuple[int, int]

    @property
    def local(self) -> int:
        return self.params[0] + self.grads[0] + self.optimizer[0]

    @property
    def total(self) -> int:
        return self.params[1] + self.grads[1] + self.optimizer[1]


# State tensors kept per parameter by torch's optimizers (lerobot's presets are Adam and AdamW).
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "RMSprop": 1, "Adagrad": 1, "SGD": 1}


def footprint(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Footprint:
    def sizes(params: Iterable[torch.nn.Parameter]) -> tuple[int, int]:
        local = full = 0
        for p in params:
            shard = p.to_local() if isinstance(p, DTensor) else p
            local += shard.numel() * shard.element_size()
            full += p.numel() * p.element_size()
        return local, full

    params = list(policy.parameters())
    trainable = sizes(p for p in params if p.requires_grad)
    per_param = OPTIMIZER_STATES.get(type(optimizer).__name__, 2)
    return Footprint(sizes(params), trainable, (per_param * trainable[0], per_param * trainable[1]))


def describe_footprint(units: int, f: Footprint, scale: Callable[[int], str]) -> str:
    def share(name: str, sizes: tuple[int, int]) -> str:
        return f"{name} {scale(sizes[0])}B of {scale(sizes[1])}B ({sizes[0] / max(sizes[1], 1):.2f}x)"

    return (
        f"FSDP: {units} units; this process holds {share('parameters', f.params)}, {share('gradients', f.grads)}, "
        f"{share('optimizer state', f.optimizer)}: {scale(f.local)}B in all, {f.local / max(f.total, 1):.2f}x of "
        "the unsharded state."
    )
