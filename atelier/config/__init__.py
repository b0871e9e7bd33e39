"""Config composition: the typed schema (schema/, one dataclass per group, each rule beside its
field), the one typed boundary (typed.py), loading and checking the YAML tree in conf/
(load.py, validate.py, resolvers.py), `atelier options` (options.py, cli.py), and what the
config's choices and rules are made of: the network kinds (network_kinds.py) read once per run
(network_spec.py), the sampler names (samplers.py) and the sample-prompt syntax
(sample_prompts.py)."""


def register() -> None:
    """Make schemas and resolvers known to Hydra/OmegaConf (idempotent).

    Imported here, not at the top: importing atelier.config.network_kinds (to add a kind
    before the config exists) must not build the schema's enum of kinds first."""
    from atelier.config.resolvers import register_resolvers
    from atelier.config.schema import register_schemas

    register_schemas()
    register_resolvers()
