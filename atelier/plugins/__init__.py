"""Model families as plug-ins (atelier.plugins.plugin.FamilyPlugin): the trainer, the sampler,
the outputs and the tools ask `plugin_of(model.version)` for what differs between families.
Registered here, in model.version's order (the facts' registry: atelier.families.FAMILIES)."""

from __future__ import annotations

from typing import Any

from atelier.families import SD1, SD2, SDXL, family_of
from atelier.plugins.flux import FluxPlugin
from atelier.plugins.plugin import EncoderFactory, FamilyPlugin
from atelier.plugins.sd import StableDiffusionPlugin

PLUGINS: dict[str, FamilyPlugin] = {
    plugin.facts.version: plugin
    for plugin in (StableDiffusionPlugin(SD1), StableDiffusionPlugin(SD2), StableDiffusionPlugin(SDXL), FluxPlugin())
}


def plugin_of(version: Any) -> FamilyPlugin:
    """The plug-in of a model.version value (a ModelVersion or its text)."""
    return PLUGINS[family_of(version).version]


__all__ = ["PLUGINS", "EncoderFactory", "FamilyPlugin", "FluxPlugin", "StableDiffusionPlugin", "plugin_of"]
