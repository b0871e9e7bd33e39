"""Model families as plug-ins (atelier.families.family): every version-dependent fact is asked
of `family_of(model.version)`. Registered here, in model.version's order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from atelier.families.family import BaseVersion, BlockLayout, ModelFamily
from atelier.families.flux import FLUX1
from atelier.families.sd import SD1, SD2, SDXL

FAMILIES: dict[str, ModelFamily] = {family.version: family for family in (SD1, SD2, SDXL, FLUX1)}

__all__ = ["FAMILIES", "FLUX1", "SD1", "SD2", "SDXL", "BaseVersion", "BlockLayout", "ModelFamily", "family_of", "family_of_script", "known_scripts",
           "second_text_encoders", "unet_blocks", "unet_family"]


def family_of(version: Any) -> ModelFamily:
    """The family of a model.version value (a ModelVersion or its text)."""
    key = getattr(version, "value", version)
    if key not in FAMILIES:
        raise ValueError(f"model.version={key!r} is not a known model family; use one of: {', '.join(FAMILIES)}")
    return FAMILIES[key]


def family_of_script(script: str, v2: bool = False) -> ModelFamily:
    """The family an sd-scripts run trains: its script, and --v2 for train_network.py."""
    fits = [family for family in FAMILIES.values() if family.kohya_script == script]
    if len(fits) > 1:  # train_network.py trains SD1 and SD2, --v2 telling them apart
        fits = [family for family in fits if family.kohya_v2 == v2]
    if not fits:
        raise ValueError(f"{script} trains no model family Atelier knows")
    return fits[0]


def known_scripts() -> list[str]:
    """sd-scripts' LoRA scripts of the families, in order, each once."""
    return list(dict.fromkeys(family.kohya_script for family in FAMILIES.values()))


def unet_family(config: Mapping[str, Any]) -> ModelFamily | None:
    """The family a UNet's diffusers config shows: its marks, then its text width; None when the
    marks fit several families and the width none (a tiny test model: it may stand for any)."""
    fits = [family for family in FAMILIES.values() if family.is_unet_of(config)]
    if len(fits) == 1:
        return fits[0]
    by_width = [family for family in fits if family.cross_attention_dim == config.get("cross_attention_dim")]
    return by_width[0] if len(by_width) == 1 else None


def second_text_encoders() -> str:
    """The families with a second trainable text encoder, as messages list them: "SDXL"."""
    return " and ".join(family.label for family in FAMILIES.values() if family.lora_text_encoders > 1)


def unet_blocks(unet: Any) -> BlockLayout:
    """The block layout of a UNet, from its marks: the families they fit share one (SD1 and SD2)."""
    layouts = {family.blocks for family in FAMILIES.values()
               if family.blocks is not None and family.is_unet_of(getattr(unet, "config", {}))}
    if len(layouts) != 1:
        raise ValueError(f"{type(unet).__name__}: not a UNet of one family's block layout ({len(layouts)} fit)")
    return layouts.pop()
