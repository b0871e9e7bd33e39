"""Which configs of a sweep can be trained in one fused pass, and in which groups.

A group shares one frozen base model and one batch shape: the keys in SHARED_KEYS must be
equal. Each config must also be a possible lane on its own (lane_problems): a network of a
fusable kind (atelier.config.network_kinds: LoRA, LoCon) on the UNet only, no dropouts (they draw from the global RNG, so no lane
could match its solo run), bf16 or fp32, one process, no torch.compile.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import reduce

from atelier.config.schema import AtelierConfig, MixedPrecision
from atelier.errors import UserError
from atelier.config.block_weights import is_blockwise
from atelier.config.network_kinds import fusable_kinds
from atelier.config.network_spec import NetworkSpec

# Config keys every lane of a group must share: one base model, one batch shape.
SHARED_KEYS = (
    "model",
    "dataset",
    "training.train_batch_size",
    "training.mixed_precision",
    "training.fp8_base",
    "training.fp8_base_unet",
    "training.cpu",
    "training.gradient_checkpointing",
    "training.attention",
    "training.channels_last",
    "training.torch_compile",
    "network.train_unet_only",
    # FLUX: inputs of the one transformer call the lanes share (atelier.objective.steps.flux_call).
    "training.guidance_scale",
    "training.apply_t5_attn_mask",
    "training.t5xxl_max_token_length",
    "training.blocks_to_swap",  # where the shared transformer's weights live
)


class FusedGroupError(UserError, ValueError):
    """These configs cannot be trained in one fused pass; the message says why."""


def lane_problems(cfg: AtelierConfig) -> list[str]:
    """Why `cfg` cannot be a lane of any fused run (empty: it can)."""
    t, spec = cfg.training, NetworkSpec.from_config(cfg.network)
    problems = []
    if not cfg.network.train_unet_only:
        problems.append("network.train_unet_only must be true (text-encoder training is not fused)")
    if not spec.entry.fusable:
        problems.append(f"network.module={spec.kind} cannot be fused (only {', '.join(fusable_kinds())})")
    if is_blockwise(cfg.network):
        problems.append("block-wise ranks / lr weights (network.block_dims, *_lr_weight) are not fused")
    if spec.dropout or spec.rank_dropout or spec.module_dropout:
        problems.append("network dropouts draw from the global RNG; set them to 0 to fuse")
    if spec.dora_wd:  # the fused slots batch up @ down; DoRA rebuilds and renormalises each lane's weight
        problems.append("network.dora_wd (DoRA) is not fused")
    if spec.use_tucker:  # a Tucker core sits between down and up
        problems.append("network.use_tucker is not fused")
    if t.mixed_precision == MixedPrecision.fp16:
        problems.append("training.mixed_precision=fp16 is not fused (use bf16 or no)")
    if t.full_bf16:
        problems.append("training.full_bf16 is not fused (lanes keep float32 weights)")
    if t.num_processes != 1:
        problems.append("training.num_processes must be 1")
    if t.torch_compile:
        problems.append("training.torch_compile is not fused")
    return problems


def group_key(cfg: AtelierConfig) -> str:
    """Equal for configs that can share a fused pass (given no lane_problems)."""
    values = {}
    for key in SHARED_KEYS:
        value = reduce(getattr, key.split("."), cfg)
        values[key] = asdict(value) if is_dataclass(value) else value
    return json.dumps(values, sort_keys=True, default=str)


def check_group(cfgs: Sequence[AtelierConfig]) -> None:
    """Raise FusedGroupError unless every config can be a lane of one fused run."""
    if not cfgs:
        raise FusedGroupError("no configs to fuse")
    problems = []
    keys = [json.loads(group_key(cfg)) for cfg in cfgs]
    for key in SHARED_KEYS:
        if any(k[key] != keys[0][key] for k in keys[1:]):
            problems.append(f"{key} differs between the configs")
    for i, cfg in enumerate(cfgs):
        problems += [f"config {i}: {problem}" for problem in lane_problems(cfg)]
    if problems:
        raise FusedGroupError("cannot fuse these configs: " + "; ".join(problems))


@dataclass
class Plan:
    """A sweep's jobs (by index) as fused groups and jobs that run alone, with the reason."""

    groups: list[list[int]] = field(default_factory=list)
    alone: dict[int, str] = field(default_factory=dict)


def plan_groups(cfgs: Sequence[AtelierConfig | None], max_adapters: int) -> Plan:
    """Group the configs that can share a pass, at most `max_adapters` per group, in sweep order.

    A None config (it did not pass validation) runs alone, where its own process reports
    why; so does a config with lane problems, and one left without partners.
    """
    if max_adapters < 1:
        raise ValueError(f"hydra.launcher.max_adapters must be at least 1, got {max_adapters}")
    plan = Plan()
    by_key: dict[str, list[int]] = {}
    for index, cfg in enumerate(cfgs):
        problems = ["its config is invalid"] if cfg is None else lane_problems(cfg)
        if problems:
            plan.alone[index] = "; ".join(problems)
        else:
            by_key.setdefault(group_key(cfg), []).append(index)
    for members in by_key.values():
        for chunk in _even_chunks(members, max_adapters):
            if len(chunk) > 1:
                plan.groups.append(chunk)
            elif len(members) == 1:
                plan.alone[chunk[0]] = "no other job of the sweep shares its base model, dataset and batch shape"
            else:
                plan.alone[chunk[0]] = f"hydra.launcher.max_adapters={max_adapters} left it without a partner"
    plan.groups.sort(key=lambda group: group[0])
    return plan


def _even_chunks(items: list[int], most: int) -> list[list[int]]:
    """`items` in as few chunks of at most `most` as possible, sizes differing by one at most
    (9 jobs, 8 adapters: 5 + 4, not 8 + a job alone)."""
    count = -(-len(items) // most)
    size, extra = divmod(len(items), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks
