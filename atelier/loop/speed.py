"""Speed switches (training.attention, channels_last, torch_compile, fused_optimizer, allow_tf32).

The trainer calls three functions, each at one place:

    apply_model_settings(base, t, device)    # as the base is loaded (atelier.runtime.reuse.load_base):
                                             # TF32, attention processor, memory format
    compile_unet(base.unet, t)               # after the LoRA network is applied: torch.compile
    optimizer_args(type, args, t, device)    # fused AdamW when it can run

Every switch logs what it did, and why it did nothing where it cannot apply (e.g. TF32
on a CPU), so a config that asks for a speed-up never fails silently.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from atelier.config.optimizer_types import optimizer_class_path

if TYPE_CHECKING:
    from atelier.config.schema import TrainingConfig
    from atelier.models.loading import BaseModel

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "math", "xformers")
# Optimizer classes whose torch implementation has a fused kernel (`fused=True`); sd-scripts'
# names reach them too (AdamW, SGDNesterov).
_TORCH_FUSED = ("torch.optim.AdamW", "torch.optim.SGD")


# --------------------------------------------------------------------- backend
def apply_backend_settings(t: TrainingConfig, device: torch.device) -> dict[str, Any]:
    """training.allow_tf32: TF32 matmuls and convolutions on Ampere+ GPUs (sd-scripts: none; it
    is what `torch.backends.cuda.matmul.allow_tf32` does). Returns what was set."""
    want = t.allow_tf32
    if not want:
        return {"allow_tf32": False}
    if device.type != "cuda" or not torch.cuda.is_available():
        log.info("training.allow_tf32=true: no-op on %s (TF32 exists on NVIDIA Ampere or newer GPUs only)", device)
        return {"allow_tf32": False}
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        log.info("training.allow_tf32=true: no-op, %s is older than Ampere (compute capability %d.x)",
                 torch.cuda.get_device_name(device), major)  # fmt: skip
        return {"allow_tf32": False}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info("training.allow_tf32=true: TF32 matmuls and convolutions enabled")
    return {"allow_tf32": True}


# ----------------------------------------------------------------------- model
def attention_processor(kind: str):
    """The diffusers attention processor for training.attention."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    if kind == "sdpa":
        return AttnProcessor2_0()
    if kind == "math":
        return AttnProcessor()
    if kind == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "training.attention=xformers needs the xformers package (pip install xformers, CUDA only); "
                "training.attention=sdpa (the default) is as fast on torch >= 2"
            ) from err
        return XFormersAttnProcessor()
    raise ValueError(f"training.attention={kind!r}: choose one of {', '.join(ATTENTION_CHOICES)}")


# training.attention on a denoiser whose attention goes through diffusers' dispatcher (FLUX's
# transformer): its backend names; the UNet takes attention processors instead.
DISPATCH_BACKENDS = {"sdpa": "native", "math": "_native_math", "xformers": "xformers"}


def set_attention(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], kind: str) -> None:
    if _dispatched(unet):
        unet.set_attention_backend(DISPATCH_BACKENDS[kind])
    else:
        unet.set_attn_processor(attention_processor(kind))
    for text_encoder in text_encoders:
        if not hasattr(text_encoder, "set_attn_implementation"):
            continue
        # transformers: "sdpa" or "eager" (its plain matmul/softmax attention); no xformers there.
        try:
            text_encoder.set_attn_implementation("eager" if kind == "math" else "sdpa")
        except (ValueError, ImportError) as err:  # an encoder without SDPA support keeps its own
            log.info("text encoder keeps its attention implementation: %s", err)


def _dispatched(unet: torch.nn.Module) -> bool:
    """Whether the denoiser's attention runs through diffusers' dispatcher (its processors say)."""
    processors = getattr(unet, "attn_processors", {})
    return bool(processors) and all(hasattr(p, "_attention_backend") for p in processors.values())


def apply_model_settings(base: BaseModel, t: TrainingConfig, device: torch.device) -> None:
    """training.allow_tf32, attention and channels_last on a freshly loaded base model.

    channels_last survives the later dtype cast (Tensor.to keeps the memory format)."""
    apply_backend_settings(t, device)
    kind = t.attention.value
    # SDXL: both text encoders (BaseModel.text_encoders); SD1/2: the one.
    set_attention(base.unet, list(base.text_encoders), kind)
    log.info("attention: %s", kind)
    if t.channels_last:
        # Convolutions (most of a UNet's time) run NHWC kernels; Linear layers are unaffected.
        base.unet.to(memory_format=torch.channels_last)
        log.info("training.channels_last=true: UNet weights in channels_last (NHWC) memory format")


def compile_unet(unet: torch.nn.Module, t: TrainingConfig) -> bool:
    """training.torch_compile: compile the UNet in place (nn.Module.compile), LoRA included.

    Called after the network patched the UNet's layers, so the compiled graph holds them.
    In place: the UNet keeps its class, so sampling and saving see the same object.
    """
    if not t.torch_compile:
        return False
    backend = t.dynamo_backend or "inductor"
    mode = t.torch_compile_mode
    kwargs = {"backend": backend}
    if mode and backend == "inductor":
        kwargs["mode"] = mode
    elif mode:
        log.info("training.torch_compile_mode=%s ignored: modes belong to the inductor backend", mode)
    unet.compile(**kwargs)
    log.info("training.torch_compile=true: UNet compiled with %s (first steps are slow while it compiles)",
             ", ".join(f"{k}={v}" for k, v in kwargs.items()))  # fmt: skip
    return True


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


# ------------------------------------------------------------------- optimizer
def optimizer_args(kind: str, args: dict[str, Any], t: TrainingConfig, device: torch.device) -> dict[str, Any]:
    """optimizer.args with fused=True added when training.fused_optimizer asks and it can run.

    torch has fused AdamW and SGD kernels for CUDA and, since 2.4, for the CPU (and a few
    other devices; torch keeps the list). For another optimizer or device the switch is
    logged and ignored; an explicit optimizer.args.fused is passed through untouched.
    """
    if not t.fused_optimizer or "fused" in args:
        return args
    if optimizer_class_path(kind) not in _TORCH_FUSED:
        log.info("training.fused_optimizer=true ignored: %s has no fused kernel (only %s)", kind, ", ".join(_TORCH_FUSED))
        return args
    if device.type not in _fused_devices():
        log.info("training.fused_optimizer=true ignored on %s: torch %s has no fused %s kernel there",
                 device, torch.__version__, kind)  # fmt: skip
        return args
    log.info("training.fused_optimizer=true: %s(fused=True) on %s", kind, device)
    return {**args, "fused": True}


def _fused_devices() -> list[str]:
    try:  # private, but it is the list torch's optimizers check `fused=True` against
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: CUDA only
        return ["cuda"]
    return _get_fused_kernels_supported_devices()


__all__ = [
    "ATTENTION_CHOICES",
    "apply_backend_settings",
    "apply_model_settings",
    "attention_processor",
    "compile_unet",
    "is_compiled",
    "optimizer_args",
    "set_attention",
]
