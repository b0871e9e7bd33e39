"""Keep diffusers from importing peft and bitsandbytes, which training never uses.

diffusers imports both whenever they are installed: bitsandbytes from its quantizers
(every model class pulls them in, and bitsandbytes imports torch's inductor) and peft
from its LoRA loaders. That is ~0.7 s of every training process on a 2-core CPU, a
sizeable share of a short sweep. Our networks patch the layers themselves
(atelier.network) and nothing here loads a bitsandbytes-quantized model, so diffusers is
told both are missing: a setup it supports, as both are optional dependencies of it.
What does need them imports them itself when chosen: the 8-bit optimizers import
bitsandbytes (atelier.optim.optimizers), LyCORIS' modules import peft.
"""

from __future__ import annotations

import sys

# diffusers modules that read the flags when they are imported (model classes, LoRA loaders).
_READERS = ("diffusers.models.modeling_utils", "diffusers.loaders.lora_base", "diffusers.quantizers")


def hide_peft_and_bitsandbytes_from_diffusers() -> bool:
    """Call before any diffusers model is imported; True if diffusers now runs without them.

    Once a model class is imported, diffusers has imported both already and holds
    references to them: nothing is changed then (False), rather than leave it half-switched.
    """
    if any(name in sys.modules for name in _READERS):
        return False
    import diffusers.utils
    from diffusers.utils import constants, import_utils

    import_utils._peft_available = False
    import_utils._bitsandbytes_available = False
    # Computed from the peft check when diffusers.utils was imported; read by models and
    # pipelines (scale LoRA layers through peft on every forward) and by later imports.
    constants.USE_PEFT_BACKEND = False
    diffusers.utils.USE_PEFT_BACKEND = False
    return True
