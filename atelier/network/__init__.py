"""The adapters a run trains: which network kinds exist (kinds.py, the one table of kinds), which base
layers they adapt and under which kohya names (targets.py, sdxl_names.py), the modules themselves
(lora.py, dylora.py, lycoris_modules.py; patch.py wraps a base layer), the `network` config read
once (spec.py) and the network built from it or from a file (factory.py)."""
