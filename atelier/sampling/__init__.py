"""Sample images during training (kohya sd-scripts prompt syntax and file names) and grids.

The prompt syntax and the sampler names are the config's (atelier.config.sample_prompts,
atelier.config.samplers): the config checks them before training.

- `samplers`: the diffusers scheduler of each sd-scripts sampler name.
- `generate`: build a pipeline around the training modules and render samples.
- `flux_samples`: FLUX.1's pipeline and sampler (flow-match Euler, distilled guidance, CFG), as sd-scripts samples FLUX.
- `prompt_text`: a prompt's text for the pipeline, its A1111 weights read as sd-scripts' sampler reads them.
- `manifest`: the `samples.json` record of every sample written.
- `grid`: labelled comparison grids (prompts x epochs, or any rows x columns).
"""
