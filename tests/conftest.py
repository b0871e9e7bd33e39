"""Shared fixtures: offline hub, a per-session model cache, the tiny base model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# No hub is reachable: make every library fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def atelier_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir shared by every test (and every subprocess they start)."""
    cache = Path(os.environ.get("ATELIER_TEST_CACHE") or tmp_path_factory.mktemp("atelier-cache"))
    os.environ["ATELIER_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_path(atelier_cache: Path) -> Path:
    """The embedded tiny SD1.5-shaped model as a diffusers folder (built once)."""
    from atelier.models.tiny import ensure_tiny_model

    return ensure_tiny_model(atelier_cache)


@pytest.fixture(scope="session")
def demo_dataset_dir() -> Path:
    return REPO_ROOT / "atelier" / "assets" / "demo_dataset"
