"""One training run: the loop (trainer.py, run.py, plan.py), its data (data.py, latents.py,
caption_encoder.py, text_encoding.py, sdxl_conditioning.py, regularization.py, dataset_options.py),
the objective (noise.py, losses.py), optimisation (optimizers.py, schedulers.py, lr_find.py),
validation and samples, stop signals and the training state (signals.py, state.py), data-parallel
steps and worker processes (distributed.py, worker.py), speed switches and phase timings."""
