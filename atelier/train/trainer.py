"""The LoRA training loop: one frozen base model, one LoRA network, one dataset."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.conditioning.sdxl import prepare_text_encoder_2
from atelier.conditioning.unet_call import unet_prediction
from atelier.config.schema import MixedPrecision, part_learning_rates
from atelier.data.dataset import DatasetIndex
from atelier.errors import UserError
from atelier.models.hashes import model_hashes
from atelier.models.loading import BaseModel, load_base_model
from atelier.network.factory import build_network
from atelier.network.lora import TEXT_ENCODER_PREFIX, UNET_PREFIX, LoRANetwork
from atelier.outputs.lora_file import save_lora
from atelier.outputs.metadata import checkpoint_metadata, training_metadata
from atelier.train import phases, reuse, speed
from atelier.train.data import Batch, TrainingData, batch_time_ids, shard
from atelier.train.distributed import DataParallel
from atelier.train.losses import diffusion_loss, training_target
from atelier.train.lr_find import check_can_suggest
from atelier.train.lr_plot import LR_SCHEDULE_PNG, plot_lr_schedule
from atelier.train.metrics import MetricsLog, NullMetrics
from atelier.train.noise import (
    check_noise_options,
    noisy_latents,
    sample_noise,
    sample_timesteps,
    timestep_range,
    with_zero_terminal_snr,
)
from atelier.train.optimizers import (
    build_optimizer,
    check_schedule_fits,
    describe_optimizer,
    effective_learning_rates,
    eval_weights,
    has_train_eval_modes,
    is_adaptive,
)
from atelier.train.plan import TrainingPlan, plan_for
from atelier.train.samples import SampleWriter
from atelier.train.schedulers import ScheduleSteps, lr_curve, lr_scheduler_from_config
from atelier.train.signals import StopFlag, StopRequested, stop_on_signals
from atelier.train.state import (
    STATE_FILE,
    config_fingerprint,
    load_training_state,
    rng_states,
    save_training_state,
    set_rng_states,
)
from atelier.train.validation import Validator

log = logging.getLogger(__name__)


# Trainer methods timed into summary.json's phase_seconds (atelier.train.phases); the
# training steps are result.train_seconds, latent caching is timed in TrainingData.prepare.
TRAINER_PHASES = {
    "_load_base_model": "model_load",
    "_create_network": "network",
    "_create_optimizer": "optimizer",
    "_plot_lr_schedule": "lr_plot",
    "_restore": "restore",
    "_validate": "validation",
    "_end_epoch": "epoch_outputs",
    "_save_state": "state_saving",
    "_finish": "final_outputs",
    "setup": "setup_other",
}


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf; the run stops before the optimizer uses it."""


@dataclass
class TrainResult:
    steps: int = 0
    epochs: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    output_file: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.epoch_losses[-1] if self.epoch_losses else None

    @property
    def best_loss(self) -> float | None:
        return min(self.epoch_losses) if self.epoch_losses else None

    @property
    def validation_loss(self) -> float | None:
        return self.validation_losses[-1] if self.validation_losses else None

    @property
    def best_validation_loss(self) -> float | None:
        return min(self.validation_losses) if self.validation_losses else None

    @property
    def seconds_per_step(self) -> float | None:
        return self.train_seconds / self.steps if self.steps else None


@dataclass
class StepInputs:
    """What one batch's UNet call takes (noisy, timesteps, hidden) and its loss needs."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    hidden: object  # text embeddings; SDXLText for SDXL


@dataclass
class EpochProgress:
    """Where the epoch in progress stands: what a state saved mid-epoch needs to continue."""

    data_state: dict  # TrainingData's random state before this epoch's draws
    batches_done: int = 0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"data": self.data_state, "batches_done": self.batches_done, "losses": list(self.losses)}


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.result = TrainResult()
        t = cfg.training
        if t.cpu is False and t.mixed_precision == MixedPrecision.fp16 and not torch.cuda.is_available():
            raise ValueError("training.mixed_precision=fp16 needs a CUDA GPU; on a CPU use bf16 or no")
        # accelerate forms a CPU process group (gloo) only when told to use the CPU.
        cpu = t.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
        self.accelerator = Accelerator(mixed_precision=MixedPrecision(t.mixed_precision).value, cpu=cpu)
        self.device = self.accelerator.device
        self.parallel = DataParallel(self.accelerator)
        self.stop = StopFlag()
        self.position: EpochProgress | None = None  # set when an epoch starts, or by _restore
        phases.time_methods(self, TRAINER_PHASES)  # summary.json's phase_seconds

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.training.seed)
        self._check_options()
        self.data = TrainingData(cfg.dataset, cfg.training.seed, cfg.training.train_batch_size)
        self.dataset: DatasetIndex = self.data.index
        self.plan: TrainingPlan = self._make_plan()
        self.schedule = ScheduleSteps.of(cfg.scheduler, self.plan.total_steps)
        self.base: BaseModel = self._load_base_model()
        timestep_range(self.base.noise_scheduler, cfg.training.min_timestep, cfg.training.max_timestep)
        if cfg.training.zero_terminal_snr:
            self.base.noise_scheduler = with_zero_terminal_snr(self.base.noise_scheduler)
        self.data.prepare(self.base.vae, self.device)
        self.network = self._create_network()
        self.captions: CaptionEncoder = self.data.caption_encoder(
            self.base.tokenizers,
            self.base.text_encoders,
            frozen=not self.train_text_encoder,
            clip_skip=cfg.training.clip_skip,
            autocast=self.accelerator.autocast,
        )
        self.validator: Validator | None = self.data.validator(self.base.vae, self.base.noise_scheduler, self.device)
        self.optimizer, self.lr_scheduler = self._create_optimizer()
        self._use_eval_weights_outside_steps()
        self.samples = SampleWriter(
            cfg, self.base, self.dataset, self.run_dir, self.device, self.accelerator.autocast
        )
        self.base_metadata = self._training_metadata()
        if self.parallel.is_main:
            self._plot_lr_schedule()

    def _check_options(self) -> None:
        """Noise, loss and lr-finder options that cannot work together fail before any loading."""
        t, opt = self.cfg.training, self.cfg.optimizer
        check_noise_options(t, self.cfg.model.v_parameterization)
        if t.suggest_lr:
            check_can_suggest(opt.type, dict(opt.args))

    def _use_eval_weights_outside_steps(self) -> None:
        """Schedule-free optimizers (optimizer.train()/eval()): steps are taken in train mode;
        validation, sampling and saving (_validate, _end_epoch, _finish) see the eval weights.

        Wrapping those three here keeps train() untouched; the training state is saved after
        _end_epoch returns, so it always holds the train-mode weights it resumes from.
        """
        if not has_train_eval_modes(self.optimizer):
            return
        self.optimizer.train()
        for name in ("_validate", "_end_epoch", "_finish"):
            setattr(self, name, _in_eval_mode(getattr(self, name), self.optimizer))

    def _plot_lr_schedule(self) -> None:
        """lr_schedule.png in the run dir: the lr of each trained part over the planned steps."""
        labels = self._param_group_names()
        base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        curves = lr_curve(self.cfg.scheduler, base_lrs, self.schedule)
        opt = self.cfg.optimizer
        kind = getattr(opt.type, "value", opt.type)
        note = None
        if is_adaptive(opt.type, dict(opt.args)):
            note = f"{kind} scales its steps itself; the step size it takes is logged as lr/d*lr/*"
        title = f"{getattr(self.cfg.scheduler.type, 'value', self.cfg.scheduler.type)} schedule, {kind}"
        plot_lr_schedule(dict(zip(labels, curves)), self.run_dir / LR_SCHEDULE_PNG, title, note)

    def _param_group_names(self) -> list[str]:
        """Metric names of the optimizer's param groups, in order."""
        return (["unet"] if self.train_unet else []) + (["text_encoder"] if self.train_text_encoder else [])

    def _make_plan(self) -> TrainingPlan:
        plan = plan_for(self.cfg.training, self.data.num_samples, self.data.batches_per_epoch, self.parallel.world_size)
        plan.log_summary(self.parallel.world_size)
        return plan

    def _training_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        meta = training_metadata(
            cfg,
            base_model_name=self.base.name,
            optimizer_name=describe_optimizer(self.optimizer, dict(cfg.optimizer.args)),
            dataset_dirs=self.data.dataset_dirs(),
            tag_frequency=self.data.tag_frequency(),
            num_train_images=self.dataset.num_train_samples,
            num_batches_per_epoch=self.plan.batches_per_epoch,
            num_epochs=self.plan.num_epochs,
            max_train_steps=self.plan.total_steps,
            started_at=time.time(),
            num_reg_images=self.data.num_reg_images,
            bucket_info=self.data.bucket_info,
            cache_latents=self.data.caches_latents,
        )
        # The hashes A1111 shows for the base model (cached per file, so a sweep hashes once).
        return {**meta, **model_hashes(self.base.path)}

    def _load_base_model(self) -> BaseModel:
        m = self.cfg.model
        log.info("loading base model %s", m.path or m.builtin)
        base = reuse.load_base(m, self.cfg.training, self.device, lambda: load_base_model(
            m.path,
            builtin=m.builtin,
            version=m.version.value if hasattr(m.version, "value") else m.version,
            v_parameterization=m.v_parameterization,
            config=m.config,
            vae=m.vae,
            allow_pickle=m.allow_pickle,
        ))
        weight_dtype = {MixedPrecision.fp16: torch.float16, MixedPrecision.bf16: torch.bfloat16}.get(
            MixedPrecision(self.cfg.training.mixed_precision), torch.float32
        )
        for module in (base.unet, base.text_encoder, base.vae):
            module.requires_grad_(False)
            module.eval()
        # The VAE stays in float32: fp16 VAEs overflow (it encodes the latent cache, or every step).
        for module in (base.vae, base.unet, base.text_encoder):
            module.to(self.device)
        if weight_dtype != torch.float32:
            base.unet.to(weight_dtype)
            base.text_encoder.to(weight_dtype)
        prepare_text_encoder_2(base, self.device, weight_dtype)
        return base

    @property
    def train_unet(self) -> bool:
        return not self.cfg.network.train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.cfg.network.train_unet_only

    def _create_network(self) -> LoRANetwork:
        unet = self.base.unet if self.train_unet else None
        text_encoder = self.base.text_encoders if self.train_text_encoder else None
        # Any network.module; from network.weights (shapes read from the file) when set.
        network = build_network(self.cfg.network, unet, text_encoder)
        network.to(self.device)
        network.apply_to()
        if self.cfg.training.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        speed.compile_unet(self.base.unet, self.cfg.training)
        return network

    def scale_weight_norms(self) -> dict[str, float]:
        """network.scale_weight_norms after an optimizer step: the max_norm/* scalars to log.

        Empty when the option is off. Keys as sd-scripts logs them: max_norm/keys_scaled,
        max_norm/average_key_norm, max_norm/max_key_norm.
        """
        max_norm = self.cfg.network.scale_weight_norms
        return self.network.apply_max_norm(max_norm) if max_norm else {}

    def _enable_gradient_checkpointing(self) -> None:
        # Both libraries checkpoint only in train mode; the base has no dropout, so
        # train mode changes nothing else.
        self.base.unet.enable_gradient_checkpointing()
        self.base.unet.train()
        for text_encoder in self.base.text_encoders if self.train_text_encoder else ():
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            text_encoder.train()

    def _create_optimizer(self):
        opt, sched = self.cfg.optimizer, self.cfg.scheduler
        rates = part_learning_rates(opt)
        groups = []
        if self.train_unet:
            groups.append({"params": self.network.parameters_of(UNET_PREFIX), "lr": rates.unet})
        if self.train_text_encoder:
            groups.append({"params": self.network.parameters_of(TEXT_ENCODER_PREFIX), "lr": rates.text_encoder})
        check_schedule_fits(opt.type, getattr(sched.type, "value", sched.type), self.schedule.warmup)
        optimizer = build_optimizer(opt.type, groups, opt.learning_rate,
                                    speed.optimizer_args(opt.type, dict(opt.args), self.cfg.training, self.device))
        lr_scheduler = lr_scheduler_from_config(sched, optimizer, self.schedule)
        return optimizer, lr_scheduler

    # -------------------------------------------------------------- training
    def train(self) -> TrainResult:
        self.setup()
        resumed = self._restore()
        main = self.parallel.is_main
        metrics = MetricsLog(self.run_dir, resume_step=self.result.steps if resumed else None) if main else NullMetrics()
        progress = tqdm(
            total=self.plan.total_steps,
            initial=self.result.steps,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            disable=not main,
        )
        try:
            with stop_on_signals() as self.stop:
                for epoch in range(self.result.epochs + 1, self.plan.num_epochs + 1):
                    self._run_epoch(epoch, metrics, progress)
        finally:
            progress.close()
            metrics.close()
        self._finish()
        return self.result

    def _run_epoch(self, epoch: int, metrics: MetricsLog, progress: tqdm) -> None:
        epoch_loss = self._train_epoch(epoch, metrics, progress)
        self.result.epochs = epoch
        self.result.epoch_losses.append(epoch_loss)
        metrics.log(self.result.steps, {"loss/epoch": epoch_loss}, epoch=epoch)
        if self.parallel.is_main:
            self._validate(epoch, metrics)
            self._end_epoch(epoch)
        if epoch == self.plan.num_epochs:
            return  # the final LoRA comes next; no state to keep
        # The next epoch starts from the data state this one left.
        self.position = EpochProgress(self.data.state_dict())
        _, stop_signal = self.parallel.agree(0.0, self.stop.signal)
        every = self.cfg.output.save_state_every_n_epochs
        if stop_signal or (every and epoch % every == 0):
            self._save_state()
        self._stop_if_asked(epoch, stop_signal)

    def _train_epoch(self, epoch: int, metrics: MetricsLog, progress: tqdm) -> float:
        if self.position is None:
            self.position = EpochProgress(self.data.state_dict())
        position = self.position
        batches = shard(self.data.epoch(epoch), self.parallel.rank, self.parallel.world_size)
        accum = self.plan.gradient_accumulation_steps
        losses = position.losses
        step_start = time.perf_counter()
        skip = position.batches_done  # a run resumed mid-epoch skips what it trained before
        for i, batch in enumerate(self.data.load(batches[skip:]), start=skip):
            # The last group of an epoch may be shorter than `accum`.
            group_size = min(accum, len(batches) - (i // accum) * accum)
            loss = self._forward(batch) / group_size
            self._check_finite(loss, epoch)
            self.accelerator.backward(loss)
            losses.append(loss.item() * group_size)
            if (i + 1) % accum and i + 1 != len(batches):
                continue
            norms = self._optimizer_step()
            self.result.steps += 1
            position.batches_done = i + 1
            elapsed = time.perf_counter() - step_start
            self.result.train_seconds += elapsed
            # Processes decide together, so none waits for a step the others will not take.
            recent, stop_signal = self.parallel.agree(sum(losses[-group_size:]) / group_size, self.stop.signal)
            metrics.log(self.result.steps, {**self._step_scalars(recent, elapsed), **norms}, epoch=epoch)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{recent:.4f}")
            if self.result.steps >= self.plan.total_steps:
                break
            self._after_step(epoch, stop_signal)
            step_start = time.perf_counter()
        self.position = None
        return sum(losses) / len(losses)

    def _after_step(self, epoch: int, stop_signal: int | None) -> None:
        every = self.cfg.output.save_state_every_n_steps
        if stop_signal or (every and self.result.steps % every == 0):
            self._save_state()
        self._stop_if_asked(epoch, stop_signal)

    # ----------------------------------------------------------------- state
    def _save_state(self) -> None:
        if not self.cfg.output.save_state or not self.parallel.is_main:
            return
        tic = time.perf_counter()
        save_training_state(self.run_dir, self._state_dict())
        log.info("training state saved at step %d (%.2f s)", self.result.steps, time.perf_counter() - tic)

    def _stop_if_asked(self, epoch: int, stop_signal: int | None) -> None:
        if not stop_signal:
            return
        self.stop.signal = stop_signal  # another process may have got it
        where = f"step {self.result.steps} (epoch {epoch})"
        if self.cfg.output.save_state:
            message = (
                f"stopped by {self.stop.name} at {where}; the training state is in {self.run_dir / STATE_FILE}: "
                "run the same command again (same run dir) to continue"
            )
        else:
            message = f"stopped by {self.stop.name} at {where}; output.save_state=false, so it cannot be continued"
        raise StopRequested(self.stop, message)

    def _state_dict(self) -> dict:
        r = self.result
        return {
            "config_fingerprint": config_fingerprint(self.cfg),
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": rng_states(),
            "position": self.position.as_dict(),
            "epoch": r.epochs,
            "steps": r.steps,
            "epoch_losses": r.epoch_losses,
            "validation_losses": r.validation_losses,
            "train_seconds": r.train_seconds,
            "checkpoints": [p.name for p in r.checkpoints],
        }

    def _restore(self) -> bool:
        """Load the run dir's training state if there is one; True when it did."""
        state = load_training_state(self.run_dir, config_fingerprint(self.cfg))
        if state is None:
            return False
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_states(state["rng"])
        position = state["position"]
        self.data.load_state_dict(position["data"])
        self.position = EpochProgress(position["data"], position["batches_done"], list(position["losses"]))
        r = self.result
        r.epochs, r.steps, r.epoch_losses = state["epoch"], state["steps"], list(state["epoch_losses"])
        r.validation_losses = list(state["validation_losses"])
        r.train_seconds = state["train_seconds"]
        r.checkpoints = [self.run_dir / name for name in state["checkpoints"]]
        log.info(
            "resuming from %s: step %d, epoch %d (+%d batches of epoch %d)",
            STATE_FILE, r.steps, r.epochs, self.position.batches_done, r.epochs + 1,
        )
        return True

    def _forward(self, batch: Batch) -> torch.Tensor:
        inputs = self._step_inputs(batch)
        with self.accelerator.autocast():
            pred = unet_prediction(self.base.unet, inputs.noisy, inputs.timesteps, inputs.hidden,
                                   lambda: batch_time_ids(self.data, batch))  # fmt: skip
        return self._step_loss(batch, inputs, pred)

    # _forward in two halves around the UNet call: atelier.fused runs one UNet call for
    # the inputs of several trainers (each its own noise, timesteps and loss options).
    def _step_inputs(self, batch: Batch) -> StepInputs:
        base, t = self.base, self.cfg.training
        latents = batch.latents.to(self.device)
        generator = batch.noise_generator()  # the batch's own stream: any process draws the same
        noise = sample_noise(latents, generator, t.noise_offset, t.adaptive_noise_scale,
                             t.multires_noise_iterations, t.multires_noise_discount)  # fmt: skip
        timesteps = sample_timesteps(len(batch), base.noise_scheduler, generator, t.min_timestep,
                                     t.max_timestep).to(self.device)  # fmt: skip
        noisy = noisy_latents(base.noise_scheduler, latents, noise, timesteps, generator, t.ip_noise_gamma)
        with self.accelerator.autocast():
            hidden = self.captions(batch.captions, grad=self.train_text_encoder)
        return StepInputs(latents, noise, timesteps, noisy, hidden)

    def _step_loss(self, batch: Batch, inputs: StepInputs, pred: torch.Tensor) -> torch.Tensor:
        t, scheduler = self.cfg.training, self.base.noise_scheduler
        target = training_target(scheduler, inputs.latents, inputs.noise, inputs.timesteps)
        weights = self.data.loss_weights(batch)
        return diffusion_loss(
            pred, target, scheduler, inputs.timesteps, t.min_snr_gamma, weights,
            loss_type=t.loss_type, huber_schedule=t.huber_schedule, huber_c=t.huber_c,
            huber_scale=t.huber_scale, debiased_estimation=t.debiased_estimation_loss,
        )  # fmt: skip

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
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

    def _optimizer_step(self) -> dict[str, float]:
        """One optimizer step; returns network.scale_weight_norms' scalars to log (if on)."""
        self.parallel.average_gradients(self.network.parameters())
        max_norm = self.cfg.training.max_grad_norm
        if max_norm:
            self.accelerator.clip_grad_norm_(self.network.parameters(), max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.scale_weight_norms()

    def _step_scalars(self, loss: float, seconds: float) -> dict[str, float]:
        scalars = {"loss/step": loss, "time/step_seconds": seconds}
        names = self._param_group_names()
        for name, lr in zip(names, self.lr_scheduler.get_last_lr()):
            scalars[f"lr/{name}"] = lr
        # Adaptive optimizers: the step size they really take (sd-scripts' key; experiment=lr_find reads it).
        for name, lr in zip(names, effective_learning_rates(self.optimizer) or []):
            scalars[f"lr/d*lr/{name}"] = lr
        return scalars

    def _validate(self, epoch: int, metrics: MetricsLog) -> None:
        every = self.cfg.dataset.validate_every_n_epochs
        if self.validator is None or not ((every and epoch % every == 0) or epoch == self.plan.num_epochs):
            return
        loss = self.validator.loss(self.base.unet, self.captions, self.accelerator.autocast, self.device)
        self.result.validation_losses.append(loss)
        metrics.log(self.result.steps, {"loss/validation": loss}, epoch=epoch)
        log.info("epoch %d: validation loss %.5f", epoch, loss)

    # --------------------------------------------------------------- outputs
    def _end_epoch(self, epoch: int) -> None:
        out = self.cfg.output
        is_last = epoch == self.plan.num_epochs
        if out.save_every_n_epochs and epoch % out.save_every_n_epochs == 0 and not is_last:
            path = self.run_dir / f"{out.output_name}-{epoch:06d}.safetensors"
            self._save(path, epoch)
            self.result.checkpoints.append(path)
        every = self.cfg.sampling.sample_every_n_epochs
        if (every and epoch % every == 0) or is_last:
            self.samples.generate(epoch, self.result.steps)

    def _save(self, path: Path, epoch: int) -> None:
        metadata = checkpoint_metadata(self.base_metadata, epoch=epoch, steps=self.result.steps, finished_at=time.time())
        save_lora(path, self.network.kohya_state_dict(), metadata, self.cfg.output.save_precision)
        log.info("saved %s (epoch %d, step %d)", path.name, epoch, self.result.steps)

    def _finish(self) -> None:
        if not self.parallel.is_main:
            return
        path = self.run_dir / f"{self.cfg.output.output_name}.safetensors"
        self._save(path, self.result.epochs)
        self.result.output_file = path
        self.samples.write_grid()
        # The final LoRA supersedes it: a finished run is not resumed.
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)


def _in_eval_mode(method, optimizer: torch.optim.Optimizer):
    """`method` run with the optimizer's eval weights in the model (see eval_weights)."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with eval_weights(optimizer):
            return method(*args, **kwargs)

    return wrapped
