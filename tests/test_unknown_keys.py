"""Nothing is silently ignored ([13] point 1): a key no code reads fails before training, named,
with the option meant; each free-form args dict is checked against what its target takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from atelier.config.load import training_config
from atelier.config.typed import load_run_config, run_config
from atelier.errors import ConfigError
from atelier.optim.optimizers import check_optimizer_args, constructor_args
from tests.helpers import REPO_ROOT, error_lines, run_train

FAST = ("debug=smoke", "sampling.steps=1")


# The two commands: both exited 0 and trained the baseline, the key ignored.
@pytest.mark.parametrize(
    "override, message",
    [
        ("+network.colour=16", "Error: network.colour: not an option of network"),
        ("+training.min_snr_gama=5",
         "Error: training.min_snr_gama: not an option of training; did you mean training.min_snr_gamma?"),
    ],
)  # fmt: skip
def test_train_py_refuses_a_plus_key_no_code_reads(tmp_path: Path, override: str, message: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(*FAST, f"hydra.run.dir={run_dir}", override, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    # Refused by the run-dir guard, before Hydra makes the run dir: nothing trained, nothing written.
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        run_config(training_config(overrides))
    return str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+network.colour=16"], "network.colour: not an option of network ("),
        (["+training.min_snr_gama=5"], "did you mean training.min_snr_gamma?"),
        (["+foo=1"], "foo: not an option of the run config"),
        (["+dataset.extra.deep=1"], "dataset.extra.deep: not an option of dataset"),
        # sd-scripts' flag names lead to ours, in the group or in another one
        (["+network.network_dim=16"], "did you mean network.dim (sd-scripts' --network_dim)?"),
        (["+training.lr_warmup_steps=5"], "did you mean scheduler.warmup_steps (sd-scripts' --lr_warmup_steps)?"),
        (["+optimizer.optimizer_args.eps=1e-6"], "did you mean optimizer.args (sd-scripts' --optimizer_args)?"),
        (["+training.min_snr_gama=5", "+foo=1"], "(also unknown: foo)"),
    ],
)
def test_the_boundary_names_an_unknown_key_and_the_option_meant(overrides: list[str], message: str) -> None:
    assert message in refused(*overrides)


def test_network_args_are_checked_against_the_kinds_args() -> None:
    # sd-scripts' --network_args are typed keys here: an arg the kind reads is named with its key ...
    assert "network.args.conv_dim: sd-scripts' network args are options of their own here: set network.conv_dim" in \
        refused("+network.args.conv_dim=4")
    # ... and any other is refused with what the chosen kind takes.
    message = refused("+network.args.lr_ratio=4")
    assert "network.args.lr_ratio: not an argument network.module=lora takes" in message
    assert all(f"network.{arg}, " in message for arg in ("conv_dim", "dora_wd", "dropout", "module_dropout"))
    assert "network.rank_dropout" in message
    message = refused("network=lokr", "+network.network_args.foo=2")
    assert "network.network_args.foo: not an argument network.module=lokr takes" in message
    assert "network.factor" in message and "network.dropout," not in message  # LoKr: no neuron dropout


def test_scheduler_args_are_checked_against_the_schedules_keys() -> None:
    message = refused("scheduler=cosine", "+scheduler.args.min_lr=0.1")
    assert "scheduler.args.min_lr: not an argument scheduler.type=cosine takes; it takes scheduler.warmup_steps" in message
    assert "min_lr_ratio" not in message  # only cosine_with_min_lr / warmup_stable_decay read it
    assert "set scheduler.step_rules" in refused("+scheduler.lr_scheduler_args.step_rules='1:10,0.1'")


def test_a_run_config_read_back_names_its_unknown_key(tmp_path: Path) -> None:
    """A config.yaml with a key the schema lost (or a hand edit): ConfigError, not OmegaConf's merge error."""
    cfg = OmegaConf.to_container(training_config(), resolve=True)
    cfg["training"]["min_snr_gama"] = 5
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ConfigError, match="training.min_snr_gama: not an option of training"):
        load_run_config(tmp_path)


def test_the_args_dicts_still_take_what_their_target_reads() -> None:
    typed = run_config(training_config(["+optimizer.args.eps=1e-6", "network.conv_dim=4", "scheduler=piecewise_constant"]))
    assert typed.optimizer.args["eps"] == 1e-6 and typed.network.conv_dim == 4
    check_optimizer_args(typed.optimizer.type, typed.optimizer.args)


@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO_ROOT / "conf" / "optimizer").glob("*.yaml")))
def test_every_optimizer_option_passes_its_own_args(option: str) -> None:
    opt = run_config(training_config([f"optimizer={option}"])).optimizer
    check_optimizer_args(opt.type, opt.args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+optimizer.args.betass=[0.9,0.99]"],
         "optimizer.args.betass: not an argument of torch.optim.AdamW (optimizer.type=AdamW); did you mean "
         "optimizer.args.betas? It takes: amsgrad, betas, "),
        (["optimizer=prodigy", "+optimizer.args.d_coeff=2"], "did you mean optimizer.args.d_coef?"),
        (["optimizer=adafactor", "+optimizer.args.decay_rate_=0.8"], "not an argument of transformers.optimization.Adafactor"),
        (["+optimizer.args.lr=1e-3"], "optimizer.args.lr: not an optimizer argument here: set optimizer.learning_rate"),
    ],
)  # fmt: skip
def test_optimizer_args_are_checked_against_the_constructor(overrides: list[str], message: str) -> None:
    opt = run_config(training_config(overrides)).optimizer  # composes: the dict is free-form
    with pytest.raises(ConfigError) as caught:
        check_optimizer_args(opt.type, opt.args)
    assert message in str(caught.value)


def test_a_constructor_with_kwargs_takes_any_arg() -> None:
    class Open:
        def __init__(self, params, lr=1e-3, **kwargs):
            pass

    class Closed:
        def __init__(self, params, lr=1e-3, *, eps=1e-8):
            pass

    assert constructor_args(Open) is None
    assert constructor_args(Closed) == {"params", "lr", "eps"}


def test_the_job_checks_optimizer_args_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    import atelier.launch.job as job

    def train(*args, **kwargs):
        raise AssertionError("training started with a bad optimizer.args key")

    monkeypatch.setattr(job, "run_training", train)
    cfg = training_config([*FAST, "+optimizer.args.betass=[0.9,0.99]"])
    with pytest.raises(ConfigError, match="optimizer.args.betass"):
        job.run_job(cfg, tmp_path, [])
    assert not list(tmp_path.glob("*.safetensors"))
