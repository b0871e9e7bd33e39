"""Config composition: typed schemas and resolvers for the YAML tree in conf/."""

from atelier.config.resolvers import register_resolvers
from atelier.config.schema import register_schemas


def register() -> None:
    """Make schemas and resolvers known to Hydra/OmegaConf (idempotent)."""
    register_schemas()
    register_resolvers()
