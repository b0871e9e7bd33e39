"""output: the LoRA files and the training state a run saves."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import SI

from atelier.config.schema.checks import check_name
from atelier.config.schema.enums import SavePrecision
from atelier.config.schema.fields import option
from atelier.errors import ConfigError


# sd-scripts' other --save_model_as choices, and why a LoRA is not saved so here.
_NOT_SAVED_AS = {
    "ckpt": "a pickle, which can run code when it is loaded",
    "pt": "a pickle, which can run code when it is loaded",
    "diffusers": "a whole-model folder (sd-scripts' fine-tuning scripts), not a LoRA",
    "diffusers_safetensors": "a whole-model folder (sd-scripts' fine-tuning scripts), not a LoRA",
}


@dataclass
class OutputConfig:
    output_name: str = option(
        SI("${project}"), flag="output_name", ss="ss_output_name",
        doc="The LoRA file's name (<output_name>.safetensors, -<epoch> for intermediate ones); a name, not a path.",
    )
    save_every_n_epochs: Optional[int] = option(5, flag="save_every_n_epochs",
                                                doc="An intermediate LoRA every n epochs (null: only the final one).")
    save_n_epoch_ratio: Optional[int] = option(
        None, flag="save_n_epoch_ratio",
        doc="Save about n epoch checkpoints over the run: one every floor(epochs / n) epochs (at least every "
        "epoch), in place of save_every_n_epochs (null: save_every_n_epochs decides).",
    )
    save_every_n_steps: Optional[int] = option(
        None, flag="save_every_n_steps",
        doc="Also an intermediate LoRA every n steps, <output_name>-step<8 digits> (null: not by step).",
    )
    save_last_n_epochs: Optional[int] = option(
        None, flag="save_last_n_epochs",
        doc="Keep only the last n epoch checkpoints: older ones are deleted as new ones are saved (null: all). "
        "The final LoRA is never deleted.",
    )
    save_last_n_steps: Optional[int] = option(
        None, flag="save_last_n_steps",
        doc="Keep only the step checkpoints of the last n steps: older ones are deleted as new ones are saved "
        "(null: all). The final LoRA is never deleted.",
    )
    save_precision: SavePrecision = option(SavePrecision.float, flag="save_precision",
                                           doc="The dtype of the saved LoRA's tensors.")
    save_model_as: str = option(
        "safetensors", flag="save_model_as",
        doc="The LoRA file's format: safetensors (the one every loader reads without running code).",
        kohya="sd-scripts also writes ckpt/pt (pickles, which can run code when loaded); here they are refused",
    )
    save_state: bool = option(
        True, doc="Keep the training state (weights, optimizer, scheduler, RNGs, data position) in "
        "training_state.pt, so a job started again in the same run dir continues from it. Saved every n epochs / "
        "n steps and when the job gets SIGTERM, SIGUSR1 or SIGUSR2; deleted when the run finishes.",
        kohya="sd-scripts' --save_state keeps every saved state for --resume; here the last epoch's state is "
        "kept while a run is unfinished",
    )
    save_state_every_n_epochs: Optional[int] = option(
        1, doc="Save the training state every n epochs (null: not by epoch).",
        kohya="sd-scripts saves states with each --save_every_n_epochs checkpoint (with --save_state)",
    )
    save_state_every_n_steps: Optional[int] = option(
        None, doc="Save the training state every n steps (null: not by step).",
        kohya="sd-scripts saves states with each --save_every_n_steps checkpoint (with --save_state); here a "
        "state is also saved on SIGTERM/SIGUSR1/SIGUSR2",
    )
    # States kept beside the checkpoints, to train on from later (training.resume_from); sd-scripts
    # keeps them as <name>-<epoch>-state / <name>-step<n>-state / <name>-state folders.
    save_state_on_train_end: bool = option(
        False, flag="save_state_on_train_end",
        doc="Keep the training state of the last step as <output_name>-state.pt, to train on from it later "
        "(training.resume_from), e.g. with more epochs.",
    )
    save_last_n_epochs_state: Optional[int] = option(
        None, flag="save_last_n_epochs_state",
        doc="Also keep the states saved at epoch ends (save_state_every_n_epochs) as <output_name>-<6-digit epoch>"
        "-state.pt, the last n of them (null: none kept; training_state.pt alone continues an unfinished run).",
        kohya="sd-scripts keeps one state per saved checkpoint with --save_state",
    )
    save_last_n_steps_state: Optional[int] = option(
        None, flag="save_last_n_steps_state",
        doc="Also keep the states saved every save_state_every_n_steps as <output_name>-step<8-digit step>-state.pt, "
        "those of the last n steps (null: none kept).",
    )
    # The file's metadata (sd-scripts: train_network.py --training_comment / --no_metadata, and
    # library/sai_model_spec.py's --metadata_* options, which become modelspec.* keys).
    training_comment: Optional[str] = option(
        None, flag="training_comment", ss="ss_training_comment",
        doc="A comment of yours stored in each LoRA file's metadata (null: none).",
        kohya="sd-scripts writes ss_training_comment \"None\" when it is not given; here the key is left out",
    )
    metadata_title: Optional[str] = option(
        None, flag="metadata_title", ss="modelspec.title",
        doc="The model's title in its metadata (null: output.output_name).",
    )
    metadata_author: Optional[str] = option(None, flag="metadata_author", ss="modelspec.author",
                                            doc="The author's name in the model's metadata (null: none).")
    metadata_description: Optional[str] = option(None, flag="metadata_description", ss="modelspec.description",
                                                 doc="What the model is, in its metadata (null: none).")
    metadata_license: Optional[str] = option(None, flag="metadata_license", ss="modelspec.license",
                                             doc="The model's license in its metadata (null: none).")
    metadata_tags: Optional[str] = option(None, flag="metadata_tags", ss="modelspec.tags",
                                          doc="Tags for the model's metadata, separated by commas (null: none).")
    metadata_trigger_phrase: Optional[str] = option(
        None, flag="metadata_trigger_phrase", ss="modelspec.trigger_phrase",
        doc="The words that call up what the LoRA learned, in its metadata (null: none; ss_tag_frequency "
        "lists the captions' tags either way).",
    )
    # sd-scripts' other --metadata_* texts: get_sai_model_spec writes each given one as modelspec.<name>.
    metadata_usage_hint: Optional[str] = option(None, flag="metadata_usage_hint", ss="modelspec.usage_hint",
                                                doc="A short hint on how to use the model, in its metadata (null: none).")
    metadata_thumbnail: Optional[str] = option(
        None, flag="metadata_thumbnail", ss="modelspec.thumbnail",
        doc="The model's thumbnail in its metadata: a data URL (data:image/png;base64,...) or an image file, "
        "written as a data URL (null: none).",
        kohya="sd-scripts warns and leaves the key out when the file is missing; here the run is refused",
    )
    metadata_merged_from: Optional[str] = option(
        None, flag="metadata_merged_from", ss="modelspec.merged_from",
        doc="The models this one was merged from, in its metadata (null: none).",
    )
    metadata_preprocessor: Optional[str] = option(
        None, flag="metadata_preprocessor", ss="modelspec.preprocessor",
        doc="The preprocessor the model was trained for, in its metadata (null: none).",
    )
    metadata_is_negative_embedding: Optional[str] = option(
        None, flag="metadata_is_negative_embedding", ss="modelspec.is_negative_embedding",
        doc="Whether the model is a negative embedding, in its metadata, as the text given (null: none; YAML reads a "
        "bare true as True: quote it, 'true').",
    )
    no_metadata: bool = option(
        False, flag="no_metadata",
        doc="Keep the training metadata out of the LoRA files: only the keys a loader needs to apply the "
        "network (ss_v2, ss_base_model_version, ss_network_module, ss_network_dim, ss_network_alpha, "
        "ss_network_args), the modelspec.* keys and the sshs_* hashes are written, as sd-scripts does.",
    )
    # Where the per-step scalars go besides metrics.jsonl (sd-scripts: library/train_util.py's
    # prepare_accelerator and init_trackers; atelier/loop/trackers.py).
    log_with: Optional[str] = option(
        None, flag="log_with",
        doc="The trackers: tensorboard, wandb (Weights & Biases) or all (both); null: TensorBoard. metrics.jsonl "
        "is always written.",
        kohya="sd-scripts logs nothing unless --log_with or --logging_dir is given",
    )
    logging_dir: Optional[str] = option(
        None, flag="logging_dir",
        doc="null: the run dir (tensorboard/, wandb/). A folder: each run logs into "
        "<logging_dir>/<log_prefix><YYYYmmddHHMMSS>_<output_name>/ (TensorBoard in its <log_tracker_name>/ "
        "subfolder); a resumed run goes on in the same folder.",
        kohya="sd-scripts' folder is <log_prefix><YYYYmmddHHMMSS>; here _<output_name> keeps a sweep's runs apart",
    )
    log_prefix: Optional[str] = option(None, flag="log_prefix",
                                       doc="Put before the name of each run's folder under output.logging_dir.")
    log_tracker_name: Optional[str] = option(
        None, flag="log_tracker_name",
        doc="The tracker's name: the wandb project and the TensorBoard subfolder under output.logging_dir "
        "(null: network_train, as sd-scripts).",
    )
    wandb_run_name: Optional[str] = option(
        None, flag="wandb_run_name",
        doc="The run's name in wandb (null: output.output_name, which a sweep makes from the job's values).",
        kohya="sd-scripts leaves the name to wandb",
    )

    log_tracker_config: Optional[str] = option(
        None, flag="log_tracker_config",
        doc="A TOML file of arguments for the trackers' start, one table per tracker: [wandb] for wandb.init "
        "(entity, tags, notes, group, ...), [tensorboard] for TensorBoard's SummaryWriter (flush_secs, ...).",
        kohya="in sd-scripts the file replaces every init argument; here its arguments join Atelier's, and the "
        "ones Atelier sets from options (name, project, dir, ...) are refused naming the option",
    )

    def __post_init__(self) -> None:
        check_name("output.output_name", self.output_name)
        if self.save_model_as != "safetensors":
            why = _NOT_SAVED_AS.get(self.save_model_as, "not a format sd-scripts saves a LoRA in")
            raise ConfigError(f"output.save_model_as={self.save_model_as}: {why}; set output.save_model_as=safetensors "
                              "(A1111, ComfyUI, sd-scripts and diffusers load it)")  # fmt: skip
        # sd-scripts reads a save_n_epoch_ratio of 0 as off: here that is null.
        for name in ("save_n_epoch_ratio", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                     "save_last_n_epochs_state", "save_last_n_steps_state"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"output.{name} must be at least 1 (or null), got {value}")
        check_logging(self)
        check_thumbnail(self.metadata_thumbnail)
        for kept, every in (("save_last_n_epochs_state", "save_state_every_n_epochs"),
                            ("save_last_n_steps_state", "save_state_every_n_steps")):  # fmt: skip
            if getattr(self, kept) is not None and not (self.save_state and getattr(self, every)):
                raise ConfigError(f"output.{kept} keeps the states saved every output.{every}, and none are saved: set "
                                  f"output.{every} (and output.save_state=true), or drop output.{kept}")

    def epochs_between_checkpoints(self, num_epochs: int) -> int | None:
        """The epochs between two epoch checkpoints of a run of `num_epochs` epochs (None: none saved):
        save_n_epoch_ratio as train_network.py turns it into save_every_n_epochs, floor(epochs / n) or 1."""
        if self.save_n_epoch_ratio is not None:
            return num_epochs // self.save_n_epoch_ratio or 1
        return self.save_every_n_epochs


def check_thumbnail(thumbnail: str | None) -> None:
    """output.metadata_thumbnail is a data URL or an image file that is there (it is read when training starts)."""
    if thumbnail is None or thumbnail.startswith("data:"):
        return
    if not Path(thumbnail).expanduser().is_file():
        raise ConfigError(f"output.metadata_thumbnail={thumbnail}: no such file; give an image file or a data URL "
                          "(data:image/png;base64,...), or null for no thumbnail")


LOG_WITH = ("tensorboard", "wandb", "all")
# Tracker start arguments Atelier sets itself (atelier/loop/trackers.py), and what sets them.
OWN_TRACKER_ARGS = {
    "wandb": {"project": "output.log_tracker_name", "name": "output.wandb_run_name", "dir": "output.logging_dir",
              "config": "the run's resolved config (given to every wandb run)",
              "id": "Atelier (a resumed run continues its wandb run)", "resume": "Atelier (run the command again)",
              "reinit": "Atelier (each run, each fused lane, is a wandb run of its own)"},
    "tensorboard": {"log_dir": "output.logging_dir", "purge_step": "Atelier (a resumed run drops later events)"},
}  # fmt: skip


def tracker_start_args(path: str) -> dict[str, dict[str, Any]]:
    """output.log_tracker_config's tables: tracker name -> keyword arguments for its start.
    ConfigError naming the file and the key for anything that would not reach a tracker."""
    import tomllib

    where = f"output.log_tracker_config={path}"
    try:
        tables = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; give the path of a TOML file with [wandb] / [tensorboard] "
                          "tables") from None  # fmt: skip
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{where}: not a readable TOML file ({error})") from None
    for tracker, args in tables.items():
        if tracker not in OWN_TRACKER_ARGS or not isinstance(args, dict):
            raise ConfigError(f"{where}: [{tracker}] is not a tracker's table; the file holds [wandb] and/or "
                              "[tensorboard] tables of start arguments")  # fmt: skip
        for key in args:
            if key in OWN_TRACKER_ARGS[tracker]:
                raise ConfigError(f"{where}: [{tracker}] {key} is set by {OWN_TRACKER_ARGS[tracker][key]}; "
                                  "drop it from the file")  # fmt: skip
        accepted = _start_parameters(tracker)
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ConfigError(f"{where}: [{tracker}] {', '.join(unknown)}: not an argument of "
                              f"{_STARTS[tracker]} (it takes {', '.join(sorted(accepted))})")  # fmt: skip
    return tables


_STARTS = {"wandb": "wandb.init", "tensorboard": "torch.utils.tensorboard.SummaryWriter"}


def _start_parameters(tracker: str) -> set[str]:
    import inspect

    if tracker == "wandb":
        import wandb

        start = wandb.init
    else:
        from torch.utils.tensorboard import SummaryWriter

        start = SummaryWriter.__init__
    names = set(inspect.signature(start).parameters) - {"self", "kwargs", "args"}
    return names - set(OWN_TRACKER_ARGS[tracker])


def check_logging(out: OutputConfig) -> None:
    """output.log_with is a tracker sd-scripts knows; the names are names; no logging option is given
    where it would do nothing."""
    if out.log_with is not None and out.log_with not in LOG_WITH:
        raise ConfigError(f"output.log_with={out.log_with!r} is not a tracker: pass one of {', '.join(LOG_WITH)} "
                          "(null: TensorBoard)")
    for name in ("log_prefix", "log_tracker_name"):
        check_name(f"output.{name}", getattr(out, name))
    wandb = out.log_with in ("wandb", "all")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"output.log_with={out.log_with} needs the wandb package: .venv/bin/pip install wandb "
                          "(WANDB_MODE=offline logs without an account)")
    unused = {
        "log_prefix": out.logging_dir is None and "it names the run's folder under output.logging_dir: set that",
        "log_tracker_name": out.logging_dir is None and not wandb
        and "it names the TensorBoard folder under output.logging_dir and the wandb project: set output.logging_dir "
        "or output.log_with=wandb",
        "wandb_run_name": not wandb and "it names the wandb run: set output.log_with=wandb or all",
    }
    for name, why in unused.items():
        if getattr(out, name) is not None and why:
            raise ConfigError(f"output.{name}={getattr(out, name)!r} does nothing here: {why}")
    if out.log_tracker_config is not None:
        for tracker in tracker_start_args(out.log_tracker_config):
            if not uses_tracker(out.log_with, tracker):
                raise ConfigError(f"output.log_tracker_config={out.log_tracker_config}: its [{tracker}] table does "
                                  f"nothing here: set output.log_with={tracker} or all, or drop the table")


def uses_tracker(log_with: str | None, tracker: str) -> bool:
    """Whether output.log_with turns `tracker` ("tensorboard" or "wandb") on; null is TensorBoard."""
    return (log_with or "tensorboard") in (tracker, "all")
