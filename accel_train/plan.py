"""`accel-train plan`: the memory a run will need, per process, printed before any training.

    accel-train plan [--num_processes N] [--fsdp | --config_file ACCELERATE.yaml] [--json] TRAINING FLAGS...

TRAINING FLAGS are the training command's own (`--policy.type=pi0 --dataset.root DIR --mixed_precision bf16
--peft.method_type=LORA ...`), read by the same parser. How the run is launched: `--num_processes N` (default 1)
and `--fsdp` (FSDP2 with the trainer's own units, as configs/accelerate/fsdp.yaml), or `--config_file FILE`, the
Accelerate config the run is launched with: FSDP or not, its num_processes (unless --num_processes says) and
mixed_precision (unless --mixed_precision says), its wrap policy. So `accel-train plan` takes the flags of
`accelerate launch --config_file FILE --num_processes N accel_train/train.py FLAGS` as they are.

The policy is built as the trainer builds it (accel_train.model: lerobot's make_policy, the PEFT wrapper, the
optimizer preset) on the meta device: shapes and dtypes, no memory, no weights downloaded (pi0 at its real size
plans in seconds). `--policy.path` reads only the pretrained policy's config.json (a folder, or that one file
from the Hub). The input and output shapes come from the dataset's meta/info.json in `--dataset.root`, or in
lerobot's cache for a repo id; no frame is read. Processors are not built. The flags are planned as given: the
config of a checkpoint named by --resume_from_checkpoint or --init_from is not read.

Per process (under FSDP the largest, rank 0: FSDP2 gives each process the dim-0 rows of every parameter,
ceil(rows / N) on the first ones):
- weights: parameters and buffers, in the dtype they train in: as lerobot builds them (`--policy.dtype`) without
  FSDP, Accelerate's mixed precision being autocast only; under FSDP with --mixed_precision bf16|fp16 the trainable
  ones cast to fp32 first (sharding.shard_units);
- gradients: one per trainable parameter that the loss reaches, in its dtype;
- optimizer state: the policy's optimizer (its lerobot preset, or --optimizer.*), stepped once on the meta device,
  so its state tensors are those torch allocates (AdamW: 2 like each parameter, and a 4-byte step);
- with N > 1 without FSDP, DDP's gradient buckets (a second copy of the gradients).
A trainable parameter the loss never reaches gets no gradient and no optimizer state: lerobot's pi0 and pi0.5
never use either lm_head, nor the parts of the language model's last layer after its keys and values
(`never_reached`, checked at stand-in size by tests/test_plan.py); other policies are taken to reach them all.

A checkpoint, in two formats: "consolidated" (today's: policy.safetensors holds the policy's state dict, or under
--peft the adapters only, optimizer_state.pth the optimizer's state, both written by the main process) and
"sharded" (--checkpoint_format sharded, accel_train.sharded_checkpoint: each process writes its rows of every
FSDP-sharded tensor, and the replicated tensors are spread over the processes by size, so without FSDP about 1/N;
the same tensors in all, a weight tied under several names once, which the consolidated format under FSDP writes
under each). The figures are tensor bytes; headers and the small files (configs, processor statistics,
manifest: kilobytes) come on top. A push uploads the whole folder.

Host (CPU) memory a save needs, in CPU buffers the checkpointer keeps for the whole run once the first save has
taken them, pinned on a GPU (torch's host allocator rounds each up to a power of two): consolidated, with
--async_checkpoint (the default) the main process copies the policy and optimizer state; under FSDP every process
copies its shards, and the main process also holds the full state it gathers (padded to N equal chunks, and
exact where N does not divide the rows) and writes; without FSDP and with --async_checkpoint=false, safetensors'
host copies of the weights while it writes. Sharded: every process stages what it writes, before its writer
thread writes it. The plan assumes GPU processes.

Not estimated: activations, FSDP's gathered units during forward and backward, the CUDA context and allocator
cache: scripts/gpu_check.sh measures peak GPU memory on a GPU (`gpu_peak_gb` in metrics.jsonl).

`--json` prints one object:
    policy_type, parameters, trainable_parameters, never_reached_parameters (trainable, no gradient),
    num_processes, fsdp, fsdp_units (null without FSDP), mixed_precision, optimizer (torch class name),
    async_checkpoint,
    per_process: {weights_bytes, gradients_bytes, optimizer_bytes, ddp_buckets_bytes, total_bytes}
        (under FSDP the largest process's),
    dtypes: {dtype name: bytes} of that process's weights,
    checkpoint_bytes: {"consolidated": F, "sharded": F}, each F = {weights, optimizer, total (on disk, and
        uploaded per push), main_process (what it writes), other_processes (the largest of the others)},
    host_bytes: {"consolidated": H, "sharded": H}, each H = {main_process, other_processes (the largest)},
    not_estimated: a sentence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

from accel_train import pretrained
from accel_train.config import BasePolicy, TrainConfig, gives_policy_type, parse, split_policy_path
from accel_train.errors import TrainError, UsageError, first_line
from accel_train.flags import flag_value
from accel_train.sharded_checkpoint import replica_owners

NOT_ESTIMATED = (
    "Not estimated: activations (they grow with --batch_size), FSDP's gathered units during forward and backward, "
    "the CUDA context and allocator cache. scripts/gpu_check.sh measures peak GPU memory on a GPU (gpu_peak_gb in "
    "metrics.jsonl)."
)
PLAN_FLAGS = {"num_processes": True, "config_file": True, "fsdp": False, "json": False}  # name: takes a value
# Config fields that make a policy download weights while it is built; the sizes do not depend on them.
DOWNLOADS = {"pretrained_backbone_weights": None, "load_vlm_weights": False}


@dataclass(frozen=True)
class Launch:
    """How the run is launched: processes, FSDP and its wrap settings (for sharding.choose_units), and the
    Accelerate config's mixed precision (used when the flags say `no`, as the trainer does)."""

    processes: int = 1
    fsdp: bool = False
    plugin: Any = None
    mixed_precision: str = "no"


@dataclass(frozen=True)
class Tensor:
    """A tensor of the training state: its shape, bytes per element, and whether FSDP shards it on dim 0."""

    shape: tuple[int, ...]
    itemsize: int
    sharded: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def rows(self, rank: int, processes: int) -> int:
        """FSDP2's rows of this tensor on `rank` (torch.chunk on dim 0: ceil(rows / N) each, the last ones fewer)."""
        chunk = -(-self.shape[0] // processes)
        return max(0, min(chunk, self.shape[0] - rank * chunk))

    def local(self, rank: int, processes: int) -> int:
        """The bytes `rank` holds: its rows of a sharded tensor, else the whole."""
        if not (self.sharded and self.shape):
            return self.nbytes
        return self.rows(rank, processes) * math.prod(self.shape[1:]) * self.itemsize


def of(tensor: torch.Tensor, sharded: bool) -> Tensor:
    return Tensor(tuple(tensor.shape), tensor.element_size(), sharded)


# Launch options


def split_flags(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The plan's own flags (--num_processes N, --config_file F, --fsdp, --json) and the training flags."""
    options: dict[str, Any] = {}
    rest, it = [], iter(args)
    for arg in it:
        name, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or name not in PLAN_FLAGS:
            rest.append(arg)
        elif not PLAN_FLAGS[name]:
            options[name] = value.lower() not in ("false", "0", "no") if eq else True
        else:
            value = value if eq else next(it, None)
            if value is None or value.startswith("--"):
                raise UsageError(f"--{name} needs a value.")
            options[name] = value
    return options, rest


def launch_of(options: dict[str, Any]) -> Launch:
    """The launch the plan's flags describe: --config_file first, --num_processes and --fsdp over it."""
    settings = read_accelerate_config(Path(options["config_file"])) if "config_file" in options else {}
    given = options.get("num_processes", settings.get("num_processes", 1))
    processes = int(given) if str(given).isdigit() else 0
    if processes < 1:
        raise UsageError(f"--num_processes must be a whole number of at least 1 (got {given}).")
    fsdp = bool(options.get("fsdp")) or settings.get("distributed_type") == "FSDP"
    plugin = fsdp_plugin(settings.get("fsdp_config") or {}) if fsdp else None
    mixed = str(settings.get("mixed_precision") or "no").lower()
    return Launch(processes, fsdp, plugin, mixed if mixed in ("bf16", "fp16") else "no")


def read_accelerate_config(path: Path) -> dict[str, Any]:
    try:
        settings = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"Could not read the Accelerate config {path}: {error}.") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{path} is not an Accelerate config (a YAML mapping, as in configs/accelerate/).")
    return settings


def fsdp_plugin(options: dict[str, Any]) -> SimpleNamespace:
    """What sharding.choose_units and check_fsdp_settings read of Accelerate's FSDP plugin, from the config's
    fsdp_config section (Accelerate's names; the shipped config's values by default)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    wrap = {"TRANSFORMER_BASED_WRAP": transformer_auto_wrap_policy, "SIZE_BASED_WRAP": size_based_auto_wrap_policy}
    classes = options.get("fsdp_transformer_layer_cls_to_wrap") or ""
    return SimpleNamespace(
        fsdp_version=int(options.get("fsdp_version", 2)),
        state_dict_type=SimpleNamespace(name=str(options.get("fsdp_state_dict_type", "FULL_STATE_DICT"))),
        activation_checkpointing=bool(options.get("fsdp_activation_checkpointing", False)),
        cpu_ram_efficient_loading=bool(options.get("fsdp_cpu_ram_efficient_loading", False)),
        auto_wrap_policy=wrap.get(str(options.get("fsdp_auto_wrap_policy", "")).upper()),
        transformer_cls_names_to_wrap=[c.strip() for c in str(classes).split(",") if c.strip()],
        min_num_params=int(options.get("fsdp_min_num_params", 0) or 0),
    )


def check_launch(launch: Launch, mixed_precision: str) -> None:
    """The trainer's FSDP refusals (sharding.check_fsdp_settings), for GPU processes."""
    if not launch.fsdp:
        return
    from accelerate.utils import DistributedType

    from accel_train.sharding import check_fsdp_settings

    check_fsdp_settings(
        SimpleNamespace(
            distributed_type=DistributedType.FSDP,
            state=SimpleNamespace(fsdp_plugin=launch.plugin),
            mixed_precision=mixed_precision,
            device=torch.device("cuda"),
        )
    )


# The training config and the dataset's features


def training_config(args: list[str]) -> TrainConfig:
    """The run's config, as the trainer parses it; over a pretrained policy's config.json with --policy.path."""
    policy_path, args = split_policy_path(args)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in args):
        args = [*args, "--output_dir=unused-by-plan"]  # required by the trainer; the plan writes nothing
    if policy_path is None:
        return parse(args)
    revision = flag_value(args, "policy.pretrained_revision")
    policy = pretrained.read_config(pretrained_config_folder(policy_path, revision))
    given = gives_policy_type(args)
    if given and given != policy["type"]:
        raise TrainError(
            f"--policy.path {policy_path} holds a '{policy['type']}' policy, but --policy.type asks for '{given}'. "
            "Drop --policy.type: a fine-tune keeps the pretrained policy's type."
        )
    policy["pretrained_path"] = None
    return parse(args, base={"policy": policy, "base_policy": dataclasses.asdict(BasePolicy(policy_path, revision))})


def pretrained_config_folder(path: str, revision: str | None) -> Path:
    """The folder of a pretrained policy's config.json: the folder given, or that one file from the Hub."""
    if pretrained.is_local(path):
        return Path(path).expanduser()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, pretrained.CONFIG_FILE, revision=revision)).parent
    except Exception as error:  # not found, offline, gated
        raise TrainError(
            f"--policy.path={path}: there is no such folder here, and its {pretrained.CONFIG_FILE} could not be had "
            f"from the Hub ({first_line(error)}). The plan "
            "needs only that file: download it into a folder and pass the folder."
        ) from None


def dataset_features(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """The first dataset's repo id and its features (meta/info.json), renamed as the run renames them (the
    datasets of a mix must have the same features after renaming; the trainer checks it)."""
    from lerobot.utils.constants import HF_LEROBOT_HOME

    source = cfg.dataset.sources()[0]
    root = Path(source.root) if source.root else HF_LEROBOT_HOME / source.repo_id
    info = root / "meta" / "info.json"
    if not info.is_file():
        raise TrainError(
            f"accel-train plan reads the input and output shapes from the dataset's meta/info.json, and there is "
            f"none in {root}. Pass --dataset.root DIR of a local copy, or fetch that one file: `hf download "
            f"{source.repo_id} meta/info.json --repo-type dataset --local-dir DIR`, then --dataset.root DIR."
        )
    try:
        features = json.loads(info.read_text())["features"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainError(f"{info} is not a LeRobot dataset's info.json ({error}).") from None
    return source.repo_id, {source.rename_map.get(key, key): value for key, value in features.items()}


# The policy on the meta device


def build_on_meta(cfg: TrainConfig, launch: Launch) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The policy and optimizer the trainer builds (accel_train.model), on the meta device; under FSDP with mixed
    precision the trainable parameters cast to fp32 as sharding.shard_units does; the optimizer stepped once with
    a gradient for every trainable parameter the loss reaches, so that its state is what torch allocates."""
    from accel_train.features import adopt_dataset_shapes, check_fits
    from accel_train.model import build_optimizer, build_policy, wrap_with_adapters

    repo_id, features = dataset_features(cfg)
    dataset = SimpleNamespace(repo_id=repo_id, meta=SimpleNamespace(features=features, stats=None))
    cfg.policy.device = "meta"
    for name, value in DOWNLOADS.items():
        if hasattr(cfg.policy, name):
            setattr(cfg.policy, name, value)
    if cfg.base_policy is not None:  # a fine-tune: the pretrained config's features must fit the dataset's
        check_fits(cfg.policy, dataset, cfg.rename_map, cfg.base_policy.path)
        adopt_dataset_shapes(cfg.policy, dataset, cfg.rename_map)
    try:
        with torch.device("meta"):
            policy = build_policy(cfg, dataset, None)
            if cfg.peft is not None:
                policy = wrap_with_adapters(policy, cfg)
            optimizer, _ = build_optimizer(cfg, policy)
    except OSError as error:  # SmolVLA reads its VLM's config and processor, pi0-fast its tokenizers, from the Hub
        raise TrainError(
            f"Could not build the '{cfg.policy.type}' policy, which reads small files from the Hub while it is "
            f"built (configs, tokenizers; no weights): {first_line(error).rstrip('.')}. Run the plan once where the "
            "Hub is reachable (they are cached), as training would."
        ) from None
    if launch.fsdp and mixed_precision(cfg, launch) != "no":
        for param in policy.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    step_on_meta(optimizer, never_reached(policy, cfg.policy.type))
    return policy, optimizer


def mixed_precision(cfg: TrainConfig, launch: Launch) -> str:
    """--mixed_precision wins; otherwise the Accelerate config's (train.make_accelerator)."""
    return cfg.mixed_precision if cfg.mixed_precision != "no" else launch.mixed_precision


def step_on_meta(optimizer: torch.optim.Optimizer, unreached: set[torch.nn.Parameter]) -> None:
    """One optimizer step, a gradient given to every trainable parameter but `unreached`: torch allocates its
    state (on the meta device: shapes and dtypes only)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and param not in unreached:
                param.grad = torch.empty_like(param)
    optimizer.step()  # the gradients stay: state_of reads them


def never_reached(policy: torch.nn.Module, policy_type: str) -> set[torch.nn.Parameter]:
    """Trainable parameters lerobot's loss never reaches (no gradient, so no optimizer state). pi0 and pi0.5: both
    lm_heads, and the language model's last layer past its keys and values (its output projection, MLP and
    post-attention norm) and final norm, since the joint attention's prefix outputs of that layer are dropped."""
    if policy_type not in ("pi0", "pi05"):
        return set()
    pair = next((m for name, m in policy.named_modules() if name.endswith("paligemma_with_expert")), None)
    if pair is None:
        return set()
    language = pair.paligemma.model.language_model
    last = language.layers[-1]
    modules = [pair.paligemma.lm_head, pair.gemma_expert.lm_head, language.norm, last.self_attn.o_proj, last.mlp,
               last.post_attention_layernorm]  # fmt: skip
    return {p for module in modules for p in module.parameters() if p.requires_grad}


# What each process holds


@dataclass(frozen=True)
class State:
    """The training state's tensors (weights: parameters and buffers), and what a checkpoint holds: `policy` in
    the consolidated format, `policy_sharded` in the sharded one, `optimizer` in both."""

    weights: list[Tensor]
    gradients: list[Tensor]
    optimizer: list[Tensor]
    trainable: list[Tensor]
    policy: list[Tensor]
    policy_sharded: list[Tensor]


def state_of(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> State:
    """The tensors of a built (meta or real) policy and its stepped optimizer; under FSDP every parameter and the
    state like it are dim-0 sharded, buffers and step counters not."""
    params = list(policy.parameters())
    optimizer_state = [
        of(value, fsdp and value.shape == param.shape)
        for param, values in optimizer.state.items()
        for value in values.values()
        if torch.is_tensor(value)
    ]
    return State(
        weights=[of(p, fsdp) for p in params] + [of(b, False) for b in policy.buffers()],
        gradients=[of(p.grad, fsdp) for p in params if p.grad is not None],
        optimizer=optimizer_state,
        trainable=[of(p, fsdp) for p in params if p.requires_grad],
        # Consolidated under FSDP: every rank copies every name of the state dict, a tied weight under each
        policy=saved_policy(policy, fsdp, every_name=fsdp),
        policy_sharded=saved_policy(policy, fsdp, every_name=False),
    )


def saved_policy(policy: torch.nn.Module, fsdp: bool, every_name: bool) -> list[Tensor]:
    """The policy tensors a checkpoint holds: the state dict, or for a PEFT policy what PEFT's adapter state dict
    holds (adapters, modules to save), as the checkpointer saves them; a weight tied under several names once (as
    save_model writes it), unless `every_name`."""
    state = policy.state_dict(keep_vars=True)
    if hasattr(policy, "peft_config"):  # adapted (--peft)
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(policy, state_dict=state)
    params = {id(p) for p in policy.parameters()}
    saved, seen = [], set()
    for tensor in state.values():
        if every_name or id(tensor) not in seen:
            saved.append(of(tensor, fsdp and id(tensor) in params))
        seen.add(id(tensor))
    return saved


def total(tensors: Iterable[Tensor], rank: int = 0, processes: int = 1) -> int:
    return sum(t.local(rank, processes) for t in tensors)


def pinned(nbytes: int) -> int:
    """A pinned host buffer's size: torch's caching host allocator rounds each up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def per_process(state: State, processes: int, fsdp: bool) -> dict[str, int]:
    """Rank 0's training state (under FSDP the largest share of every tensor)."""
    figures = {
        "weights_bytes": total(state.weights, 0, processes),
        "gradients_bytes": total(state.gradients, 0, processes),
        "optimizer_bytes": total(state.optimizer, 0, processes),
        # DDP's reducer keeps every trainable parameter's gradient again in its buckets (gradient_as_bucket_view off)
        "ddp_buckets_bytes": total(state.trainable) if processes > 1 and not fsdp else 0,
    }
    return {**figures, "total_bytes": sum(figures.values())}


def checkpoint_bytes(state: State, processes: int, fsdp: bool) -> dict[str, dict[str, int]]:
    """Each format's tensor bytes: weights, optimizer state, total (on disk, uploaded per push), and what the main
    process and the largest of the others write."""
    one = {"weights": total(state.policy), "optimizer": total(state.optimizer)}
    dcp = {"weights": total(state.policy_sharded), "optimizer": total(state.optimizer)}
    whole = dcp["weights"] + dcp["optimizer"]
    shares = sharded_shares(state.policy_sharded + state.optimizer, processes, lambda nbytes: nbytes)
    return {
        "consolidated": {**one, "total": sum(one.values()), **main_and_others([sum(one.values())] + [0] * processes)},
        "sharded": {**dcp, "total": whole, **main_and_others(shares)},
    }


def sharded_shares(tensors: list[Tensor], processes: int, weigh: Callable[[int], int]) -> list[int]:
    """What each process writes (and stages) of a sharded checkpoint, each tensor's bytes weighed by `weigh`: its
    rows of every FSDP-sharded tensor, and the replicated tensors (all of them without FSDP; buffers and step
    counters under it) that accel_train.sharded_checkpoint gives it, spread over the processes by size."""
    shares = [sum(weigh(t.local(r, processes)) for t in tensors if t.sharded and t.shape) for r in range(processes)]
    replicas = [t for t in tensors if not (t.sharded and t.shape)]
    for tensor, owner in zip(replicas, replica_owners([t.nbytes for t in replicas], processes), strict=True):
        shares[owner] += weigh(tensor.nbytes)
    return shares


def main_and_others(per_rank: list[int]) -> dict[str, int]:
    return {"main_process": per_rank[0], "other_processes": max(per_rank[1:], default=0)}


def host_bytes(state: State, processes: int, fsdp: bool, asynchronous: bool) -> dict[str, dict[str, int]]:
    """The host memory a save needs, per format: the main process's, and the largest of the others'. Each
    process's copies are pinned (rounded up to powers of two); the sharded format stages what each process writes."""
    ranks = range(processes)
    one, dcp = state.policy + state.optimizer, state.policy_sharded + state.optimizer
    if fsdp:
        consolidated = [fsdp_snapshot(one, rank, processes) for rank in ranks]
    else:  # the main process's copies; a synchronous save: safetensors' host copies of the weights as it writes
        main = sum(pinned(t.nbytes) for t in one) if asynchronous else total(state.policy)
        consolidated = [main] + [0] * processes
    sharded = sharded_shares(dcp, processes, pinned)
    return {"consolidated": main_and_others(consolidated[:processes]), "sharded": main_and_others(sharded)}


def fsdp_snapshot(tensors: list[Tensor], rank: int, processes: int) -> int:
    """StateSnapshot's buffers on `rank` under FSDP: its shards, pinned (take_shards); on the main process the
    gathered rows of every sharded tensor (padded to N equal chunks) and, where N does not divide the rows, the
    exact full tensor; on another process, its rows padded to the chunk size where it has fewer (gather)."""
    held = 0
    for t in tensors:
        held += pinned(t.local(rank, processes))
        if not (t.sharded and t.shape):
            continue
        chunk_bytes = t.rows(0, processes) * (t.nbytes // max(t.shape[0], 1))
        if rank == 0:
            held += chunk_bytes * processes + (t.nbytes if t.rows(0, processes) * processes != t.shape[0] else 0)
        elif t.rows(rank, processes) != t.rows(0, processes):
            held += chunk_bytes
    return held


# The plan


def fsdp_units(policy: torch.nn.Module, policy_type: str, launch: Launch) -> str:
    """The trainer's FSDP units for this policy (sharding.choose_units, dtype_uniform), as its start-up line."""
    from accel_train.sharding import choose_units, dtype_uniform

    layers, origin = choose_units(policy, policy_type, launch.plugin)
    split = len(dtype_uniform(layers, policy)) - len(layers)
    own = f", {split} modules in a dtype of their own" if split else ""
    return f"{len(layers)} layers ({origin}){own} and the root"


def make_plan(cfg: TrainConfig, launch: Launch) -> dict[str, Any]:
    """The memory plan of a parsed run under a launch (the JSON object of the module docstring)."""
    precision = mixed_precision(cfg, launch)
    check_launch(launch, precision)
    policy, optimizer = build_on_meta(cfg, launch)
    n, fsdp = launch.processes, launch.fsdp
    state = state_of(policy, optimizer, fsdp)
    params = list(policy.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "policy_type": cfg.policy.type,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "never_reached_parameters": sum(p.numel() for p in trainable if p.grad is None),
        "num_processes": n,
        "fsdp": fsdp,
        "fsdp_units": fsdp_units(policy, cfg.policy.type, launch) if fsdp else None,
        "mixed_precision": precision,
        "optimizer": type(optimizer).__name__,
        "per_process": per_process(state, n, fsdp),
        "dtypes": dtype_bytes(params, policy.buffers(), n if fsdp else 1),
        "checkpoint_bytes": checkpoint_bytes(state, n, fsdp),
        "host_bytes": host_bytes(state, n, fsdp, cfg.async_checkpoint),
        "async_checkpoint": cfg.async_checkpoint,
        "not_estimated": NOT_ESTIMATED,
    }


def dtype_bytes(params: list[torch.Tensor], buffers: Iterable[torch.Tensor], shards: int) -> dict[str, int]:
    """Rank 0's weight bytes by dtype (`bfloat16`: ...)."""
    by_dtype: dict[str, int] = {}
    for tensor, sharded in [*((p, shards > 1) for p in params), *((b, False) for b in buffers)]:
        name = str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + of(tensor, sharded).local(0, shards)
    return by_dtype


def size(nbytes: int) -> str:
    """Decimal units, as the trainer's start-up lines: 16106127360 -> 16.11 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:.2f}M" if number >= 1e6 else f"{number:,}"


def render(plan: dict[str, Any]) -> str:
    """The plan as text."""
    n, fsdp, mine = plan["num_processes"], plan["fsdp"], plan["per_process"]
    launch = f"FSDP2 (units: {plan['fsdp_units']})" if fsdp else ("DDP" if n > 1 else "no DDP")
    dtypes = ", ".join(f"{name} {size(b)}" for name, b in plan["dtypes"].items())
    lines = [
        f"Memory plan: {plan['policy_type']}, {count(plan['parameters'])} parameters "
        f"({count(plan['trainable_parameters'])} trainable); {n} process{'es' if n > 1 else ''}, {launch}; "
        f"mixed precision {plan['mixed_precision']}; optimizer {plan['optimizer']}.",
        f"Training state per process{' (the largest, rank 0)' if fsdp and n > 1 else ''}:",
        f"  weights             {size(mine['weights_bytes']):>10}   {dtypes}",
        f"  gradients           {size(mine['gradients_bytes']):>10}",
        f"  optimizer state     {size(mine['optimizer_bytes']):>10}",
    ]
    if mine["ddp_buckets_bytes"]:
        lines.append(f"  DDP buckets         {size(mine['ddp_buckets_bytes']):>10}   the gradients again")
    lines.append(f"  total               {size(mine['total_bytes']):>10}   + activations (not estimated)")
    if plan["never_reached_parameters"]:
        lines.append(
            f"  {count(plan['never_reached_parameters'])} trainable parameters lerobot's loss never reaches: in the "
            "weights, without gradient or optimizer state."
        )
    return "\n".join(lines + checkpoint_lines(plan) + [plan["not_estimated"]])


def checkpoint_lines(plan: dict[str, Any]) -> list[str]:
    """The checkpoint table: both formats side by side."""
    files, host = plan["checkpoint_bytes"], plan["host_bytes"]

    def row(label: str, figures: dict[str, dict[str, int]], key: str) -> str:
        return f"  {label:<38}{size(figures['consolidated'][key]):>14}{size(figures['sharded'][key]):>16}"

    others = plan["num_processes"] > 1
    copies = "async copies" if plan["async_checkpoint"] or plan["fsdp"] else "synchronous save"
    return [
        f"Checkpoint{'':30}{'consolidated':>14}{'sharded (DCP)':>16}",
        row("policy weights", files, "weights"),
        row("optimizer state", files, "optimizer"),
        row("on disk, uploaded per push", files, "total"),
        row("written by the main process", files, "main_process"),
        *([row("written by another process (largest)", files, "other_processes")] if others else []),
        f"Host memory a save needs ({copies}, kept for the whole run; pinned: rounded up to powers of two):",
        row("main process", host, "main_process"),
        *([row("another process (largest)", host, "other_processes")] if others else []),
        "Tensor bytes; the small files (configs, processor statistics, manifest) add kilobytes.",
    ]


def run(args: list[str]) -> str:
    """`accel-train plan ARGS` -> the text (or JSON) to print."""
    options, training = split_flags(args)
    launch = launch_of(options)
    plan = make_plan(training_config(training), launch)
    return json.dumps(plan, indent=2) if options.get("json") else render(plan)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        print(run(argv))
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
