"""output: the LoRA files and the training state a run saves."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

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

    def __post_init__(self) -> None:
        check_name("output.output_name", self.output_name)
        if self.save_model_as != "safetensors":
            why = _NOT_SAVED_AS.get(self.save_model_as, "not a format sd-scripts saves a LoRA in")
            raise ConfigError(f"output.save_model_as={self.save_model_as}: {why}; set output.save_model_as=safetensors "
                              "(A1111, ComfyUI, sd-scripts and diffusers load it)")  # fmt: skip
        for name in ("save_every_n_steps", "save_last_n_epochs", "save_last_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"output.{name} must be at least 1 (or null), got {value}")
        check_logging(self)


LOG_WITH = ("tensorboard", "wandb", "all")


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
