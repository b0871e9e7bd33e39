"""OmegaConf resolvers used by conf/.

They live in an importable module (not train.py's __main__) so that jobs started
by a launcher in another process resolve configs the same way.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in atelier/assets/."""
    return str(ASSETS_DIR / name)


def basename(path: str) -> str:
    """Last component of a path, ignoring a trailing slash."""
    return Path(str(path).rstrip("/\\")).name


def fallback(value: object, default: object) -> object:
    """`value` unless it is null or empty."""
    return default if value in (None, "") else value


def multiply(a: float, b: float) -> float:
    return float(a) * float(b)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("asset", asset_path, replace=True)
    OmegaConf.register_new_resolver("basename", basename, replace=True)
    OmegaConf.register_new_resolver("fallback", fallback, replace=True)
    OmegaConf.register_new_resolver("mul", multiply, replace=True)
