"""Optimizer construction from `optimizer.type` and `optimizer.args`, and what they report."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from atelier.config.schema import OptimizerType
from atelier.errors import ConfigError


def _import(path: str) -> Callable[..., torch.optim.Optimizer]:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ImportError(f"optimizer class {path} needs the package '{module.split('.')[0]}': {err}") from err


# Imported lazily: bitsandbytes and friends are slow to import and only one is used.
OPTIMIZER_CLASSES: dict[OptimizerType, str] = {
    OptimizerType.AdamW: "torch.optim.AdamW",
    OptimizerType.AdamW8bit: "bitsandbytes.optim.AdamW8bit",
    OptimizerType.Prodigy: "prodigyopt.Prodigy",
    OptimizerType.Lion: "lion_pytorch.Lion",
    OptimizerType.Lion8bit: "bitsandbytes.optim.Lion8bit",
    OptimizerType.Adafactor: "transformers.optimization.Adafactor",
    OptimizerType.DAdaptAdam: "dadaptation.DAdaptAdam",
    OptimizerType.SGDNesterov: "torch.optim.SGD",
    OptimizerType.AdamWScheduleFree: "schedulefree.AdamWScheduleFree",
}

# Arguments an optimizer type always gets, and defaults `optimizer.args` may override
# (sd-scripts does the same: SGDNesterov is SGD with nesterov=True and momentum 0.9).
FIXED_ARGS: dict[OptimizerType, dict[str, Any]] = {OptimizerType.SGDNesterov: {"nesterov": True}}
DEFAULT_ARGS: dict[OptimizerType, dict[str, Any]] = {OptimizerType.SGDNesterov: {"momentum": 0.9}}

def optimizer_type(value: OptimizerType | str) -> OptimizerType:
    try:
        return OptimizerType(value)
    except ValueError:
        valid = ", ".join(t.value for t in OptimizerType)
        raise ValueError(f"optimizer.type: unknown optimizer '{value}'; choose one of {valid}") from None


# Given by the trainer, never through optimizer.args: why, and what to set instead.
RESERVED_ARGS = {
    "params": "the trainer passes the network's parameters",
    "lr": "set optimizer.learning_rate (or optimizer.unet_lr / optimizer.text_encoder_lr)",
}


def constructor_args(cls: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments `cls(...)` takes; None when it takes **kwargs (any key may be read)."""
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_optimizer_args(kind: OptimizerType | str, args: dict[str, Any]) -> None:
    """Each optimizer.args key is an argument of the optimizer class's constructor (its
    signature; not checked when it takes **kwargs); ConfigError names one that is not and lists
    those it takes. It imports the optimizer's package (bitsandbytes takes seconds), so it runs
    in the job before the model loads (atelier.launch.job) and in build_optimizer, not at the
    config boundary that launchers and tools pass without torch."""
    kind = optimizer_type(kind)
    for name, instead in RESERVED_ARGS.items():
        if name in args:
            raise ConfigError(f"optimizer.args.{name}: not an optimizer argument here: {instead}")
    path = OPTIMIZER_CLASSES[kind]
    accepted = constructor_args(_import(path))
    if accepted is None:
        return
    unknown = [name for name in args if name not in accepted]
    if unknown:
        takes = sorted(accepted - RESERVED_ARGS.keys())
        close = difflib.get_close_matches(unknown[0], takes, n=1)
        hint = f"; did you mean optimizer.args.{close[0]}?" if close else ""
        raise ConfigError(
            f"optimizer.args.{unknown[0]}: not an argument of {path} (optimizer.type={kind.value}){hint} "
            f"It takes: {', '.join(takes)}"
        )


def build_optimizer(
    kind: OptimizerType | str, param_groups: list[dict[str, Any]], learning_rate: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    """Create the optimizer; each param group carries its own "lr"."""
    kind = optimizer_type(kind)
    check_optimizer_args(kind, args)
    cls = _import(OPTIMIZER_CLASSES[kind])
    args = {**DEFAULT_ARGS.get(kind, {}), **args}
    for name, value in FIXED_ARGS.get(kind, {}).items():
        if args.get(name, value) != value:
            raise ValueError(f"optimizer.args.{name}={args[name]}: {kind.value} always uses {name}={value}")
        args[name] = value
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    lr: float | None = learning_rate
    if kind == OptimizerType.Adafactor and args.get("relative_step", True):
        # Adafactor refuses an lr with relative_step: it computes its own (logged as lr/d*lr/*).
        lr = None
    try:
        return cls(param_groups, lr=lr, **args)
    except TypeError as err:
        raise ValueError(f"optimizer.args {sorted(args)} do not fit {cls.__name__}: {err}") from err


def effective_learning_rates(optimizer: torch.optim.Optimizer) -> list[float] | None:
    """The step size each param group really takes, for optimizers that choose it themselves:
    d*lr for Prodigy / D-Adaptation, the relative step (times the parameter scale) for
    Adafactor with relative_step. None for the others, whose step size is their lr."""
    groups = optimizer.param_groups
    if all("d" in g for g in groups):
        return [float(g["d"] * g["lr"]) for g in groups]
    if all(g.get("relative_step") for g in groups) and hasattr(optimizer, "_get_lr"):
        rates = []
        for group in groups:
            # The lr depends on the step count (and RMS) kept per parameter; any stepped one will do.
            state = next((optimizer.state[p] for p in group["params"] if "step" in optimizer.state.get(p, {})), None)
            if state is None:
                return None
            rates.append(float(optimizer._get_lr(group, state)))
        return rates
    return None


def has_train_eval_modes(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two sets of weights: train() for steps, eval() for use."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The parameters hold the optimizer's evaluation weights inside the block (schedule-free:
    the averaged x sequence), its training weights again after; a no-op for other optimizers."""
    if not has_train_eval_modes(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def describe_optimizer(optimizer: torch.optim.Optimizer, args: dict[str, Any]) -> str:
    """sd-scripts' ss_optimizer string: `module.Class(key=value,...)`."""
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    if args:
        name += "(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"
    return name
