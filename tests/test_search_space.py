"""The search's settings and space: Hydra's sweep grammar as Optuna distributions, a trial's
values back as overrides, and the errors that name the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import atelier.config
from atelier.config.typed import run_config
from atelier.errors import ConfigError
from atelier.search.settings import PrunerSettings, SearchSettings
from atelier.search.space import override_value, parse_space
from atelier.search.study import make_pruner, make_sampler
from tests.helpers import REPO_ROOT


def test_each_sweep_form_becomes_its_distribution():
    space = parse_space([
        "optimizer.learning_rate=tag(log, interval(1e-5, 1e-3))",
        "training.min_snr_gamma=interval(1, 5.5)",
        "network.alpha=int(interval(1, 16))",
        "network.dim=range(4, 33, 4)",
        "optimizer=choice(adamw, prodigy)",
        "network.conv_dim=4,8",
        "training.seed=3",
    ])
    d = space.distributions
    assert d["optimizer.learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["training.min_snr_gamma"] == FloatDistribution(1.0, 5.5)
    assert d["network.alpha"] == IntDistribution(1, 16)
    assert d["network.dim"] == IntDistribution(4, 32, step=4)
    assert d["optimizer"] == CategoricalDistribution(("adamw", "prodigy"))
    assert d["network.conv_dim"] == CategoricalDistribution((4, 8))
    assert space.fixed == ["training.seed=3"]
    assert parse_space(["network.dim=range(4, 33, 4)"]).grid() == {"network.dim": [4, 8, 12, 16, 20, 24, 28, 32]}


def test_the_command_line_wins_over_the_recipe():
    space = parse_space(["network.dim=choice(4,8)", "network.dim=choice(16,32)"])
    assert space.distributions["network.dim"] == CategoricalDistribution((16, 32))


def test_a_trials_values_read_back_as_the_same_overrides():
    space = parse_space(["optimizer.learning_rate=interval(1e-5,1e-3)", "optimizer=adamw,prodigy",
                         "network.train_unet_only=true,false", "output.output_name='a b',c"])  # fmt: skip
    params = {"optimizer.learning_rate": 1.2345678e-4, "optimizer": "prodigy", "network.train_unet_only": False,
              "output.output_name": "a b"}  # fmt: skip
    overrides = space.overrides(params)
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed == params
    assert override_value(None) == "null" and override_value("it's") == "'it\\'s'"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["training.seed=3"], "the search has nothing to search"),
        (["network.dim=interval(8,4)"], r"network.dim=interval\(8,4\): the start must be below the end"),
        (["optimizer.learning_rate=tag(log,interval(0,1))"], "optimizer.learning_rate: a log interval needs a start above 0"),
        (["network.dim=tag(log,range(4,8))"], "is not a search range"),
        (["network.dim=range(8,4)"], "holds no value"),
    ],
)
def test_a_space_that_cannot_be_searched_names_its_key(arguments, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(arguments)


def test_grid_needs_values_it_can_list():
    space = parse_space(["optimizer.learning_rate=interval(1e-5,1e-3)"])
    with pytest.raises(ConfigError, match=r"hydra.sweeper.params.optimizer.learning_rate: sampler=grid needs"):
        make_sampler(SearchSettings(sampler="grid"), space)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SearchSettings(sampler="bayes"), "hydra.sweeper.search.sampler=bayes: not a sampler; use one of tpe"),
        (lambda: SearchSettings(n_trials=0), "hydra.sweeper.search.n_trials must be at least 1"),
        (lambda: SearchSettings(direction="down"), "use minimize or maximize"),
        (lambda: PrunerSettings(type="asha"), "hydra.sweeper.pruner.type=asha: not a pruner"),
        (lambda: PrunerSettings(type="halving", reduction_factor=1), "reduction_factor must be at least 2"),
    ],
)
def test_bad_settings_name_their_key(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_each_sampler_and_pruner_is_optunas_own():
    space = parse_space(["network.dim=choice(4,8)", "optimizer.learning_rate=interval(1e-5,1e-3)"])
    names = {s: type(make_sampler(SearchSettings(sampler=s, seed=0), space)).__name__ for s in ("tpe", "random", "cmaes")}
    assert names == {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler"}
    grid = parse_space(["network.dim=choice(4,8)"])
    assert type(make_sampler(SearchSettings(sampler="grid"), grid)).__name__ == "GridSampler"
    pruners = {p: type(make_pruner(PrunerSettings(type=p))).__name__ for p in ("median", "halving", "hyperband")}
    assert pruners == {"median": "MedianPruner", "halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner"}
    assert type(make_pruner(None)).__name__ == "NopPruner"


SEARCHES = sorted(p.stem for p in (REPO_ROOT / "conf" / "hparams_search").glob("*.yaml"))


def test_the_demo_and_a_character_search_exist():
    assert {"lr_dim", "character"} <= set(SEARCHES)


@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_recipe_composes_into_a_search_it_can_run(name):
    """Each hparams_search/ recipe: typed settings, a space Optuna can sample, and a job config
    that passes the boundary with a trial link (it holds out validation images)."""
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={name}", "model.path=/m", "dataset.train_data_dir=/d", "trial=0"],
                      return_hydra_config=True)  # fmt: skip
    sweeper = cfg.hydra.sweeper
    settings = OmegaConf.to_object(sweeper.search)
    assert isinstance(settings, SearchSettings) and sweeper.prune
    space = parse_space([f"{k}={v}" for k, v in sweeper.params.items()])
    assert len(space.distributions) >= 3
    make_sampler(settings, space)
    make_pruner(OmegaConf.to_object(sweeper.pruner))
    assert cfg.recipe and cfg.hydra.sweep.dir.startswith(f"outputs/{cfg.project}/{cfg.recipe}/")
    with open_dict(cfg):
        del cfg["hydra"]
    if name == "character":  # a model and dataset of the user's: the config types, its files are not checked here
        assert cfg.dataset.validation_split > 0
    else:
        typed = run_config(cfg)
        assert typed.trial == 0 and typed.dataset.validation_split > 0
