"""Optimizer construction from `optimizer.type` and `optimizer.args`, and what they report."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from atelier.config.optimizer_types import (
    ADAFACTOR,
    CLASS_PATH_EXAMPLE,
    PIP_NAMES,
    call_string,
    canonical_optimizer,
    is_adaptive_type,
    optimizer_class_path,
)
from atelier.errors import ConfigError

log = logging.getLogger(__name__)

# Arguments an optimizer type always gets, and defaults `optimizer.args` may override
# (sd-scripts does the same: SGDNesterov is SGD with nesterov=True and momentum 0.9, and
# SGDNesterov8bit bitsandbytes' SGD8bit likewise).
FIXED_ARGS: dict[str, dict[str, Any]] = {"SGDNesterov": {"nesterov": True}, "SGDNesterov8bit": {"nesterov": True}}
DEFAULT_ARGS: dict[str, dict[str, Any]] = {"SGDNesterov": {"momentum": 0.9}, "SGDNesterov8bit": {"momentum": 0.9}}


def optimizer_type(value: str) -> str:
    """`optimizer.type` in sd-scripts' spelling (ConfigError naming the key when it names nothing)."""
    return canonical_optimizer(value)


def import_class(path: str, key: str) -> Any:
    """The object `path` ("package.module.Name") names. ConfigError that names `key` (the
    option that gave the path) and says what is missing: the package (and how to install
    it), the module, or the name in the module (with the closest one)."""
    module_name, _, name = path.rpartition(".")
    package = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or package
        if missing != package and missing.split(".")[0] == package:  # the package is there, not the module
            raise ConfigError(f"{key}={path}: the package '{package}' has no module '{missing}'") from None
        top = missing.split(".")[0]  # a package the class's module imports, or its own
        raise ConfigError(
            f"{key}={path} needs the package '{top}', which is not installed (or the path is misspelt): "
            f"pip install {PIP_NAMES.get(top, top)} into .venv, or change {key}"
        ) from None
    if not hasattr(module, name):
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        raise ConfigError(f"{key}={path}: {module_name} has no {name}{hint}")
    return getattr(module, name)


def resolve_optimizer_class(kind: str) -> type[torch.optim.Optimizer]:
    """The optimizer class `optimizer.type` names, imported. ConfigError naming optimizer.type
    for one that does not import or is not an optimizer; run before the model loads."""
    path = optimizer_class_path(kind)
    cls = import_class(path, "optimizer.type")
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(
            f"optimizer.type={kind}: {path} is not an optimizer (not a torch.optim.Optimizer class); give an "
            f"optimizer's class path, e.g. {CLASS_PATH_EXAMPLE}"
        )
    return cls


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


def check_optimizer_args(kind: str, args: dict[str, Any]) -> None:
    """optimizer.type names an optimizer class that imports, and each optimizer.args key is an
    argument of its constructor (its signature; not checked when it takes **kwargs); ConfigError
    names one that is not and lists those it takes. It imports the optimizer's package
    (bitsandbytes takes seconds), so it runs in the job before the model loads
    (atelier.launch.job) and in build_optimizer, not at the config boundary that launchers and
    tools pass without torch."""
    kind = optimizer_type(kind)
    for name, instead in RESERVED_ARGS.items():
        if name in args:
            raise ConfigError(f"optimizer.args.{name}: not an optimizer argument here: {instead}")
    cls = resolve_optimizer_class(kind)
    accepted = constructor_args(cls)
    if accepted is None:
        return
    unknown = [name for name in args if name not in accepted]
    if unknown:
        takes = sorted(accepted - RESERVED_ARGS.keys())
        close = difflib.get_close_matches(unknown[0], takes, n=1)
        hint = f"; did you mean optimizer.args.{close[0]}?" if close else ""
        raise ConfigError(
            f"optimizer.args.{unknown[0]}: not an argument of {optimizer_class_path(kind)} (optimizer.type={kind})"
            f"{hint} It takes: {', '.join(takes)}"
        )


def optimizer_kwargs(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """optimizer.args with the type's defaults and fixed arguments (ValueError when args contradict one)."""
    kind = optimizer_type(kind)
    args = {**DEFAULT_ARGS.get(kind, {}), **args}
    for name, value in FIXED_ARGS.get(kind, {}).items():
        if args.get(name, value) != value:
            raise ValueError(f"optimizer.args.{name}={args[name]}: {kind} always uses {name}={value}")
        args[name] = value
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    return args


def build_optimizer(
    kind: str, param_groups: list[dict[str, Any]], learning_rate: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    """Create the optimizer; each param group carries its own "lr"."""
    kind = optimizer_type(kind)
    check_optimizer_args(kind, args)
    cls = resolve_optimizer_class(kind)
    args = optimizer_kwargs(kind, args)
    if is_adaptive_type(kind) and learning_rate <= 0.1:
        # As sd-scripts warns: D-Adaptation / Prodigy multiply their estimate by the lr.
        log.warning("optimizer.learning_rate=%g is low for %s, which estimates its step size itself: set it "
                    "around 1.0", learning_rate, kind)  # fmt: skip
    lr: float | None = learning_rate
    if optimizer_class_path(kind) == ADAFACTOR and args.get("relative_step", True):
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
    """sd-scripts' ss_optimizer string: `module.Class(key=value,...)` (the class's own module,
    e.g. torch.optim.adamw.AdamW)."""
    cls = type(optimizer)
    return call_string(f"{cls.__module__}.{cls.__name__}", args)
