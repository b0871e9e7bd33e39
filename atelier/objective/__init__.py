"""What a step is trained towards: the noise and timesteps drawn for a batch (noise.py: offset,
pyramid and input-perturbation noise, timestep ranges) and the target and loss computed from
the UNet's prediction (losses.py: epsilon or v target, l2/l1/huber, min-SNR and debiased
weights)."""
