"""Sample images during training (kohya sd-scripts prompt syntax and file names) and grids.

- `prompts`: parse sample prompt lines into `SamplePrompt`s.
- `samplers`: sd-scripts sampler names -> diffusers schedulers.
- `generate`: build a pipeline around the training modules and render samples.
- `manifest`: the `samples.json` record of every sample written.
- `grid`: labelled comparison grids (prompts x epochs, or any rows x columns).
"""
