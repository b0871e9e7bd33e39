"""`atelier dataset check`: what training would see in a dataset, without training.

atelier.data.inspection walks the folder and collects every problem; this module adds
what the training config makes of it (buckets, steps per epoch, total steps, tags)
and renders the report.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atelier.config.schema import TrainingConfig
from atelier.data.buckets import (
    BucketAssignment,
    BucketManager,
    BucketSettings,
    bucket_steps_per_epoch,
    single_bucket_warning,
)
from atelier.data.captions import split_tags
from atelier.data.dataset import ImageItem, too_many_samples_message
from atelier.data.images import ImageLimits
from atelier.data.inspection import (
    ERROR,
    WARNING,
    CheckedFolder,
    CheckedImage,
    DatasetInspection,
    Problem,
    inspect_dataset,
    inspect_subsets,
)
from atelier.data.plan import plan_for

TOP_TAGS = 20  # tags listed in the report


@dataclass(frozen=True)
class CheckOptions:
    """What decides a run's steps; `atelier dataset check` takes them from the training config."""

    buckets: BucketSettings
    batch_size: int = 1
    epochs: int = 10
    gradient_accumulation_steps: int = 1
    seconds_per_step: float | None = None
    max_train_steps: int | None = None  # fixes the run's length when set, as in training
    processes: int = 1  # training.num_processes: each trains its share of the batches
    validation_split: float = 0.0  # held-out images are not trained on
    validation_seed: int = 0
    image_limits: ImageLimits = field(default_factory=ImageLimits)  # dataset.max_image_pixels/_aspect_ratio
    max_samples_per_epoch: int = 10_000_000  # dataset.max_samples_per_epoch
    conditioning_data_dir: str | None = None  # dataset.conditioning_data_dir: every image needs its mask


@dataclass
class CheckReport:
    inspection: DatasetInspection
    options: CheckOptions
    images: list[tuple[CheckedFolder, CheckedImage]]
    assignments: list[BucketAssignment]
    bucket_info: dict
    steps_per_epoch: int
    total_steps: int
    epochs: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.inspection.has_errors else 0


def analyse(inspection: DatasetInspection, options: CheckOptions) -> CheckReport:
    """Buckets, steps and upscale warnings for the readable images."""
    too_many = too_many_samples_message(
        [(folder.path, folder.repeats, len(folder.readable)) for folder in inspection.folders],
        options.max_samples_per_epoch,
    )
    if too_many:  # training refuses it; the steps below are counted, never expanded
        inspection.add(ERROR, inspection.root, too_many)
    images = [(folder, image) for folder in inspection.folders for image in folder.readable]
    items = [ImageItem(image.path, image.caption, folder.path.name, folder.repeats) for folder, image in images]
    if options.conditioning_data_dir:
        _check_masks(inspection, items, options.conditioning_data_dir)
    if options.validation_split > 0 and items:
        # Imported here: it brings torch, which a check without validation does not need.
        from atelier.data.holdout import split_validation

        trained = {item.path for item in split_validation(items, options.validation_split, options.validation_seed)[0]}
        images = [(folder, image) for folder, image in images if image.path in trained]
        items = [item for item in items if item.path in trained]
    manager = BucketManager(options.buckets)
    warning = single_bucket_warning(options.buckets)
    if warning:
        inspection.add(WARNING, inspection.root, warning)
    sizes = [image.size for _, image in images]
    assignments = manager.assign(items, sizes)
    for (_, image), assignment in zip(images, assignments):
        if assignment.upscaled:
            inspection.add(WARNING, image.path, _upscale_message(assignment))
    per_epoch = bucket_steps_per_epoch(assignments, options.batch_size)
    total, epochs = _total_steps(options, sum(a.repeats for a in assignments), per_epoch)
    return CheckReport(inspection, options, images, assignments, manager.info(assignments), per_epoch, total, epochs)


def _check_masks(inspection: DatasetInspection, items: list[ImageItem], conditioning_dir: str) -> None:
    """Each image's loss mask (training refuses the run without one), reported per image."""
    from atelier.data.masks import match_masks  # brings torch, which other checks do not need
    from atelier.errors import DatasetError

    try:
        problems = match_masks(items, conditioning_dir)[1]
    except DatasetError as err:
        inspection.add(ERROR, inspection.root, str(err))
        return
    for path, _, text in problems:
        inspection.add(ERROR, path, f"{text} (dataset.conditioning_data_dir)")


def _total_steps(options: CheckOptions, num_samples: int, per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, epochs) of the run, by the trainer's own plan ((0, 0) with nothing to train)."""
    if per_epoch < 1:
        return 0, 0
    training = TrainingConfig(  # the run's own rules check the flags (ConfigError naming the key)
        train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        max_train_epochs=options.epochs,
        max_train_steps=options.max_train_steps,
    )
    plan = plan_for(training, num_samples, per_epoch, options.processes)
    return plan.total_steps, plan.num_epochs


def _upscale_message(assignment: BucketAssignment) -> str:
    (w, h), (bw, bh) = assignment.image_size, assignment.bucket
    scale = max(bw / w, bh / h)
    return f"{w}x{h} is smaller than its {bw}x{bh} bucket and is upscaled x{scale:.2f} (blurry training data)"


def render(report: CheckReport) -> str:
    inspection = report.inspection
    lines = [f"Dataset check: {inspection.root}", "  " + _settings_line(inspection, report.options), ""]
    if inspection.folders:
        lines += _folder_section(inspection.folders)
        lines += _steps_section(report)
        lines += _bucket_section(report)
        lines += _tag_section(report)
    lines += _problem_section(inspection)
    return "\n".join(lines)


def _settings_line(inspection: DatasetInspection, options: CheckOptions) -> str:
    b = options.buckets
    bucketing = "bucketing off"
    if b.enable_bucket:
        no_upscale = ", no upscale" if b.bucket_no_upscale else ""
        bucketing = f"bucketing on ({b.min_bucket_reso}-{b.max_bucket_reso}, step {b.bucket_reso_steps}{no_upscale})"
    return (
        f"caption extension {inspection.caption_extension} | resolution {b.resolution[0]}x{b.resolution[1]} | "
        f"batch size {options.batch_size} | "
        + (f"{options.max_train_steps} steps" if options.max_train_steps is not None else f"{options.epochs} epochs")
        + (f" | validation_split {options.validation_split}" if options.validation_split else "")
        + f" | {bucketing}"
    )


def _folder_section(folders: list[CheckedFolder]) -> list[str]:
    rows: list[list[object]] = []
    for folder in folders:
        samples = len(folder.readable) * folder.repeats
        rows.append([folder.path.name, folder.repeats, len(folder.images), folder.captions_found, samples])
    totals = [sum(row[i] for row in rows) for i in (2, 3, 4)]
    rows.append(["total", "", *totals])
    headers = ["folder", "repeats", "images", "captions", "images x repeats"]
    return ["Concept folders:", *_table(headers, rows), ""]


def _steps_section(report: CheckReport) -> list[str]:
    options = report.options
    buckets = len(report.bucket_info["buckets"])
    accumulation = options.gradient_accumulation_steps
    lines = [
        "Steps:",
        f"  steps per epoch: {report.steps_per_epoch}  (batch size {options.batch_size}; "
        f"sum over {buckets} bucket(s) of ceil(images x repeats / batch size))",
        f"  total steps: {report.total_steps}  ({report.epochs} epochs"
        + (f", max_train_steps {options.max_train_steps}" if options.max_train_steps is not None else "")
        + (f", gradient accumulation {accumulation})" if accumulation > 1 else ")"),
    ]
    if options.seconds_per_step is not None:
        seconds = report.total_steps * options.seconds_per_step
        lines.append(
            f"  estimated training time: {format_duration(seconds)}  "
            f"({report.total_steps} steps x {options.seconds_per_step:.2f} s/step, without sampling and saving)"
        )
    return [*lines, ""]


def _bucket_section(report: CheckReport) -> list[str]:
    images_per_bucket = Counter(assignment.bucket for assignment in report.assignments)
    rows = []
    for number, bucket in report.bucket_info["buckets"].items():
        width, height = bucket["resolution"]
        rows.append([number, f"{width}x{height}", images_per_bucket[(width, height)], bucket["count"]])
    return [
        "Buckets:",
        *_table(["bucket", "resolution", "images", "images x repeats"], rows),
        f"  mean aspect-ratio error: {report.bucket_info['mean_img_ar_error']:.4f}",
        "",
    ]


def _tag_section(report: CheckReport) -> list[str]:
    counts = Counter(tag for _, image in report.images for tag in split_tags(image.caption))
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAGS]
    if not top:
        return ["Top tags: none (every caption is empty)", ""]
    return [f"Top tags ({len(top)} of {len(counts)}, counted once per image):", *_table(["tag", "count"], top), ""]


def _problem_section(inspection: DatasetInspection) -> list[str]:
    errors, warnings = inspection.count(ERROR), inspection.count(WARNING)
    # Errors first, then by file so each file's problems stand together.
    ordered = sorted(inspection.problems, key=lambda problem: (problem.severity != ERROR, problem.where))
    lines = [f"Problems: {errors} error(s), {warnings} warning(s)"] if ordered else ["Problems: none"]
    lines += ["  " + problem.line() for problem in ordered]
    if errors:
        lines.append("Result: training would stop; fix the errors above.")
    else:
        lines.append("Result: OK" + (", see the warnings above." if warnings else "."))
    return lines


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Rows under headers, text left-aligned and numbers right-aligned, indented by two."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] == "" for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def format_duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def seconds_per_step_from_run(run_dir: Path) -> float:
    """seconds_per_step from a finished run's summary.json; ValueError when it has none."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; pass the folder of a run that has finished") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    value = summary.get("seconds_per_step") if isinstance(summary, dict) else None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{path} has no seconds_per_step (did the run train any step?)")
    return float(value)


def check_dataset(train_data_dir: str | Path, caption_extension: str, options: CheckOptions) -> CheckReport:
    inspection = inspect_dataset(train_data_dir, caption_extension, options.image_limits)
    return analyse(inspection, options)


def check_subsets(subsets: list[tuple[str | Path, int, str, str]], options: CheckOptions) -> CheckReport:
    """The report of dataset.subsets' training folders: (image_dir, num_repeats, class_tokens, caption_extension)."""
    return analyse(inspect_subsets(subsets, options.image_limits), options)


__all__ = [
    "CheckOptions",
    "CheckReport",
    "CheckedFolder",
    "CheckedImage",
    "DatasetInspection",
    "Problem",
    "analyse",
    "check_dataset",
    "check_subsets",
    "format_duration",
    "inspect_dataset",
    "render",
    "seconds_per_step_from_run",
]
