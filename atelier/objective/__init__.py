"""What a step is trained towards: the noise and timesteps drawn for a batch (noise.py: offset,
pyramid and input-perturbation noise, timestep ranges) and the target and loss computed from
the UNet's prediction (losses.py: epsilon or v target, l2/l1/huber, min-SNR and debiased
weights); for FLUX.1, flow_matching.py: the sigma sampling, noisy input, velocity target,
prediction types, loss weights and token layout of sd-scripts' flow-matching training."""
