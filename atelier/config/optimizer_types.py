"""What `optimizer.type` and `scheduler.class_path` may name, without importing torch.

sd-scripts' rules (library/train_util.py get_optimizer, get_scheduler_fix):
- one of its optimizer names (NAMED_OPTIMIZERS), matched case-insensitively as it lowercases
  them ("adamw8bit" is AdamW8bit);
- a bare name that is not one of those: a class of torch.optim ("RAdam");
- anything else: a class path, "package.module.Class" ("bitsandbytes.optim.PagedAdamW8bit");
- a schedule class (--lr_scheduler_type): a bare name is a class of torch.optim.lr_scheduler.

Whether the class imports, and is an optimizer or a schedule, is checked where torch is at
hand, before the model loads (atelier.optim.optimizers / atelier.optim.schedulers); the
spelling is checked here, at the config boundary and in the run-dir guard.
"""

from __future__ import annotations

import difflib
from typing import Any

from atelier.errors import ConfigError

# sd-scripts' optimizer names, spelled as its --optimizer_type help does, and the class each builds.
NAMED_OPTIMIZERS: dict[str, str] = {
    "AdamW": "torch.optim.AdamW",
    "AdamW8bit": "bitsandbytes.optim.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.PagedAdamW32bit",
    "Lion": "lion_pytorch.Lion",
    "Lion8bit": "bitsandbytes.optim.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.PagedLion8bit",
    "SGDNesterov": "torch.optim.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.SGD8bit",
    # DAdaptation is sd-scripts' old name of DAdaptAdamPreprint.
    "DAdaptation": "dadaptation.experimental.DAdaptAdamPreprint",
    "DAdaptAdamPreprint": "dadaptation.experimental.DAdaptAdamPreprint",
    "DAdaptAdaGrad": "dadaptation.DAdaptAdaGrad",
    "DAdaptAdam": "dadaptation.DAdaptAdam",
    "DAdaptAdan": "dadaptation.DAdaptAdan",
    "DAdaptAdanIP": "dadaptation.experimental.DAdaptAdanIP",
    "DAdaptLion": "dadaptation.DAdaptLion",
    "DAdaptSGD": "dadaptation.DAdaptSGD",
    "Prodigy": "prodigyopt.Prodigy",
    "Adafactor": "transformers.optimization.Adafactor",
    # Need optimizer.train()/eval() around training and sampling; the trainer does it.
    "AdamWScheduleFree": "schedulefree.AdamWScheduleFree",
    "RAdamScheduleFree": "schedulefree.RAdamScheduleFree",
    "SGDScheduleFree": "schedulefree.SGDScheduleFree",
}
_BY_LOWER = {name.lower(): name for name in NAMED_OPTIMIZERS}

# The optimizer classes of torch.optim (torch 2.13) that a bare name reaches, as in sd-scripts;
# tests/test_optimizer_types.py compares this with the installed torch.
TORCH_OPTIMIZERS = ("ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam",
                    "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam")  # fmt: skip
# The schedule classes of torch.optim.lr_scheduler a bare scheduler.class_path reaches.
TORCH_SCHEDULERS = ("ChainedScheduler", "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
                    "ExponentialLR", "LambdaLR", "LinearLR", "MultiStepLR", "MultiplicativeLR", "OneCycleLR",
                    "PolynomialLR", "ReduceLROnPlateau", "SequentialLR", "StepLR")  # fmt: skip

# The pip package of each optimizer package's import name, where they differ.
PIP_NAMES = {"lion_pytorch": "lion-pytorch"}
# Optimizers that estimate their own step size (their d*lr is logged): by package, as sd-scripts
# treats every DAdapt* name and Prodigy alike.
ADAPTIVE_PACKAGES = frozenset({"dadaptation", "prodigyopt"})
ADAFACTOR = NAMED_OPTIMIZERS["Adafactor"]

CLASS_PATH_EXAMPLE = "optimizer.type=torch.optim.RAdam or optimizer.type=bitsandbytes.optim.PagedAdamW8bit"


def is_class_path(value: str) -> bool:
    """A dotted name of identifiers: "torch.optim.RAdam"."""
    parts = value.split(".")
    return len(parts) > 1 and all(p.isidentifier() for p in parts)


def canonical_optimizer(value: str) -> str:
    """`optimizer.type` as the config keeps it: a named type in sd-scripts' spelling, else as
    given. ConfigError naming optimizer.type and the fix for a value that names nothing."""
    value = str(getattr(value, "value", value)).strip()  # an enum member: its spelling
    if value.lower() in _BY_LOWER:
        return _BY_LOWER[value.lower()]
    if is_class_path(value) or value in TORCH_OPTIMIZERS:
        return value
    known = [*NAMED_OPTIMIZERS, *TORCH_OPTIMIZERS]
    close = difflib.get_close_matches(value, known, n=1) or difflib.get_close_matches(
        value.lower(), [k.lower() for k in known], n=1)  # fmt: skip
    hint = f"did you mean {_BY_LOWER.get(close[0], close[0])}? " if close else ""
    raise ConfigError(
        f"optimizer.type={value}: not an optimizer sd-scripts names nor a class of torch.optim; {hint}"
        f"named: {', '.join(NAMED_OPTIMIZERS)}; any other optimizer by its class path, e.g. {CLASS_PATH_EXAMPLE}"
    )


def optimizer_class_path(value: str) -> str:
    """The class `optimizer.type` builds: "Prodigy" -> "prodigyopt.Prodigy", "RAdam" -> "torch.optim.RAdam"."""
    name = canonical_optimizer(value)
    if name in NAMED_OPTIMIZERS:
        return NAMED_OPTIMIZERS[name]
    return name if is_class_path(name) else f"torch.optim.{name}"


def is_adaptive_type(value: str) -> bool:
    """Prodigy and the D-Adaptation family, by name or class path."""
    return optimizer_class_path(value).split(".")[0] in ADAPTIVE_PACKAGES


def is_schedule_free_type(value: str) -> bool:
    """sd-scripts' rule: the type ends with "schedulefree" (AdamWScheduleFree, schedulefree.RAdamScheduleFree)."""
    return canonical_optimizer(value).lower().endswith("schedulefree")


def call_string(name: str, args: dict[str, Any]) -> str:
    """How sd-scripts writes a class and its arguments to ss_optimizer: `name(k=v,k=v)`, or
    `name` alone. A list is written as the tuple sd-scripts' ast.literal_eval makes of it."""
    if not args:
        return name
    return name + "(" + ",".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in args.items()) + ")"


def scheduler_class_path(value: str) -> str:
    """The class `scheduler.class_path` builds: a bare name is one of torch.optim.lr_scheduler.
    ConfigError naming the key for a value that is neither."""
    value = str(value).strip()
    if is_class_path(value):
        return value
    if value in TORCH_SCHEDULERS:
        return f"torch.optim.lr_scheduler.{value}"
    close = difflib.get_close_matches(value, TORCH_SCHEDULERS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(
        f"scheduler.class_path={value}: not a class of torch.optim.lr_scheduler nor a class path; {hint}"
        "give e.g. scheduler.class_path=torch.optim.lr_scheduler.CosineAnnealingLR (with its arguments in "
        "scheduler.args, e.g. +scheduler.args.T_max=1000)"
    )
