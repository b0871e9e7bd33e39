"""Files shipped with the package; the demo dataset is drawn by scripts/make_demo_dataset.py."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEMO_DATASET_DIR = ASSETS_DIR / "demo_dataset"
