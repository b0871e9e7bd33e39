"""train.py's config outside a training run: for tools that must agree with the run.

`atelier dataset check` reads its resolution, buckets, batch size and length from here,
so the steps it prints are the steps the same overrides (or a finished run) train.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# conf/ beside train.py, the tree train.py composes.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RUN_CONFIG = "config.yaml"  # written into every run folder (atelier.outputs.run_dir)


def training_config(overrides: Sequence[str] = (), run_config: str | Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would train with, or a run's config.yaml with
    `key.subkey=value` overrides applied. ValueError names what is wrong."""
    import atelier.config

    atelier.config.register()  # resolvers: ${asset:...}, ${basename:...}
    if run_config is not None:
        return _run_config(Path(run_config), overrides)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ValueError(f"bad override ({' '.join(overrides)}): {error}") from None


def _run_config(path: Path, overrides: Sequence[str]) -> DictConfig:
    if path.is_dir():
        path = path / RUN_CONFIG
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a run folder (it holds {RUN_CONFIG}) or a config.yaml")
    groups = [item for item in overrides if "." not in item.split("=", 1)[0].lstrip("+~")]
    if groups:
        raise ValueError(
            f"{' '.join(groups)}: a run's config has its groups chosen already; with --config give "
            "key.subkey=value overrides only (e.g. training.train_batch_size=4)"
        )
    try:
        cfg = OmegaConf.load(path)
        cfg.merge_with_dotlist(list(overrides))
    except (OmegaConfBaseException, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: not a config (expected a mapping of keys)")
    return cfg
