"""One config's run inside the training loop: its data, plan, network, optimizer, metrics,
result, position and state; what atelier.loop.loop.TrainingLoop calls on it.

A plain run is one Adapter whose network is applied to the base model; a fused group is K
Adapters sharing one base model, their networks reached through atelier.fused.slots. The
loop builds the UNet call; everything else about a step (its inputs and loss, the optimizer
step, the scalars it logs) and about an epoch's end (validation, checkpoints, samples, the
training state) is the adapter's own, the same in both cases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import set_seed

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.config.schema import AtelierConfig
from atelier.errors import UserError
from atelier.loop import build
from atelier.loop.inputs import StepInputs
from atelier.loop.result import EpochProgress, TrainResult
from atelier.models.loading import BaseModel
from atelier.network.lora import LoRANetwork
from atelier.network.lora_file import save_lora
from atelier.outputs.metadata import checkpoint_metadata
from atelier.outputs.rotation import fallen_out
from atelier.runtime import phases
from atelier.conditioning.training_data import Batch, TrainingData
from atelier.runtime.distributed import DataParallel
from atelier.objective.steps import Objective
from atelier.plugins import FamilyPlugin, plugin_of
from atelier.loop.metrics import MetricsLog, NullMetrics
from atelier.objective.noise import timestep_range, with_zero_terminal_snr
from atelier.optim.loss_scaling import optimizer_step, unscale_gradients
from atelier.optim.optimizers import effective_learning_rates, has_train_eval_modes
from atelier.data.plan import TrainingPlan, plan_for
from atelier.loop.samples import SampleWriter
from atelier.optim.schedulers import ScheduleSteps
from atelier.loop.adapter_state import AdapterState
from atelier.loop.run_start import RunStart, run_start
from atelier.loop.state import STATE_FILE
from atelier.loop.validation import Validator, make_validator
from atelier.search.trial_link import TrialLink

log = logging.getLogger(__name__)

BaseLoader = Callable[[AtelierConfig, torch.device], BaseModel]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf; the run stops before the optimizer uses it."""


class Adapter(AdapterState):
    """One config trained into one run dir. `index`: its lane in a fused group (0 alone)."""

    def __init__(self, cfg: AtelierConfig, run_dir: Path, index: int = 0):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.index = index
        self.result = TrainResult()
        self.status = "running"  # running | completed | pruned | failed | interrupted
        self.reason: str | None = None
        self.accelerator = build.make_accelerator(cfg)
        self.device = self.accelerator.device
        self.parallel = DataParallel(self.accelerator)
        self.position: EpochProgress | None = None  # set when an epoch starts, or by restore()
        self.metrics: MetricsLog | NullMetrics = NullMetrics()

    # ----------------------------------------------------------------- setup
    def setup(self, load_base: BaseLoader = build.load_base, apply: bool = True) -> None:
        """Everything the run trains with. `load_base` gives the base model (a fused group's
        lanes share one); `apply`: patch the network into it (see build.create_network)."""
        with phases.phase("setup_other"):
            self._setup(load_base, apply)

    def _setup(self, load_base: BaseLoader, apply: bool) -> None:
        cfg, t = self.cfg, self.cfg.training
        set_seed(t.seed)  # first: the network's initial weights come from the global RNG
        self.data = TrainingData(cfg.dataset, t.seed, t.train_batch_size)
        self.plan: TrainingPlan = plan_for(t, self.data.num_samples, self.data.batches_per_epoch,
                                           self.parallel.world_size)  # fmt: skip
        self.plan.log_summary(self.parallel.world_size)
        self.start: RunStart = run_start(t, self.plan)  # training.initial_epoch / initial_step
        self.schedule = ScheduleSteps.of(cfg.scheduler, self.plan.total_steps)
        with phases.phase("model_load"):
            self.base: BaseModel = load_base(cfg, self.device)
        timestep_range(self.base.noise_scheduler, t.min_timestep, t.max_timestep)
        if t.zero_terminal_snr:
            self.base.noise_scheduler = with_zero_terminal_snr(self.base.noise_scheduler)
        self.plugin: FamilyPlugin = plugin_of(cfg.model.version)
        self.objective: Objective = self.plugin.objective(t, self.base)
        self.data.prepare(self.base.vae, self.device)
        with phases.phase("network"):
            self.network: LoRANetwork = build.create_network(cfg, self.base, self.device, apply)
        self.captions: CaptionEncoder = self.data.caption_encoder(
            self.base.tokenizers,
            self.base.text_encoders,
            frozen=not self.train_text_encoder,
            clip_skip=t.clip_skip,
            autocast=self.accelerator.autocast,
            encoder_type=self.plugin.caption_encoder(self.base, t),
        )
        if apply and self.captions.caching:  # a plain run: no other lane encodes with them
            build.offload_text_encoders(self.base, self.device)
        self.validator: Validator | None = make_validator(self.data, self.base.vae, self.objective, self.device)
        # A search's run reports its validation losses to its trial (the main process only).
        self.trial_link = TrialLink.open(self.run_dir, cfg.trial) if cfg.trial is not None and self.parallel.is_main else None
        with phases.phase("optimizer"):
            self.optimizer, self.lr_scheduler = build.create_optimizer(cfg, self.network, self.schedule, self.device)
        if has_train_eval_modes(self.optimizer):
            # Schedule-free: steps in train mode; validation, samples and saving inside
            # eval_weights(optimizer) blocks (the loop's epoch end and finish).
            self.optimizer.train()
        self.samples = SampleWriter(cfg, self.base, self.data.index, self.run_dir, self.device,
                                    self.accelerator.autocast)  # fmt: skip
        self.base_metadata = build.base_metadata(cfg, self.base, self.optimizer, self.data, self.plan)
        if self.parallel.is_main:
            with phases.phase("lr_plot"):
                build.plot_schedule(cfg, self.optimizer, self.schedule, self.run_dir, self.network)

    @property
    def train_text_encoder(self) -> bool:
        return build.trains_text_encoder(self.cfg.network)

    @property
    def last_step(self) -> int:
        return self.start.last_step(self.plan)

    @property
    def done(self) -> bool:
        return self.result.steps >= self.last_step

    def open_metrics(self, resumed: bool) -> None:
        """metrics.jsonl and the trackers (the main process only: one wandb run per run, not per
        process); a resumed run forgets steps after its state."""
        if self.parallel.is_main:
            self.metrics = MetricsLog(self.run_dir, resume_step=self.result.steps if resumed else None, cfg=self.cfg)

    def close(self) -> None:
        self.metrics.close()
        self.metrics = NullMetrics()

    # ------------------------------------------------------------------ step
    def step_inputs(self, batch: Batch) -> StepInputs:
        """The denoiser inputs of `batch`: its noise, timesteps and captions' embeddings."""
        latents = batch.latents.to(self.device)
        generator = batch.noise_generator()  # the batch's own stream: any process draws the same
        inputs = self.objective.draw(latents, generator)
        with self.accelerator.autocast():
            inputs.hidden = self.captions(batch.captions, grad=self.train_text_encoder)
        return inputs

    def step_loss(self, batch: Batch, inputs: StepInputs, pred: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(inputs, pred, self.data.loss_weights(batch), batch.masks)

    def check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        if torch.isfinite(loss).all():
            return
        step = self.result.steps + 1
        saved = ", ".join(p.name for p in self.result.checkpoints) or "none yet"
        raise NonFiniteLossError(
            f"loss is {loss.item()} at step {step} (epoch {epoch}); training stopped before the "
            f"optimizer used it. Checkpoints saved before this step are intact ({saved}). "
            f"Try a lower learning rate (optimizer.learning_rate={self.cfg.optimizer.learning_rate}), "
            "training.mixed_precision=no or bf16 instead of fp16, or a smaller training.max_grad_norm."
        )

    def optimizer_step(self) -> dict[str, float]:
        """One optimizer step; returns network.scale_weight_norms' scalars to log (if on)."""
        self.parallel.average_gradients(self.network.parameters())
        scaler = self.accelerator.scaler  # fp16 only: the loss was scaled in backward
        unscale_gradients(scaler, self.optimizer)
        max_norm = self.cfg.training.max_grad_norm
        if max_norm:
            self.accelerator.clip_grad_norm_(self.network.parameters(), max_norm)
        optimizer_step(scaler, self.optimizer)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.scale_weight_norms()

    def scale_weight_norms(self) -> dict[str, float]:
        """network.scale_weight_norms after an optimizer step: the max_norm/* scalars to log.

        Empty when the option is off. Keys as sd-scripts logs them: max_norm/keys_scaled,
        max_norm/average_key_norm, max_norm/max_key_norm.
        """
        max_norm = self.cfg.network.scale_weight_norms
        return self.network.apply_max_norm(max_norm) if max_norm else {}

    def step_scalars(self, loss: float, seconds: float) -> dict[str, float]:
        scalars = {"loss/step": loss, "time/step_seconds": seconds}
        names = build.param_group_names(self.cfg, self.network)
        for name, lr in zip(names, self.lr_scheduler.get_last_lr()):
            scalars[f"lr/{name}"] = lr
        # Adaptive optimizers: the step size they really take (sd-scripts' key; experiment=lr_find reads it).
        for name, lr in zip(names, effective_learning_rates(self.optimizer) or []):
            scalars[f"lr/d*lr/{name}"] = lr
        return scalars

    # ----------------------------------------------------------------- epoch
    def validation_due(self, epoch: int | None) -> bool:
        """Whether to measure the validation loss now: at `epoch`'s end, or (None) after a step.
        The step rule (dataset.validate_every_n_steps) is heard at an epoch's end too."""
        if self.validator is None:
            return False
        steps_every = self.cfg.dataset.validate_every_n_steps
        by_steps = bool(steps_every) and self.result.steps % steps_every == 0
        if epoch is None:
            return by_steps
        every = self.cfg.dataset.validate_every_n_epochs
        return bool(every and epoch % every == 0) or epoch == self.plan.num_epochs or by_steps

    def validate(self, epoch: int) -> float:
        """The validation loss now (logged at the current step, within `epoch`)."""
        loss = self.validator.loss(self.base.unet, self.captions, self.accelerator.autocast, self.device)
        self.result.validation_losses.append(loss)
        self.metrics.log(self.result.steps, {"loss/validation": loss}, epoch=epoch)
        log.info("epoch %d, step %d: validation loss %.5f", epoch, self.result.steps, loss)
        return loss

    def should_prune(self, loss: float | None) -> bool:
        """Report `loss` to the run's trial (if it has one); True when the trial says stop.
        Every process of a data-parallel run calls it and hears the main process's answer."""
        if self.cfg.trial is None:
            return False
        vote = self.trial_link is not None and loss is not None and self.trial_link.report(loss, self.result.steps)
        _, agreed = self.parallel.agree(0.0, 1 if vote else None)
        return bool(agreed)

    def epoch_outputs(self, epoch: int) -> None:
        """The epoch's checkpoint and samples, when the output and sampling options ask for them."""
        out = self.cfg.output
        is_last = epoch == self.plan.num_epochs
        every_n_epochs = out.epochs_between_checkpoints(self.plan.num_epochs)
        if every_n_epochs and epoch % every_n_epochs == 0 and not is_last:
            path = self.run_dir / f"{out.output_name}-{epoch:06d}.safetensors"
            self._save(path, epoch)
            self.result.checkpoints.append(path)
            self._drop_old_checkpoints()
        every = self.cfg.sampling.sample_every_n_epochs
        if (every and epoch % every == 0) or is_last:
            self.samples.generate(epoch, self.result.steps)

    @property
    def first_samples_due(self) -> bool:
        """sampling.sample_at_first: samples before the first step (the LoRA still adds nothing),
        named for epoch 0 as sd-scripts names them; not again when a run continues (main process)."""
        started = self.result.steps == self.start.steps_before  # training.initial_step with skipping: not 0
        return self.cfg.sampling.sample_at_first and started and self.parallel.is_main

    def _every_n_steps(self, every: int | None) -> bool:
        return bool(every) and self.result.steps % every == 0 and self.parallel.is_main

    @property
    def step_outputs_due(self) -> bool:
        """A step checkpoint (output.save_every_n_steps) or step samples (sampling.sample_every_n_steps)
        after this step (main process)."""
        return self._every_n_steps(self.cfg.output.save_every_n_steps) or \
            self._every_n_steps(self.cfg.sampling.sample_every_n_steps)

    def step_outputs(self, epoch: int) -> None:
        """What step_outputs_due asks for: the step checkpoint, as sd-scripts names it
        (-step<8 digits>), and the step's samples (named by step, as sd-scripts names them)."""
        out = self.cfg.output
        if self._every_n_steps(out.save_every_n_steps):
            path = self.run_dir / f"{out.output_name}-step{self.result.steps:08d}.safetensors"
            self._save(path, epoch)
            self.result.checkpoints.append(path)
            self._drop_old_checkpoints()
        if self._every_n_steps(self.cfg.sampling.sample_every_n_steps):
            self.samples.generate(None, self.result.steps)

    def _drop_old_checkpoints(self) -> None:
        """output.save_last_n_epochs / save_last_n_steps: delete the checkpoints that fell out
        (as sd-scripts: the epoch ones beyond the last n, the step ones older than the last n
        steps). The final LoRA and a pruned run's file are never among them."""
        out = self.cfg.output
        old = fallen_out(self.result.checkpoints, out.output_name, ".safetensors", out.save_last_n_epochs,
                         out.save_last_n_steps, self.result.steps)  # fmt: skip
        for path in old:
            path.unlink(missing_ok=True)
            self.result.checkpoints.remove(path)
            log.info("removed %s (output.save_last_n_epochs / save_last_n_steps)", path.name)

    def _save(self, path: Path, epoch: int) -> None:
        metadata = checkpoint_metadata(self.base_metadata, epoch=epoch, steps=self.result.steps,
                                       finished_at=time.time(), no_metadata=self.cfg.output.no_metadata)  # fmt: skip
        save_lora(path, self.network.kohya_state_dict(), metadata, self.cfg.output.save_precision)
        log.info("saved %s (epoch %d, step %d)", path.name, epoch, self.result.steps)

    def finish(self) -> None:
        """The final LoRA and the sample grid (main process); the training state removed."""
        if not self.parallel.is_main:
            return
        path = self.run_dir / f"{self.cfg.output.output_name}.safetensors"
        self._save(path, self.result.epochs)
        self.result.output_file = path
        self.samples.write_grid()
        # The final LoRA supersedes it: a finished run is not resumed.
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)

    def finish_pruned(self) -> None:
        """A pruned run's end (main process): its LoRA as it stands, `<output_name>-pruned`, kept
        beside its checkpoints and samples; the training state removed (its trial is over)."""
        if not self.parallel.is_main:
            return
        path = self.run_dir / f"{self.cfg.output.output_name}-pruned.safetensors"
        self._save(path, self.result.epochs)
        self.result.checkpoints.append(path)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
