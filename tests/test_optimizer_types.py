"""[13] point 2, optimizers and schedulers: every optimizer sd-scripts names, any optimizer or
schedule by class path with its args, and SDXL's two text-encoder learning rates."""

from __future__ import annotations

import importlib
import inspect
import json
import sys

import pytest
import torch
from safetensors import safe_open

from atelier.config.optimizer_types import (
    NAMED_OPTIMIZERS,
    TORCH_OPTIMIZERS,
    TORCH_SCHEDULERS,
    canonical_optimizer,
    optimizer_class_path,
)
from atelier.config.schema.optimizer import check_can_suggest, check_schedule_fits, is_adaptive
from atelier.errors import ConfigError
from atelier.optim.optimizers import (
    build_optimizer,
    check_optimizer_args,
    describe_optimizer,
    effective_learning_rates,
    has_train_eval_modes,
)
from atelier.optim.schedulers import check_scheduler_args
from tests.test_optimizers import groups, take_step
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged, train  # noqa: F401 (autouse fixture)

ADAPTIVE = {name for name, path in NAMED_OPTIMIZERS.items() if path.split(".")[0] in ("dadaptation", "prodigyopt")}


def test_the_bare_names_are_torch_s_classes() -> None:
    """A bare name sd-scripts looks up in torch.optim / torch.optim.lr_scheduler: the lists the
    config checks spellings against are the installed torch's."""
    optimizers = {n for n, c in vars(torch.optim).items() if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer)}
    schedules = {n for n, c in vars(torch.optim.lr_scheduler).items()
                 if inspect.isclass(c) and issubclass(c, torch.optim.lr_scheduler.LRScheduler)}  # fmt: skip
    assert set(TORCH_OPTIMIZERS) == optimizers - {"Optimizer"}
    assert set(TORCH_SCHEDULERS) == schedules - {"LRScheduler", "_LRScheduler"}


@pytest.mark.parametrize(
    "value, canonical, path",
    [
        ("adamw8bit", "AdamW8bit", "bitsandbytes.optim.AdamW8bit"),  # sd-scripts lowercases the names
        ("PAGEDADAMW8BIT", "PagedAdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"),
        ("DAdaptation", "DAdaptation", "dadaptation.experimental.DAdaptAdamPreprint"),
        ("dadaptlion", "DAdaptLion", "dadaptation.DAdaptLion"),
        ("SGDNesterov8bit", "SGDNesterov8bit", "bitsandbytes.optim.SGD8bit"),
        ("RAdam", "RAdam", "torch.optim.RAdam"),  # a bare name: torch.optim's
        ("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit"),
    ],
)
def test_optimizer_type_takes_sd_scripts_names_and_class_paths(value: str, canonical: str, path: str) -> None:
    assert canonical_optimizer(value) == canonical and optimizer_class_path(value) == path
    assert make_cfg(f"optimizer.type={value}").optimizer.type == canonical  # kept in sd-scripts' spelling


@pytest.mark.parametrize("name", list(NAMED_OPTIMIZERS))
def test_every_named_optimizer_builds_and_takes_a_step(name: str) -> None:
    """All of sd-scripts' names run on the CPU (the paged ones fall back to unpaged state there)."""
    lr, args = (1.0, {}) if name in ADAPTIVE else (1e-3, {})
    if name == "Adafactor":
        args = {"relative_step": False, "scale_parameter": False}
    check_optimizer_args(name, args)
    optimizer = build_optimizer(name, groups(lr), lr, args)
    module, _, cls = NAMED_OPTIMIZERS[name].rpartition(".")
    assert type(optimizer) is getattr(importlib.import_module(module), cls)
    if has_train_eval_modes(optimizer):
        optimizer.train()
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    # DAdaptSGD's first step only starts its estimate, RAdamScheduleFree's first 5 are its rectified
    # warmup: they move nothing.
    for _ in range(6):
        take_step(optimizer)
    after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
    assert all(torch.isfinite(a).all() for a in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    # The D-Adaptation family and Prodigy log the step size they take (and may give an lr suggestion).
    assert (effective_learning_rates(optimizer) is not None) == (name in ADAPTIVE) == is_adaptive(name, args)


def test_an_adaptive_optimizer_at_an_adamw_learning_rate_is_warned_about(caplog) -> None:
    build_optimizer("DAdaptAdan", groups(1.0), 1.0, {})
    assert "is low for" not in caplog.text
    build_optimizer("DAdaptAdan", groups(1e-4), 1e-4, {})  # e.g. optimizer.type=DAdaptAdan on the adamw option
    assert "optimizer.learning_rate=0.0001 is low for DAdaptAdan" in caplog.text and "around 1.0" in caplog.text


def test_sgd_nesterov_8bit_is_sgd8bit_with_nesterov_momentum() -> None:
    optimizer = build_optimizer("SGDNesterov8bit", groups(), 0.1, {})
    assert type(optimizer).__name__ == "SGD8bit"
    # bitsandbytes keeps the momentum as betas[0]; it takes nesterov=True (as sd-scripts passes it) and
    # does not store it.
    assert optimizer.defaults["betas"][0] == 0.9
    with pytest.raises(ValueError, match="SGDNesterov8bit always uses nesterov=True"):
        build_optimizer("SGDNesterov8bit", groups(), 0.1, {"nesterov": False})


def test_class_path_optimizers_build_with_their_args_and_describe_themselves_as_sd_scripts() -> None:
    radam = build_optimizer("torch.optim.RAdam", groups(), 1e-3, {"weight_decay": 0.1, "betas": [0.8, 0.9]})
    assert type(radam) is torch.optim.RAdam and radam.defaults["betas"] == (0.8, 0.9)
    # sd-scripts: optimizer_class.__module__ + "." + __name__, then (k=v,...) with its literal_eval'd tuples.
    assert describe_optimizer(radam, {"weight_decay": 0.1, "betas": [0.8, 0.9]}) == \
        "torch.optim.radam.RAdam(weight_decay=0.1,betas=(0.8, 0.9))"
    assert type(build_optimizer("RAdam", groups(), 1e-3, {})) is torch.optim.RAdam
    paged = build_optimizer("bitsandbytes.optim.PagedAdamW8bit", groups(), 1e-3, {"weight_decay": 0.01})
    assert describe_optimizer(paged, {}) == "bitsandbytes.optim.adamw.PagedAdamW8bit"
    # A schedule-free class path is schedule-free as its name is (sd-scripts: the type ends with it).
    with pytest.raises(ConfigError, match="needs no learning-rate schedule"):
        check_schedule_fits("schedulefree.RAdamScheduleFree", "cosine", 0)
    check_can_suggest("prodigyopt.Prodigy", {})


@pytest.mark.parametrize(
    "kind, args, message",
    [
        ("torch.optim.RAdamm", {}, "optimizer.type=torch.optim.RAdamm: torch.optim has no RAdamm; did you mean "
         "torch.optim.RAdam?"),
        ("nopackage.optim.Fast", {}, "optimizer.type=nopackage.optim.Fast needs the package 'nopackage', which is not "
         "installed"),
        ("torch.optim.nothere.Fast", {}, "the package 'torch' has no module 'torch.optim.nothere'"),
        ("torch.nn.Linear", {}, "torch.nn.Linear is not an optimizer (not a torch.optim.Optimizer class)"),
        ("torch.optim.RAdam", {"betass": [0.9, 0.99]}, "optimizer.args.betass: not an argument of torch.optim.RAdam "
         "(optimizer.type=torch.optim.RAdam); did you mean optimizer.args.betas?"),
        ("PagedAdamW8bit", {"optim_bitz": 8}, "optimizer.args.optim_bitz: not an argument of "
         "bitsandbytes.optim.PagedAdamW8bit (optimizer.type=PagedAdamW8bit); did you mean optimizer.args.optim_bits?"),
        ("DAdaptLion", {"lr": 1.0}, "optimizer.args.lr: not an optimizer argument here"),
    ],
)  # fmt: skip
def test_a_class_that_is_no_optimizer_or_an_unknown_arg_is_named(kind: str, args: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_optimizer_args(kind, args)
    assert message in str(caught.value)


def test_a_missing_optimizer_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # as if lion-pytorch were not installed
    with pytest.raises(ConfigError, match="needs the package 'lion_pytorch', which is not installed.*"
                                          "pip install lion-pytorch into .venv"):  # fmt: skip
        check_optimizer_args("Lion", {})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.type=Adamw9bit"], "optimizer.type=Adamw9bit: not an optimizer sd-scripts names nor a class of "
         "torch.optim; did you mean AdamW8bit?"),
        (["optimizer.type=torch.optim.RAdam", "scheduler=cosine", "scheduler.class_path=StepLR"],
         "scheduler.class_path=StepLR replaces scheduler.type=cosine: use scheduler=constant with it"),
        (["scheduler.class_path=StepLR", "scheduler.warmup_steps=5"], "takes no scheduler.warmup_steps"),
        (["scheduler.class_path=StepLR", "scheduler.power=2"], "scheduler.power=2.0 is not read with"),
        (["scheduler.class_path=CosineAnnealing"], "scheduler.class_path=CosineAnnealing: not a class of "
         "torch.optim.lr_scheduler nor a class path; did you mean CosineAnnealingLR?"),
        (["+scheduler.args.T_max=10"], "scheduler.args.T_max: not an argument scheduler.type=constant takes"),
        (["scheduler=piecewise_constant", "+scheduler.args.step_rules='1:5,0.1'"],
         "scheduler.args.step_rules: sd-scripts' scheduler args are options of their own here: set "
         "scheduler.step_rules"),
        (["optimizer.text_encoder_2_lr=1e-5"], "optimizer.text_encoder_2_lr=1e-05: only SDXL has a second text "
         "encoder (model.version=sd1)"),
    ],
)  # fmt: skip
def test_the_config_boundary_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_cfg(*overrides)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler.class_path=CosineAnnealingLR"], "scheduler.class_path=CosineAnnealingLR needs "
         "scheduler.args.T_max: add +scheduler.args.T_max=<value>"),
        (["scheduler.class_path=StepLR", "+scheduler.args.step_size=2", "+scheduler.args.gama=0.5"],
         "scheduler.args.gama: not an argument of torch.optim.lr_scheduler.StepLR; did you mean "
         "scheduler.args.gamma?"),
        (["scheduler.class_path=ReduceLROnPlateau"], "it needs a metric at each step(metrics)"),
        (["scheduler.class_path=torch.optim.AdamW"], "torch.optim.AdamW is not a learning-rate schedule"),
        (["scheduler.class_path=transformers.optimization.NoSchedule"], "transformers.optimization has no NoSchedule"),
    ],
)  # fmt: skip
def test_a_class_path_schedule_is_checked_against_its_class(overrides: list[str], message: str) -> None:
    scheduler = make_cfg(*overrides).scheduler  # the spelling passes; the class is checked with torch at hand
    with pytest.raises(ConfigError) as caught:
        check_scheduler_args(scheduler)
    assert message in str(caught.value)


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_run_with_a_class_path_optimizer_and_schedule(tmp_path) -> None:
    # optimizer.args of the chosen option (adamw: weight_decay, betas) go to the class too.
    run_dir, summary = train(tmp_path, "optimizer.type=torch.optim.RAdam", "optimizer.args.weight_decay=0.05",
                             "scheduler.class_path=StepLR", "+scheduler.args.step_size=1", "+scheduler.args.gamma=0.5",
                             "optimizer.learning_rate=1e-3", "training.max_train_steps=3")  # fmt: skip
    lrs = [s["lr/unet"] for s in steps_logged(run_dir)]
    # StepLR halves it after each optimizer step; the lr logged at a step is the schedule's after it.
    assert lrs == pytest.approx([5e-4, 2.5e-4, 1.25e-4])
    meta = metadata(run_dir / summary["output_file"])
    assert meta["ss_optimizer"] == "torch.optim.radam.RAdam(weight_decay=0.05,betas=(0.9, 0.999))"
    assert meta["ss_lr_scheduler"] == "torch.optim.lr_scheduler.StepLR(step_size=1,gamma=0.5)"


def test_sdxl_trains_its_two_text_encoders_at_their_own_rates(tmp_path) -> None:
    from atelier.loop.trainer import Trainer

    cfg = make_cfg("model=tiny_sdxl", "optimizer.unet_lr=1e-3", "optimizer.text_encoder_lr=2e-4",
                   "optimizer.text_encoder_2_lr=5e-5", "training.max_train_steps=2")  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    result = trainer.train()
    names = {id(p): name for name, m in trainer.network.loras.items() for p in m.parameters()}
    prefixes = [{names[id(p)].split("_")[1] for p in g["params"]} for g in trainer.optimizer.param_groups]
    assert prefixes == [{"unet"}, {"te1"}, {"te2"}]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 2e-4, 5e-5]
    step = steps_logged(tmp_path)[0]
    assert (step["lr/unet"], step["lr/text_encoder"], step["lr/text_encoder_2"]) == (1e-3, 2e-4, 5e-5)
    assert metadata(result.output_file)["ss_text_encoder_lr"] == "[0.0002, 5e-05]"
    # Without a second rate both text encoders are one group, as before.
    plain = make_cfg("model=tiny_sdxl", "optimizer.text_encoder_lr=2e-4")
    from atelier.loop.build import param_group_names

    assert param_group_names(plain) == ["unet", "text_encoder"]


def test_export_kohya_gives_sd_scripts_the_options(tmp_path) -> None:
    from atelier.outputs.run_dir import write_resolved_config
    from atelier.tools.export_kohya import build_export, command_line, load_run_config

    def exported(*overrides: str):
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        run_dir.mkdir()
        write_resolved_config(run_dir, make_cfg(*overrides))  # the typed config, as a run writes it
        return build_export(load_run_config(run_dir), run_dir)

    export = exported("optimizer.type=bitsandbytes.optim.PagedAdamW8bit", "optimizer.args.weight_decay=0.1",
                      "scheduler.class_path=torch.optim.lr_scheduler.CosineAnnealingLR", "+scheduler.args.T_max=100",
                      "+scheduler.args.eta_min=1e-6", "model=tiny_sdxl", "optimizer.learning_rate=1e-4",
                      "optimizer.text_encoder_2_lr=2e-5")  # fmt: skip
    args = export.args
    assert args["optimizer_type"] == "bitsandbytes.optim.PagedAdamW8bit"
    assert args["lr_scheduler_type"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert args["lr_scheduler_args"] == ["T_max=100", "eta_min=1e-06"]
    assert args["text_encoder_lr"] == [1e-4, 2e-5]  # no text_encoder_lr: the first is learning_rate
    assert "--text_encoder_lr 0.0001 2e-05" in command_line(export)
    assert export.script == "sdxl_train_network.py"
    assert not [u for u in export.unmapped if u[0].startswith(("optimizer.", "scheduler."))]
    named = exported("optimizer.type=dadaptlion", "optimizer.text_encoder_lr=0.5").args
    assert named["optimizer_type"] == "DAdaptLion" and named["text_encoder_lr"] == 0.5  # the run kept the spelling
    assert "lr_scheduler_type" not in named and "lr_scheduler_args" not in named


def test_train_py_refuses_a_bad_class_path_before_the_model_loads(tmp_path) -> None:
    from tests.helpers import error_lines, run_train

    run_dir = tmp_path / "run"
    proc = run_train("debug=smoke", f"hydra.run.dir={run_dir}", "optimizer.type=bitsandbytes.optim.PagedAdamW9bit",
                     cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "loading base model" not in proc.stderr + proc.stdout
    assert error_lines(proc) == ["Error: optimizer.type=bitsandbytes.optim.PagedAdamW9bit: bitsandbytes.optim has no "
                                 "PagedAdamW9bit; did you mean bitsandbytes.optim.PagedAdamW8bit?"]  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "PagedAdamW9bit" in summary["reason"]
