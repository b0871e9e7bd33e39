"""Where a run starts counting: training.initial_epoch / initial_step / skip_until_initial_step,
as train_network.py reads sd-scripts' options of those names.

The start step is initial_step, or the steps of the epochs before initial_epoch. Without
skip_until_initial_step only the epochs' numbers move: the run trains the epochs from the one
that step falls in to the last, each whole, its steps counted from 0 (so it is shorter). With it,
the run starts at that step, in its epoch, with the data an unbroken run would train from there,
and counts on to the end. The learning-rate schedule starts at 0 either way, unless
training.resume_from gives its position (sd-scripts: "initial_epoch/step doesn't affect lr scheduler").
"""

from __future__ import annotations

from dataclasses import dataclass

from atelier.config.schema import TrainingConfig
from atelier.data.plan import TrainingPlan
from atelier.errors import ConfigError


@dataclass(frozen=True)
class RunStart:
    given: bool = False  # initial_epoch or initial_step is set (a training.resume_from state's count is then dropped)
    epochs_before: int = 0  # the run's first epoch is epochs_before + 1
    steps_before: int = 0  # the step count it starts at (skip_until_initial_step)
    batches_done: int = 0  # of its first epoch, this process's batches skipped (skip_until_initial_step)

    def first_step(self, epoch: int, plan: TrainingPlan) -> int:
        """The optimizer steps counted before `epoch`'s first batch: without skipping, the run's
        epochs before it only (the skipped epochs were numbered, not trained or counted)."""
        numbered_only = 0 if self.steps_before else self.epochs_before
        return (epoch - 1 - numbered_only) * plan.updates_per_epoch

    def last_step(self, plan: TrainingPlan) -> int:
        """The step count the run ends at: the plan's, or, with epochs numbered only, that of its
        whole epochs (sd-scripts' loop runs out of epochs before max_train_steps)."""
        if self.steps_before or not self.epochs_before:
            return plan.total_steps
        return min(plan.total_steps, (plan.num_epochs - self.epochs_before) * plan.updates_per_epoch)


def run_start(t: TrainingConfig, plan: TrainingPlan) -> RunStart:
    """The run's start under these options (ConfigError naming the key when it is past the run's end)."""
    if t.initial_step is None and t.initial_epoch is None:
        return RunStart()
    per_epoch = plan.updates_per_epoch
    if t.initial_step is not None:
        key, step = f"training.initial_step={t.initial_step}", t.initial_step
    else:  # sd-scripts: (initial_epoch - 1) x the optimizer steps of one process's epoch
        key, step = f"training.initial_epoch={t.initial_epoch}", (t.initial_epoch - 1) * per_epoch
    if step == 0:
        return RunStart(given=True)
    if step >= plan.total_steps:  # sd-scripts asserts max_train_steps > initial step
        raise ConfigError(f"{key} starts the run at step {step}, and it ends at step {plan.total_steps} "
                          f"({plan.num_epochs} epochs of {per_epoch} steps): raise training.max_train_epochs or "
                          "training.max_train_steps, or start earlier")  # fmt: skip
    epochs = step // per_epoch
    if not t.skip_until_initial_step:
        return RunStart(given=True, epochs_before=epochs)
    # The step's own batch: steps x gradient_accumulation_steps batches in (sd-scripts multiplies
    # too, but then divides by the steps of an epoch as if they were batches).
    return RunStart(True, epochs, step, (step - epochs * per_epoch) * plan.gradient_accumulation_steps)
