"""The parts an Adapter is set up from: its accelerator, the base model, its network and
optimizer, the metadata its LoRA files carry and its lr_schedule.png.

Each is a function of the config (and what was built before it); the Adapter calls them in
the order a plain run always has (atelier.loop.adapter.Adapter.setup), because the network's
initial weights come from the global RNG after set_seed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from atelier.conditioning.sdxl import prepare_text_encoder_2
from atelier.config.block_weights import block_lr_weights
from atelier.config.schema import (
    AtelierConfig,
    MixedPrecision,
    NetworkConfig,
    part_learning_rates,
)
from atelier.config.schema.optimizer import is_adaptive
from atelier.families import family_of
from atelier.models.block_swap import blocks_to_swap, stream, streamed_layers, to_device_except
from atelier.models.fp8_storage import store_weights_in_fp8
from atelier.models.hashes import model_hashes
from atelier.models.loading import BaseModel
from atelier.network.base_merge import merge_base_weights
from atelier.network.blocks import block_index
from atelier.network.lora import TEXT_ENCODER_PREFIX, UNET_PREFIX, LoRANetwork, ParamSelect
from atelier.network.targets import SDXL_TEXT_ENCODER_PREFIXES, belongs_to
from atelier.outputs.metadata import training_metadata
from atelier.plugins import plugin_of
from atelier.loop import speed
from atelier.runtime import reuse
from atelier.conditioning.training_data import TrainingData
from atelier.optim.loss_scaling import FullFp16GradScaler
from atelier.optim.lr_plot import LR_SCHEDULE_PNG, plot_lr_schedule
from atelier.optim.optimizers import build_optimizer, describe_optimizer
from atelier.data.plan import TrainingPlan
from atelier.optim.schedulers import ScheduleSteps, lr_curve, lr_scheduler_from_config

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {MixedPrecision.fp16: torch.float16, MixedPrecision.bf16: torch.bfloat16}


def make_accelerator(cfg: AtelierConfig) -> Accelerator:
    t = cfg.training
    t.check_precision(cuda_available=torch.cuda.is_available())
    # accelerate forms a CPU process group (gloo) only when told to use the CPU.
    cpu = t.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=MixedPrecision(t.mixed_precision).value, cpu=cpu)
    if t.full_fp16 and accelerator.scaler is not None:
        accelerator.scaler = FullFp16GradScaler(accelerator.device.type)
    return accelerator


def load_base(cfg: AtelierConfig, device: torch.device) -> BaseModel:
    """The frozen base model on `device`, UNet and text encoders in the training dtype."""
    m = cfg.model
    log.info("loading base model %s", m.path or m.builtin)
    base = reuse.load_base(m, cfg.training, lambda: plugin_of(m.version).load(m))
    if m.base_weights:  # before the network: its modules wrap the merged layers
        merge_base_weights(base.unet, base.text_encoders, m.base_weights, m.base_weights_multiplier)
    speed.apply_model_settings(base, cfg.training, device)
    weight_dtype = WEIGHT_DTYPES.get(MixedPrecision(cfg.training.mixed_precision), torch.float32)
    for module in (base.unet, base.text_encoder, base.vae):
        module.requires_grad_(False)
        module.eval()
    t = cfg.training
    # training.blocks_to_swap: those blocks' Linear weights never go to the device whole.
    streamed = streamed_layers(blocks_to_swap(base.unet, t.blocks_to_swap)) if t.blocks_to_swap else []
    # The VAE stays in float32: fp16 VAEs overflow (it encodes the latent cache, or every step).
    for module in (base.vae, base.text_encoder):
        module.to(device)
    if streamed:
        to_device_except(base.unet, device, streamed)
    else:
        base.unet.to(device)
    if weight_dtype != torch.float32:
        base.unet.to(weight_dtype)
        base.text_encoder.to(weight_dtype)
    prepare_text_encoder_2(base, device, weight_dtype)
    if t.fp8_base or t.fp8_base_unet:
        encoders = list(base.text_encoders) if t.fp8_base and not t.fp8_base_unet else []
        saved = sum(store_weights_in_fp8(part, weight_dtype) for part in (base.unet, *encoders))
        log.info("fp8 storage of the frozen %s weights: %.1f MB less", "UNet and text encoder" if encoders else "UNet",
                 saved / 1e6)
    if streamed:  # after fp8 storage: the fp8 bytes are what is streamed
        kept = stream(streamed, device)
        log.info("blocks_to_swap=%d: %d Linear weights (%.1f MB) kept in CPU memory, copied to %s as each runs",
                 t.blocks_to_swap, len(streamed), kept / 1e6, device)
    return base


def trains_unet(network: NetworkConfig) -> bool:
    return not network.train_text_encoder_only


def trains_text_encoder(network: NetworkConfig) -> bool:
    return not network.train_unet_only


def trained_parts(cfg: AtelierConfig) -> list[tuple[str, str, float]]:
    """(metric name, kohya name prefix, learning rate) of each trained part, in order: the UNet,
    the text encoder; SDXL's two text encoders are two parts when optimizer.text_encoder_2_lr is
    set (AtelierConfig allows it for SDXL only)."""
    rates = part_learning_rates(cfg.optimizer)
    parts = [("unet", UNET_PREFIX, rates.unet)] if trains_unet(cfg.network) else []
    if trains_text_encoder(cfg.network):
        if cfg.optimizer.text_encoder_2_lr is None:
            parts.append(("text_encoder", TEXT_ENCODER_PREFIX, rates.text_encoder))
        else:
            te1, te2 = SDXL_TEXT_ENCODER_PREFIXES
            parts += [("text_encoder", te1, rates.text_encoder), ("text_encoder_2", te2, rates.text_encoder_2)]
    return parts


def param_groups(
    cfg: AtelierConfig, network: LoRANetwork | None = None
) -> list[tuple[str, ParamSelect, bool | None, float]]:
    """(metric name, modules, up, learning rate) of each of the optimizer's param groups, in order:
    one per trained part, or two with LoRA+ (network.loraplus_*: the part's up matrices, up=True,
    at its rate times the ratio, as sd-scripts' prepare_optimizer_params groups them). With block
    lr weights (network.down/mid/up_lr_weight) the UNet's part is one group per block that has
    modules in `network`, at the UNet's rate times the block's weight (a weight of 0: no group).
    `modules` is a kohya name prefix, or a block's module names."""
    groups: list[tuple[str, ParamSelect, bool | None, float]] = []
    for name, prefix, lr in trained_parts(cfg):
        ratio = cfg.network.loraplus_ratio(text_encoder=name != "unet")
        for group, modules, group_lr in _unet_blocks(cfg, network, lr) if name == "unet" else [(name, prefix, lr)]:
            if ratio is None:
                groups.append((group, modules, None, group_lr))
            else:
                groups += [(group, modules, False, group_lr), (f"{group}_plus", modules, True, group_lr * ratio)]
    return groups


def _unet_blocks(cfg: AtelierConfig, network: LoRANetwork | None, lr: float) -> list[tuple[str, ParamSelect, float]]:
    """The UNet's groups: itself, or (sd-scripts' unet_block<i>) one per block with a weight above 0."""
    weights = block_lr_weights(cfg.network, family_of(cfg.model.version).blocks)
    if weights is None:
        return [("unet", UNET_PREFIX, lr)]
    if network is None:
        raise ValueError("block lr weights: the optimizer's param groups depend on the network's modules; pass it")
    by_block: dict[int, list[str]] = {}
    for name in network.loras:
        if belongs_to(name, UNET_PREFIX):
            by_block.setdefault(block_index(name), []).append(name)
    return [(f"unet_block{block}", tuple(names), lr * weights[block])
            for block, names in sorted(by_block.items()) if weights[block] > 0]  # fmt: skip


def param_group_names(cfg: AtelierConfig, network: LoRANetwork | None = None) -> list[str]:
    """Metric names of the optimizer's param groups, in order (lr/<name>, lr/d*lr/<name>)."""
    return [name for name, _, _, _ in param_groups(cfg, network)]


def create_network(cfg: AtelierConfig, base: BaseModel, device: torch.device, apply: bool) -> LoRANetwork:
    """The config's network on `device`. apply=True patches it into the base model (a plain
    run); apply=False leaves that to atelier.fused.slots (a lane of a fused group)."""
    # Any network.module; from network.weights (shapes read from the file) when set.
    network = plugin_of(cfg.model.version).network(cfg.network, base, trains_unet(cfg.network),
                                                   trains_text_encoder(cfg.network))  # fmt: skip
    network.to(device)
    if cfg.training.full_bf16 or cfg.training.full_fp16:
        # sd-scripts' full_bf16 / full_fp16: the trained weights (hence gradients and optimizer
        # state) in the autocast dtype; the saved file still takes output.save_precision.
        network.to(WEIGHT_DTYPES[MixedPrecision(cfg.training.mixed_precision)])
    if apply:
        network.apply_to()
    if cfg.training.gradient_checkpointing:
        enable_gradient_checkpointing(base, trains_text_encoder(cfg.network))
    if apply:  # a fused group's UNet is shared by its lanes' routing: not compiled
        speed.compile_unet(base.unet, cfg.training)
    return network


def offload_text_encoders(base: BaseModel, device: torch.device) -> bool:
    """Move the frozen text encoders off the training device once every caption's outputs are
    cached (sd-scripts does the same with cache_text_encoder_outputs); sampling brings them back
    for its prompts (atelier.loop.samples). True when they moved (not on a CPU-only run)."""
    if device.type == "cpu":
        return False
    freed = sum(p.numel() * p.element_size() for te in base.text_encoders for p in te.parameters())
    for text_encoder in base.text_encoders:
        text_encoder.to("cpu")
    log.info("text encoders moved to the CPU (their outputs are cached): %.1f MB less on %s", freed / 1e6, device)
    return True


def enable_gradient_checkpointing(base: BaseModel, text_encoders: bool) -> None:
    # Both libraries checkpoint only in train mode; the base has no dropout, so
    # train mode changes nothing else.
    base.unet.enable_gradient_checkpointing()
    base.unet.train()
    # Only those a LoRA trains: FLUX's T5 is never trained, and train mode would turn on its dropout.
    trained = base.text_encoders[: family_of(base.version).lora_text_encoders]
    for text_encoder in trained if text_encoders else ():
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        text_encoder.train()


def create_optimizer(cfg: AtelierConfig, network: LoRANetwork, schedule: ScheduleSteps, device: torch.device):
    """(optimizer, lr scheduler): the param groups of param_groups."""
    opt, sched = cfg.optimizer, cfg.scheduler
    groups = [{"params": network.parameters_of(modules, up), "lr": lr}
              for _, modules, up, lr in param_groups(cfg, network)]  # fmt: skip
    optimizer = build_optimizer(opt.type, groups, opt.learning_rate,
                                speed.optimizer_args(opt.type, dict(opt.args), cfg.training, device))  # fmt: skip
    return optimizer, lr_scheduler_from_config(sched, optimizer, schedule)


def plot_schedule(
    cfg: AtelierConfig, optimizer: torch.optim.Optimizer, schedule: ScheduleSteps, run_dir: Path,
    network: LoRANetwork | None = None,
) -> None:
    """lr_schedule.png in the run dir: the lr of each trained part (or UNet block) over the planned steps."""
    labels = param_group_names(cfg, network)
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    curves = lr_curve(cfg.scheduler, base_lrs, schedule)
    opt = cfg.optimizer
    kind = opt.type
    note = None
    if is_adaptive(opt.type, dict(opt.args)):
        note = f"{kind} scales its steps itself; the step size it takes is logged as lr/d*lr/*"
    title = f"{cfg.scheduler.class_path or cfg.scheduler.type.value} schedule, {kind}"
    plot_lr_schedule(dict(zip(labels, curves)), run_dir / LR_SCHEDULE_PNG, title, note)


def base_metadata(
    cfg: AtelierConfig, base: BaseModel, optimizer: torch.optim.Optimizer, data: TrainingData, plan: TrainingPlan
) -> dict[str, str]:
    """The ss_* metadata every LoRA file of the run carries (atelier.outputs.metadata)."""
    meta = training_metadata(
        cfg,
        base_model_name=base.name,
        optimizer_name=describe_optimizer(optimizer, dict(cfg.optimizer.args)),
        dataset_dirs=data.dataset_dirs(),
        tag_frequency=data.tag_frequency(),
        num_train_images=data.index.num_train_samples,
        num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs,
        max_train_steps=plan.total_steps,
        started_at=time.time(),
        num_reg_images=data.num_reg_images,
        bucket_info=data.bucket_info,
        cache_latents=data.caches_latents,
        variant=base.variant,
    )
    # The hashes A1111 shows for the base model (cached per file, so a sweep hashes once).
    return {**meta, **model_hashes(base.path)}
