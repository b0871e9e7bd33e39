"""The adapters a run trains (the kinds are atelier.config.network_kinds'): which base layers
they adapt and under which kohya names (targets.py; a family's own names: atelier.families),
the modules themselves and their builders (lora.py, dylora.py, lycoris_modules.py; patch.py wraps a base layer), the kohya
LoRA file (lora_file.py), and the network built from the config or from a file (factory.py).
FLUX.1's kohya LoRA on diffusers' transformer: its names (flux_names.py) and network (flux_lora.py)."""
