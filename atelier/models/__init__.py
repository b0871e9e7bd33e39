"""The base-model layer: where a model comes from and what a file is (sources.py), pickle
safety (pickles.py), loading it (loading.py; errors: load_errors.py), the architectures and
the built-in tiny models (architectures.py, tiny.py, tiny_variants.py), the full-size random
models of the benchmarks (random_builtins.py), hashes, LDM <->
diffusers key conversion (ldm_convert.py) and config-only skeletons (skeleton.py).

Importing this package is cheap (no torch / diffusers); they are imported when a
model is actually built or loaded. `ldm_convert` imports torch, import it directly.
"""

from .load_errors import ModelLoadError
from .loading import BaseModel, load_base_model
from .tiny import ensure_tiny_model

__all__ = ["BaseModel", "ModelLoadError", "ensure_tiny_model", "load_base_model"]
