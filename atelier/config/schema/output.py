"""output: the LoRA files and the training state a run saves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import SI

from atelier.config.schema.checks import check_name
from atelier.config.schema.enums import SavePrecision
from atelier.config.schema.fields import option


@dataclass
class OutputConfig:
    output_name: str = option(
        SI("${project}"), flag="output_name", ss="ss_output_name",
        doc="The LoRA file's name (<output_name>.safetensors, -<epoch> for intermediate ones); a name, not a path.",
    )
    save_every_n_epochs: Optional[int] = option(5, flag="save_every_n_epochs",
                                                doc="An intermediate LoRA every n epochs (null: only the final one).")
    save_precision: SavePrecision = option(SavePrecision.float, flag="save_precision",
                                           doc="The dtype of the saved LoRA's tensors.")
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

    def __post_init__(self) -> None:
        check_name("output.output_name", self.output_name)
