"""Tools users run after training: resize, merge, check, info, export-kohya, skeleton,
convert-ckpt (the `atelier` subcommands; see atelier/tools/cli.py)."""
