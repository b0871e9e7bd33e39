"""`atelier dataset ...`: dataset tools (today: `check`)."""

from __future__ import annotations

import argparse
import sys

from atelier.config.schema import DatasetConfig
from atelier.data.buckets import BucketSettings
from atelier.data.check import CheckOptions, check_dataset, render, seconds_per_step_from_run

CHECK_EPILOG = """\
example:
  atelier dataset check data/train --caption-extension .txt --resolution 512 \\
      --batch-size 2 --epochs 10 --enable-bucket --seconds-per-step 1.5

exit status: 1 when a problem would stop training (corrupt image, no images, an
image folder given instead of its parent), 0 otherwise (warnings only), 2 for bad
arguments.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    dataset = subparsers.add_parser("dataset", help="inspect a training dataset", description="Dataset tools.")
    actions = dataset.add_subparsers(dest="dataset_command", metavar="ACTION")
    dataset.set_defaults(func=lambda args: _print_help(dataset))
    check = actions.add_parser(
        "check",
        help="report images, captions, steps, buckets, tags and every problem, without training",
        description="Check a kohya-layout dataset (train_data_dir/N_concept/images) without training: "
        "no model is loaded.",
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_check_arguments(check)
    check.set_defaults(func=run_check)


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    # The flags are the training config's dataset.* keys, with the same defaults.
    d = DatasetConfig
    add = parser.add_argument
    add("train_data_dir", help="folder holding the `N_<concept>` subfolders")
    add("--caption-extension", metavar="EXT", default=d.caption_extension,
        help=f"dataset.caption_extension (default: {d.caption_extension})")  # fmt: skip
    add("--resolution", metavar="RES", default=str(d.resolution),
        help=f"dataset.resolution: 512 or W,H (default: {d.resolution})")  # fmt: skip
    add("--batch-size", metavar="N", type=_positive_int, default=1, help="train batch size (default: 1)")
    add("--epochs", metavar="N", type=_positive_int, default=10, help="epochs in the total (default: 10)")
    add("--gradient-accumulation-steps", metavar="N", type=_positive_int, default=1,
        help="one optimizer step every N batches (default: 1)")  # fmt: skip
    add("--enable-bucket", action=argparse.BooleanOptionalAction, default=d.enable_bucket,
        help="dataset.enable_bucket: aspect-ratio bucketing (default: off, as in sd-scripts)")  # fmt: skip
    add("--min-bucket-reso", metavar="PX", type=_positive_int, default=d.min_bucket_reso,
        help=f"dataset.min_bucket_reso: smallest bucket side (default: {d.min_bucket_reso})")  # fmt: skip
    add("--max-bucket-reso", metavar="PX", type=_positive_int, default=d.max_bucket_reso,
        help=f"dataset.max_bucket_reso: largest bucket side (default: {d.max_bucket_reso})")  # fmt: skip
    add("--bucket-reso-steps", metavar="PX", type=_positive_int, default=d.bucket_reso_steps,
        help=f"dataset.bucket_reso_steps: bucket sides are multiples of this (default: {d.bucket_reso_steps})")  # fmt: skip
    add("--bucket-no-upscale", action="store_true", default=d.bucket_no_upscale,
        help="dataset.bucket_no_upscale: buckets fit small images instead of upscaling them")  # fmt: skip
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--seconds-per-step", metavar="SECONDS", type=_positive_float,
                        help="estimate the training time at this speed")  # fmt: skip
    timing.add_argument("--from-run", metavar="RUN_DIR", help="take seconds_per_step from a run's summary.json")


def run_check(args: argparse.Namespace) -> int:
    try:
        options = _check_options(args)
    except ValueError as exc:
        print(f"atelier dataset check: error: {exc}", file=sys.stderr)
        return 2
    report = check_dataset(args.train_data_dir, args.caption_extension, options)
    print(render(report))
    return report.exit_code


def _check_options(args: argparse.Namespace) -> CheckOptions:
    seconds = seconds_per_step_from_run(args.from_run) if args.from_run else args.seconds_per_step
    return CheckOptions(BucketSettings.from_options(args), args.batch_size, args.epochs, args.gradient_accumulation_steps, seconds)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
