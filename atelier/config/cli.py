"""`atelier options [group]`: every config option with its type, default, doc and sd-scripts name."""

from __future__ import annotations

import argparse
from pathlib import Path

from atelier.config.options import (
    README_BEGIN,
    README_END,
    all_options,
    groups,
    render_markdown,
    render_text,
    with_readme_table,
)
from atelier.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "options",
        help="list every config option: type, default, what it does, its sd-scripts flag and ss_* key",
        description="Every option of train.py's config, read from the typed schema (atelier/config/schema/). "
        "Set one with KEY=VALUE on the train.py command line.",
    )
    parser.add_argument("group", nargs="?", help=f"one group: {', '.join(groups())} (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the README's option table (markdown)")
    parser.add_argument(
        "--readme", metavar="PATH", type=Path,
        help=f"rewrite the option table between {README_BEGIN} and {README_END} in this file",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        options = all_options(args.group)
        if args.readme:
            if args.group:
                raise ValueError("--readme writes the table of every group; give no group")
            readme = args.readme.read_text(encoding="utf-8")
            args.readme.write_text(with_readme_table(readme, render_markdown(options)), encoding="utf-8")
            print(f"updated the option table in {args.readme}")
            return 0
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from None
    print(render_markdown(options) if args.markdown else render_text(options), end="")
    return 0
