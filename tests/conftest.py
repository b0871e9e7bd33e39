"""Shared fixtures: offline hub, a per-session model cache, the tiny base model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# No hub is reachable: make every library fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (README's `-n 2`) each worker, and every run it starts, computes on one
# thread: torch processes that each spin a thread per core slow each other down many times
# over. Set before any test module imports torch, which reads them once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


SESSION_CACHE: list[Path] = []  # set by pytest_configure


def pytest_configure(config: pytest.Config) -> None:
    """A cache dir shared by every test and every subprocess they start, set before the test
    modules are imported: an environment a module copies at import (`{**os.environ, ...}` for
    its subprocesses) has it too, so no test reads or builds models in the user's own cache."""
    cache = os.environ.get("ATELIER_TEST_CACHE")
    if cache is None:
        cache = tempfile.mkdtemp(prefix="atelier-test-cache-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    SESSION_CACHE[:] = [Path(cache)]
    os.environ["ATELIER_CACHE"] = cache


@pytest.fixture(scope="session", autouse=True)
def atelier_cache() -> Path:
    """The session's cache dir; set again here for tests that changed the variable before."""
    os.environ["ATELIER_CACHE"] = str(SESSION_CACHE[0])
    return SESSION_CACHE[0]


@pytest.fixture(scope="session")
def tiny_model_path(atelier_cache: Path) -> Path:
    """The embedded tiny SD1.5-shaped model as a diffusers folder (built once)."""
    from atelier.models.tiny import ensure_tiny_model

    return ensure_tiny_model(atelier_cache)


@pytest.fixture(scope="session")
def demo_dataset_dir() -> Path:
    return REPO_ROOT / "atelier" / "assets" / "demo_dataset"
