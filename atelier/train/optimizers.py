"""Optimizer construction from `optimizer.type` and `optimizer.args`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from atelier.config.schema import OptimizerType


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
    OptimizerType.Adafactor: "transformers.optimization.Adafactor",
    OptimizerType.DAdaptAdam: "dadaptation.DAdaptAdam",
}


def build_optimizer(
    optimizer_type: OptimizerType | str, param_groups: list[dict[str, Any]], learning_rate: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    """Create the optimizer; each param group carries its own "lr"."""
    try:
        optimizer_type = OptimizerType(optimizer_type)
    except ValueError:
        valid = ", ".join(t.value for t in OptimizerType)
        raise ValueError(f"optimizer.type: unknown optimizer '{optimizer_type}'; choose one of {valid}") from None
    cls = _import(OPTIMIZER_CLASSES[optimizer_type])
    args = dict(args)
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    try:
        return cls(param_groups, lr=learning_rate, **args)
    except TypeError as err:
        raise ValueError(f"optimizer.args {sorted(args)} do not fit {cls.__name__}: {err}") from err


def describe_optimizer(optimizer: torch.optim.Optimizer, args: dict[str, Any]) -> str:
    """sd-scripts' ss_optimizer string: `module.Class(key=value,...)`."""
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    if args:
        name += "(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"
    return name
