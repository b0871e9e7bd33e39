"""One training run's pieces (the loop that drives them is atelier.loop): its start (run.py,
worker.py) and length (plan.py); its data (data.py, latents.py, regularization.py,
dataset_options.py, reuse.py: what a sweep's jobs share); the objective (noise.py,
losses.py); optimisation (optimizers.py, schedulers.py, lr_find.py, lr_plot.py); validation
and samples (validation.py, samples.py); metrics, stop signals and the training state
(metrics.py, signals.py, state.py); data-parallel steps (distributed.py); speed switches and
phase timings (speed.py, phases.py)."""
