"""`atelier dataset ...`: dataset tools (today: `check`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

from atelier.config.load import training_config
from atelier.config.typed import run_config
from atelier.data.buckets import BucketSettings
from atelier.data.check import CheckOptions, check_dataset, check_subsets, render, seconds_per_step_from_run
from atelier.data.options import image_limits

CHECK_EPILOG = """\
It reads train.py's config, so its steps are the run's: give the same overrides as to
train.py (model=..., dataset.*, training.*, debug=smoke, experiment=...), or a run's
folder with --config. Flags such as --batch-size override the config.

example:
  atelier dataset check                                   # the demo dataset, as `python train.py` trains it
  atelier dataset check data/train model=sd15 model.path=/models/sd15.safetensors \\
      dataset=folder training.train_batch_size=4 dataset.enable_bucket=true
  atelier dataset check --config outputs/demo/runs/2025-01-01_12-00-00   # a run's own options
  atelier dataset check data/train --resolution 512 --batch-size 2 --epochs 10 --seconds-per-step 1.5

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
    # Every option defaults to the training config's value (None here: "the config's").
    add = parser.add_argument
    add("train_data_dir", nargs="?", help="folder holding the `N_<concept>` subfolders (default: the config's "
        "dataset.train_data_dir)")  # fmt: skip
    add("overrides", nargs="*", metavar="KEY=VALUE",
        help="train.py's overrides (model=sd15, dataset.enable_bucket=true, training.train_batch_size=4, ...)")  # fmt: skip
    add("--config", metavar="RUN", help="a run folder (or its config.yaml): check with that run's options")
    add("--caption-extension", metavar="EXT", help="dataset.caption_extension")
    add("--resolution", metavar="RES", help="dataset.resolution: 512 or W,H")
    add("--batch-size", metavar="N", type=_positive_int, help="training.train_batch_size")
    add("--epochs", metavar="N", type=_positive_int, help="training.max_train_epochs (ignores max_train_steps)")
    add("--gradient-accumulation-steps", metavar="N", type=_positive_int,
        help="training.gradient_accumulation_steps")  # fmt: skip
    add("--enable-bucket", action=argparse.BooleanOptionalAction, default=None,
        help="dataset.enable_bucket: aspect-ratio bucketing")  # fmt: skip
    add("--min-bucket-reso", metavar="PX", type=_positive_int, help="dataset.min_bucket_reso: smallest bucket side")
    add("--max-bucket-reso", metavar="PX", type=_positive_int, help="dataset.max_bucket_reso: largest bucket side")
    add("--bucket-reso-steps", metavar="PX", type=_positive_int,
        help="dataset.bucket_reso_steps: bucket sides are multiples of this")  # fmt: skip
    add("--bucket-no-upscale", action="store_true", default=None,
        help="dataset.bucket_no_upscale: buckets fit small images instead of upscaling them")  # fmt: skip
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--seconds-per-step", metavar="SECONDS", type=_positive_float,
                        help="estimate the training time at this speed")  # fmt: skip
    timing.add_argument("--from-run", metavar="RUN_DIR", help="take seconds_per_step from a run's summary.json")


def run_check(args: argparse.Namespace) -> int:
    try:
        data_dir, caption_extension, options = _check_options(args)
    except ValueError as exc:
        print(f"atelier dataset check: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(data_dir, list):
        report = check_subsets(data_dir, options)
    else:
        report = check_dataset(data_dir, caption_extension, options)
    print(render(report))
    return report.exit_code


def _check_options(args: argparse.Namespace) -> tuple[str | list[tuple[str, int, str, str]], str, CheckOptions]:
    """(dataset folder, or dataset.subsets' training folders; caption extension; options) from the
    training config and the flags."""
    from omegaconf.errors import MissingMandatoryValue

    overrides = list(args.overrides)
    data_dir = args.train_data_dir
    if data_dir is not None and "=" in data_dir and not Path(data_dir).exists():
        overrides.insert(0, data_dir)  # an override, not a folder: the folder comes from the config
        data_dir = None
    cfg = training_config(overrides, args.config)
    try:
        if data_dir is not None:  # a folder given replaces the config's subsets too
            cfg.dataset.subsets = []
        elif not cfg.dataset.subsets:
            data_dir = str(cfg.dataset.train_data_dir)
    except MissingMandatoryValue as err:
        raise ValueError(f"no dataset folder ({err.full_key} is not set): give it first (atelier dataset check "
                         "data/train) or as dataset.train_data_dir=...") from None  # fmt: skip
    if data_dir is not None:
        cfg.dataset.train_data_dir = data_dir
    typed = run_config(cfg)  # the run's checks, and its values as the trainer reads them
    d, t = typed.dataset, typed.training

    def flag(name: str, config_value: object) -> object:
        value = getattr(args, name)
        return config_value if value is None else value

    buckets = BucketSettings.from_options(SimpleNamespace(
        resolution=flag("resolution", d.resolution),
        enable_bucket=flag("enable_bucket", d.enable_bucket),
        min_bucket_reso=flag("min_bucket_reso", d.min_bucket_reso),
        max_bucket_reso=flag("max_bucket_reso", d.max_bucket_reso),
        bucket_reso_steps=flag("bucket_reso_steps", d.bucket_reso_steps),
        bucket_no_upscale=flag("bucket_no_upscale", d.bucket_no_upscale),
    ))  # fmt: skip
    seconds = seconds_per_step_from_run(args.from_run) if args.from_run else args.seconds_per_step
    options = CheckOptions(
        buckets,
        batch_size=flag("batch_size", t.train_batch_size),
        epochs=flag("epochs", t.max_train_epochs),
        gradient_accumulation_steps=flag("gradient_accumulation_steps", t.gradient_accumulation_steps),
        seconds_per_step=seconds,
        max_train_steps=None if args.epochs is not None else t.max_train_steps,
        processes=t.num_processes,
        validation_split=d.validation_split,
        validation_seed=d.validation_seed if d.validation_seed is not None else t.seed,
        image_limits=image_limits(d),
        max_samples_per_epoch=d.max_samples_per_epoch,
        conditioning_data_dir=d.conditioning_data_dir,
    )
    source: str | list[tuple[str, int, str, str]] = data_dir or [
        (s.image_dir, s.num_repeats, s.class_tokens or "", flag("caption_extension", s.caption_extension
                                                                 or d.caption_extension))
        for s in d.subsets if not s.is_reg
    ]  # fmt: skip
    return source, flag("caption_extension", d.caption_extension), options


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
