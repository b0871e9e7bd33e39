"""The `atelier` command: tools around training runs.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds
a parser whose `func(args) -> int` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from atelier.errors import user_errors_as_one_line

# module path of each subcommand group, in --help order
SUBCOMMAND_MODULES: list[str] = [
    "atelier.report.cli",
    "atelier.data.cli",
    "atelier.tools.cli",
    "atelier.config.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="Kohya-Atelier tools. Training itself is `python train.py` (see README.md).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with user_errors_as_one_line(exit_code=2):
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
