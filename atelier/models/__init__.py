"""The base-model layer: architectures, the built-in tiny model, loading and conversion.

Importing this package is cheap (no torch / diffusers); they are imported when a
model is actually built or loaded. `ldm_convert` imports torch, import it directly.
"""

from .loading import BaseModel, ModelLoadError, load_base_model
from .tiny import ensure_tiny_model

__all__ = ["BaseModel", "ModelLoadError", "ensure_tiny_model", "load_base_model"]
