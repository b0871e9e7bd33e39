"""The training loop: one loop for one adapter (a plain run) or K adapters (a fused group),
what starts it and what it records.

run.py: `run_training`, one job in this process; worker.py: one process of a data-parallel
    run (`python -m atelier.loop.worker <run_dir>`).
adapter.py: `Adapter`, one config's run (its data, plan, network, optimizer, metrics,
    result, state); what the loop calls on it.
build.py: the parts an Adapter is set up from (accelerator, base model, network, optimizer,
    metadata, lr plot).
epochs.py: `draws`, an adapter's batches over its epochs (accumulation groups, resume
    position, data-parallel shards).
inputs.py: a step's UNet inputs and how several adapters' inputs share one UNet call.
loop.py: `TrainingLoop`, the per-step and per-epoch logic, the same for K=1 and K>1.
result.py: `TrainResult` and `EpochProgress`, what a run has done and where it stands.
trainer.py: `Trainer`, a plain run: one Adapter with its network applied, one loop.
validation.py, samples.py, metrics.py, state.py: the validation loss, sample images, the
    metrics log and the training state (resume).
speed.py: speed switches (backends, attention, torch.compile); lr_find.py: the learning-rate
    suggestion read from a finished run's metrics.
"""
