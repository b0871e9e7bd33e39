"""[10] point 2: FLUX.1 LoRA training on tiny-flux (model=tiny_flux), the kohya way.

The run goes through the same adapter, loop and outputs as SD's; the family's objective
(atelier.objective.steps.FlowMatchingObjective) draws sd-scripts' flow-matching timesteps, calls
the transformer on packed latents and scores its velocity. The saved file is checked against
diffusers' own kohya FLUX reader on the model that was trained.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from atelier.errors import ConfigError
from atelier.loop.trainer import Trainer
from atelier.network.lora_file import load_lora
from atelier.objective import flow_matching as fm
from atelier.objective.steps import FlowMatchingObjective, flux_prediction
from atelier.conditioning.flux_text import FluxText
from tests.helpers import final_lora, run_train
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged  # noqa: F401  (autouse fixture)

FLUX = ("model=tiny_flux", "sampling.limit=0")


def train_flux(tmp_path, *overrides: str, name: str = "run") -> Trainer:
    run_dir = tmp_path / name
    run_dir.mkdir()
    trainer = Trainer(make_cfg(*FLUX, *overrides), run_dir)
    trainer.train()
    return trainer


def test_tiny_flux_trains_from_the_command_line_into_a_kohya_flux_lora(tmp_path):
    result = run_train("model=tiny_flux", "training.max_train_steps=3", "sampling.steps=2",
                       "sampling.prompts=[atelier cube --g 2.5,atelier cube --l 2 --n blurry]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    state, meta = load_lora(final_lora(tmp_path))
    names = {key.split(".")[0] for key in state}
    # sd-scripts' lora_flux: 10 Linear layers per double block (2 here), 3 per single block (3), CLIP-L's 4 x 2 layers x 6.
    assert sum(n.startswith("lora_unet_double_blocks_") for n in names) == 2 * 10
    assert sum(n.startswith("lora_unet_single_blocks_") for n in names) == 3 * 3
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_2_linear1",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= names  # fmt: skip
    assert all(f"{name}.alpha" in state for name in names)
    expected = {
        "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux", "ss_model_type": "flux",
        "modelspec.architecture": "flux-1-dev/lora", "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "ss_timestep_sampling": "sigma", "ss_discrete_flow_shift": "3.0", "ss_model_prediction_type": "sigma_scaled",
        "ss_guidance_scale": "3.5", "ss_sigmoid_scale": "1.0", "ss_weighting_scheme": "uniform",
        "ss_apply_t5_attn_mask": "False", "ss_v2": "False",
    }  # fmt: skip
    assert {key: meta.get(key) for key in expected} == expected
    assert "modelspec.prediction_type" not in meta  # sd-scripts writes none for FLUX
    losses = [row["loss/step"] for row in steps_logged(tmp_path)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    # Sampled with the family's flow-match Euler at the end, --g as FLUX's guidance.
    records = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert [(r["guidance"], r["sampler"]) for r in records] == [(2.5, "euler"), (3.5, "euler")]
    assert all((tmp_path / "samples" / r["file"]).is_file() for r in records) and (tmp_path / "sample_grid.png").is_file()


def test_sd_runs_carry_no_flux_keys(tmp_path):
    trainer = Trainer(make_cfg("training.max_train_steps=1", "sampling.limit=0"), tmp_path)
    trainer.train()
    _, meta = load_lora(tmp_path / "demo.safetensors")
    assert not {"ss_timestep_sampling", "ss_guidance_scale", "ss_model_type"} & set(meta)
    assert meta["ss_network_module"] == "networks.lora"


@torch.no_grad()
def transformer_output(transformer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    text = FluxText(torch.randn(2, 7, config.joint_attention_dim, generator=generator),
                    torch.randn(2, config.pooled_projection_dim, generator=generator), torch.ones(2, 7))  # fmt: skip
    return flux_prediction(transformer, latents, torch.tensor([300.0, 800.0]), text, guidance=3.5)


def test_the_trained_file_loads_in_diffusers_and_gives_the_trained_models_output(tmp_path, atelier_cache):
    """diffusers' FluxPipeline.load_lora_weights on the run's file, into a fresh tiny-flux, equals
    the in-memory model the run trained (transformer and CLIP-L).

    train_blocks=double: diffusers' kohya FLUX reader hard-codes FLUX.1's single-block linear1
    split, which the tiny model's cannot match (tests/test_flux_lora.py asserts that refusal).
    """
    from diffusers import FluxPipeline

    from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model

    trainer = train_flux(tmp_path, "network.train_blocks=double", "training.max_train_steps=4",
                         "optimizer.learning_rate=0.02", "output.save_precision=float")  # fmt: skip
    ids = torch.tensor([[0, 5, 9, 1, 2]])
    ours = transformer_output(trainer.base.unet)
    with torch.no_grad():
        ours_te = trainer.base.text_encoder(ids).pooler_output

    pipeline = FluxPipeline.from_pretrained(ensure_tiny_model(atelier_cache, TINY_FLUX_NAME))
    base = transformer_output(pipeline.transformer)
    with torch.no_grad():
        base_te = pipeline.text_encoder(ids).pooler_output
    pipeline.load_lora_weights(str(tmp_path / "run" / "demo.safetensors"))
    theirs = transformer_output(pipeline.transformer)
    with torch.no_grad():
        theirs_te = pipeline.text_encoder(ids).pooler_output
    assert (ours - base).abs().max() > 1e-2 and (ours_te - base_te).abs().max() > 1e-3  # training moved both
    # Same products in float32, diffusers folding alpha / rank into its down matrix where we scale
    # the output: equal to rounding (test_flux_lora measured 4.8e-7 / 9.0e-7 on these models).
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs_te, ours_te, rtol=1e-4, atol=1e-5)


# ComfyUI's kohya LoRA rules (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip, load_lora;
# comfy/weight_adapter/lora.py): a model key "diffusion_model.<path>.weight" takes the LoRA module
# "lora_unet_<path with _ for .>", CLIP-L's layer <b>.<layer> the module
# "lora_te1_text_model_encoder_layers_<b>_<layer with _>", and the weight gains
# alpha / rank * up @ down. Written out here from those rules, not imported (ComfyUI is no dependency).
COMFY_CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                     "self_attn.out_proj")  # fmt: skip


def comfy_key_map(model_keys: list[str]) -> dict[str, str]:
    keys = set(model_keys)
    found = {f"lora_unet_{k[len('diffusion_model.'):-len('.weight')].replace('.', '_')}": k
             for k in keys if k.startswith("diffusion_model.") and k.endswith(".weight")}  # fmt: skip
    for b in range(32):
        for layer in COMFY_CLIP_LAYERS:
            key = f"clip_l.transformer.text_model.encoder.layers.{b}.{layer}.weight"
            if key in keys:
                found[f"lora_te1_text_model_encoder_layers_{b}_{layer.replace('.', '_')}"] = key
    return found


def comfy_patch(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> set[str]:
    """ComfyUI's LoRA patch of `weights` (its model keys) in place; the file keys it read."""
    read = set()
    for name, key in comfy_key_map(list(weights)).items():
        if f"{name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        scale = lora[f"{name}.alpha"].item() / down.shape[0]
        weights[key] = weights[key] + scale * (up.flatten(1) @ down.flatten(1)).reshape(weights[key].shape)
        read |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
    return read


def test_the_trained_file_patches_a_comfyui_flux_model_as_trained(tmp_path, atelier_cache):
    """The run's file under ComfyUI's loading rules (BFL key names, kohya math) turns a fresh
    tiny-flux into the model the run trained: every double and single block module (linear1's
    fused rows too, which diffusers' reader cannot split on a tiny model) and CLIP-L's."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from atelier.models.flux_files import flux_transformer_to_bfl, flux_transformer_to_diffusers
    from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model

    trainer = train_flux(tmp_path, "training.max_train_steps=4", "optimizer.learning_rate=0.02",
                         "output.save_precision=float")  # fmt: skip
    lora = load_file(str(tmp_path / "run" / "demo.safetensors"))
    ids = torch.tensor([[0, 5, 9, 1, 2]])
    ours = transformer_output(trainer.base.unet)
    with torch.no_grad():
        ours_te = trainer.base.text_encoder(ids).pooler_output

    pipeline = FluxPipeline.from_pretrained(ensure_tiny_model(atelier_cache, TINY_FLUX_NAME))
    assert (transformer_output(pipeline.transformer) - ours).abs().max() > 1e-2  # training moved it
    comfy = {f"diffusion_model.{k}": v for k, v in flux_transformer_to_bfl(pipeline.transformer.state_dict()).items()}
    # ComfyUI's CLIP-L keys are transformers' older layout (text_model.encoder...; transformers 5 drops text_model.).
    clip_prefix = "clip_l.transformer.text_model."
    clip_keys = {clip_prefix + k.removeprefix("text_model."): k for k in pipeline.text_encoder.state_dict()}
    comfy |= {key: pipeline.text_encoder.state_dict()[k] for key, k in clip_keys.items()}
    read = comfy_patch(comfy, lora)
    assert read == set(lora)  # ComfyUI would warn "lora key not loaded" for any other
    assert any("single_blocks" in k and "linear1" in k for k in read)
    pipeline.transformer.load_state_dict(flux_transformer_to_diffusers(
        {k[len("diffusion_model."):]: v for k, v in comfy.items() if k.startswith("diffusion_model.")}))
    pipeline.text_encoder.load_state_dict({k: comfy[key] for key, k in clip_keys.items()})
    with torch.no_grad():
        theirs_te = pipeline.text_encoder(ids).pooler_output
    # Merged weights against the patched forwards, float32: equal to rounding.
    torch.testing.assert_close(transformer_output(pipeline.transformer), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs_te, ours_te, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks, double, single", [("double", 20, 0), ("single", 0, 9)])
def test_train_blocks_picks_sd_scripts_blocks(tmp_path, blocks, double, single):
    trainer = train_flux(tmp_path, f"network.train_blocks={blocks}", "training.max_train_steps=1",
                         "network.train_unet_only=true")  # fmt: skip
    names = list(trainer.network.loras)
    assert sum(n.startswith("lora_unet_double_blocks_") for n in names) == double
    assert sum(n.startswith("lora_unet_single_blocks_") for n in names) == single
    assert not any(n.startswith("lora_te") for n in names)


@pytest.mark.parametrize("options", [
    ("training.timestep_sampling=uniform", "training.model_prediction_type=raw"),
    ("training.timestep_sampling=sigmoid", "training.sigmoid_scale=2.0", "training.model_prediction_type=additive"),
    ("training.timestep_sampling=shift", "training.discrete_flow_shift=1.5"),
    ("training.timestep_sampling=flux_shift", "training.apply_t5_attn_mask=true", "training.t5xxl_max_token_length=32"),
    ("training.weighting_scheme=logit_normal", "training.logit_mean=0.5", "training.guidance_scale=1.0"),
    ("training.weighting_scheme=cosmap", "training.loss_type=huber", "training.huber_schedule=exponential"),
    ("dataset.validation_split=0.2",),
])  # fmt: skip
def test_every_flow_matching_option_trains(tmp_path, options):
    trainer = train_flux(tmp_path, "training.max_train_steps=2", *options)
    losses = [row["loss/step"] for row in steps_logged(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    _, meta = load_lora(tmp_path / "run" / "demo.safetensors")
    for option in options:
        key, value = option.split("=")
        section, name = key.split(".")
        if section == "training" and f"ss_{name}" in meta:
            assert meta[f"ss_{name}"].lower() == value.lower(), name  # Python's True for YAML's true
    if "dataset.validation_split=0.2" in options:
        assert trainer.result.validation_losses and all(math.isfinite(v) for v in trainer.result.validation_losses)


def test_the_objective_draws_and_scores_as_sd_scripts():
    """FlowMatchingObjective: noise first, then sd-scripts' timesteps and noisy input from the same
    generator; the loss compares noisy - sigma * pred with noise - latents (sigma_scaled)."""
    cfg = make_cfg(*FLUX)
    objective = FlowMatchingObjective(cfg.training, None, guidance_embeds=True)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    inputs = objective.draw(latents, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    noisy, timesteps, sigmas = fm.noisy_input_and_timesteps(latents, noise, generator)  # sd-scripts' defaults
    assert torch.equal(inputs.noise, noise) and torch.equal(inputs.noisy, noisy)
    assert torch.equal(inputs.timesteps, timesteps) and torch.equal(inputs.sigmas, sigmas)
    pred = torch.randn(latents.shape, generator=generator)
    by_hand = ((noisy - sigmas * pred) - (noise - latents)).pow(2).mean()
    torch.testing.assert_close(objective.loss(inputs, pred), by_hand)


def test_the_t5_mask_hides_the_padding_from_the_transformer(atelier_cache):
    """apply_t5_attn_mask: changing the states of masked (padding) tokens changes nothing; without
    the mask they are attended to, as sd-scripts' txt_attention_mask does."""
    from diffusers import FluxTransformer2DModel

    from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model

    transformer = FluxTransformer2DModel.from_pretrained(ensure_tiny_model(atelier_cache, TINY_FLUX_NAME),
                                                         subfolder="transformer")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    states = torch.randn(1, 6, 32, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    other = states.clone()
    other[:, 3:] = torch.randn(1, 3, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    t = torch.tensor([500.0])
    with torch.no_grad():
        masked = [flux_prediction(transformer, latents, t, FluxText(s, pooled, mask), 3.5, True) for s in (states, other)]
        plain = [flux_prediction(transformer, latents, t, FluxText(s, pooled, mask), 3.5, False) for s in (states, other)]
    torch.testing.assert_close(masked[0], masked[1], rtol=0, atol=1e-6)
    assert (plain[0] - plain[1]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (("model=tiny_flux", "training.noise_offset=0.1"), "training.noise_offset=0.1: an SD (DDPM) noise/loss option"),
    (("model=tiny_flux", "training.min_snr_gamma=5"), "training.min_snr_gamma=5.0: an SD (DDPM)"),
    (("model=tiny_flux", "model.v_parameterization=true"), "model.v_parameterization: FLUX.1 predicts a flow velocity"),
    (("model=tiny_flux", "network=loha"), "network.module=loha: FLUX.1 trains kohya LoRA"),
    (("model=tiny_flux", "network.conv_dim=4"), "network.conv_dim=4: not an option of a FLUX.1 LoRA"),
    (("model=tiny_flux", "network.down_lr_weight=sine"), "network.down_lr_weight: block-wise ranks"),
    (("model=tiny_flux", "optimizer.text_encoder_2_lr=1e-5"), "optimizer.text_encoder_2_lr=1e-05: only SDXL"),
    (("model=tiny_flux", "training.loss_type=huber"), "training.huber_schedule=snr reads a DDPM schedule's SNR"),
    (("model=tiny_flux", "dataset.weighted_captions=true"), "dataset.weighted_captions: FLUX.1's CLIP-L and T5"),
    (("training.timestep_sampling=shift",), "training.timestep_sampling=shift: a FLUX.1 option (flux_train_network.py's); SD1"),
    (("training.guidance_scale=1.0",), "training.guidance_scale=1.0: a FLUX.1 option"),
    (("network.train_blocks=single",), "network.train_blocks=single picks FLUX.1's transformer blocks; SD1"),
    (("model.ae=ae.safetensors",), "model.ae is a FLUX.1 file and model.version=sd1"),
    (("model=tiny_flux", "training.sigmoid_scale=0"), "training.sigmoid_scale must be above 0"),
])  # fmt: skip
def test_options_of_the_other_family_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=_escaped(message)):
        make_cfg(*overrides)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_a_typo_in_a_flux_choice_fails_at_compose_time(tmp_path):
    result = run_train("model=tiny_flux", "training.timestep_sampling=sigmoidd", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Invalid value 'sigmoidd', expected one of [sigma, uniform, sigmoid, shift, flux_shift]" in result.stderr
    assert "full_key: training.timestep_sampling" in result.stderr


def test_schnell_has_no_guidance_input_and_t5_reads_256_tokens(tmp_path):
    """A transformer without guidance_embeds (schnell) is given no guidance; T5's default length
    follows the variant (sd-scripts: 256 for schnell, 512 for dev)."""
    from atelier.config.schema.flow_matching import FlowMatchingOptions

    assert FlowMatchingOptions().t5_tokens("schnell") == 256 and FlowMatchingOptions().t5_tokens("dev") == 512
    assert FlowMatchingOptions(t5xxl_max_token_length=77).t5_tokens("dev") == 77
    cfg = make_cfg(*FLUX)
    assert FlowMatchingObjective(cfg.training, None, guidance_embeds=False).guidance is None
    assert FlowMatchingObjective(cfg.training, None, guidance_embeds=True).guidance == 3.5
    trainer = train_flux(tmp_path, "training.max_train_steps=1")
    assert trainer.base.variant == "dev" and trainer.captions.t5_tokens == 512 and trainer.result.steps == 1


def test_tiny_flux_trains_from_the_single_files_flux_users_have(tmp_path, atelier_cache):
    """model=flux1 with model.path = the BFL transformer file, model.ae / clip_l / t5xxl, and
    model.config the diffusers folder for configs and tokenizers (sd-scripts' four files)."""
    from atelier.models.flux_files import write_flux_single_files
    from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model

    from atelier.cli import main

    folder = ensure_tiny_model(atelier_cache, TINY_FLUX_NAME)
    files = write_flux_single_files(folder, tmp_path / "files", transformer_dtype=torch.float32,
                                    t5_dtype=torch.float32, clip_dtype=torch.float32)  # fmt: skip
    # model.config: the folder's configs and tokenizers alone (`atelier skeleton`, no weights).
    assert main(["skeleton", str(folder), str(tmp_path / "configs")]) == 0
    assert not list((tmp_path / "configs").rglob("*.safetensors"))
    model = [f"model.path={files['transformer']}", f"model.ae={files['ae']}", f"model.clip_l={files['clip_l']}",
             f"model.t5xxl={files['t5xxl']}", f"model.config={tmp_path / 'configs'}"]  # fmt: skip
    small = ["model.resolution=64", "model.min_bucket_reso=32", "model.max_bucket_reso=128"]
    trainer = train_flux(tmp_path, "model=flux1", *model, *small, "training.max_train_steps=2")
    from_files = load_lora(tmp_path / "run" / "demo.safetensors")[0]
    # The same weights as the diffusers folder: the same run trained on it gives the same LoRA.
    from_folder = load_lora(train_flux(tmp_path, "training.max_train_steps=2", name="folder").run_dir /
                            "demo.safetensors")[0]  # fmt: skip
    assert trainer.base.variant == "dev" and from_files.keys() == from_folder.keys()
    assert all(torch.equal(from_files[k], from_folder[k]) for k in from_files)

    # A missing part is named with the option that gives it.
    with pytest.raises(Exception, match=r"model.t5xxl=<t5xxl_fp16.safetensors>"):
        train_flux(tmp_path, "model=flux1", *model[:3], f"model.config={folder}", *small, name="missing")


@pytest.mark.parametrize("memory", [
    (),
    ("training.gradient_checkpointing=true",),
    ("training.mixed_precision=bf16", "training.fp8_base=true"),
])  # fmt: skip
def test_the_memory_switches_train(tmp_path, memory):
    """sd-scripts' switches that fit FLUX.1-dev on a 24 GB card, each on tiny-flux: gradient
    checkpointing (the same LoRA as without, to float rounding), fp8 storage of the frozen weights."""
    trainer = train_flux(tmp_path, "training.max_train_steps=2", "optimizer.learning_rate=0.01", *memory)
    losses = [row["loss/step"] for row in steps_logged(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    if "training.fp8_base=true" in memory:
        linears = [m for m in trainer.base.unet.modules() if isinstance(m, torch.nn.Linear)]
        # Every frozen Linear weight is stored in fp8 (atelier.models.fp8_storage), used in bf16.
        assert {m.parametrizations.weight.original0.dtype for m in linears} == {torch.float8_e4m3fn}
        assert {m.weight.dtype for m in linears} == {torch.bfloat16}
    if "training.gradient_checkpointing=true" in memory:
        # SGD: an update proportional to the gradient (Adam's normalisation would blow a 1e-9
        # gradient difference on a near-zero entry up to a full +-lr step).
        sgd = ("optimizer=sgd_nesterov", "optimizer.learning_rate=0.1", "training.max_train_steps=3")
        on, off = train_flux(tmp_path, *sgd, *memory, name="sgd_on"), train_flux(tmp_path, *sgd, name="sgd_off")
        # Recomputed activations are the same operations on the same inputs, the backward sums in
        # another order: the same first loss, and later ones within float32 rounding carried through
        # two updates (test_flux_lora checks the gradients themselves per module).
        on_losses, off_losses = ([row["loss/step"] for row in steps_logged(tmp_path / n)] for n in ("sgd_on", "sgd_off"))
        assert on_losses[0] == pytest.approx(off_losses[0], rel=1e-6)
        assert on_losses == pytest.approx(off_losses, rel=1e-4)
        assert on.network.state_dict().keys() == off.network.state_dict().keys()



def test_cached_text_outputs_train_without_the_text_encoders(tmp_path):
    """dataset.cache_text_encoder_outputs with a frozen CLIP-L: every caption (the held-out ones too)
    is encoded once at setup, so the text encoders can leave the GPU (build.offload_text_encoders)
    and training and validation never call them."""
    from atelier.loop.adapter import Adapter
    from atelier.loop.loop import TrainingLoop

    cfg = make_cfg(*FLUX, "network.train_unet_only=true", "dataset.cache_text_encoder_outputs=true",
                   "dataset.validation_split=0.2", "training.max_train_steps=3")  # fmt: skip
    adapter = Adapter(cfg, tmp_path)
    adapter.setup()
    assert adapter.captions.caching

    def unloaded(*args, **kwargs):
        raise AssertionError("a text encoder was called after its outputs were cached")

    for text_encoder in adapter.base.text_encoders:
        text_encoder.forward = unloaded
    adapter.open_metrics(resumed=False)
    TrainingLoop([adapter]).run()
    assert adapter.result.steps == 3 and adapter.result.validation_losses


def test_a_stopped_flux_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The training state (network, optimizer, RNGs, position) of a FLUX run: SIGTERM at step 3,
    the same command again, the same LoRA as the run that was never stopped."""
    import signal

    from atelier.loop.run import run_training
    from atelier.runtime.signals import StopRequested
    from tests.test_resume import signal_at_forward

    args = (*FLUX, "training.max_train_steps=6", "training.train_batch_size=4", "output.save_every_n_epochs=null")
    plain, stopped = tmp_path / "plain", tmp_path / "stopped"
    plain.mkdir(), stopped.mkdir()
    run_training(make_cfg(*args), plain)
    signal_at_forward(monkeypatch, call=3, sig=signal.SIGTERM)
    with pytest.raises(StopRequested):
        run_training(make_cfg(*args), stopped)
    monkeypatch.undo()
    summary = run_training(make_cfg(*args), stopped)
    assert summary["status"] == "completed" and summary["steps"] == 6
    a, b = (load_lora(d / "demo.safetensors")[0] for d in (plain, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flux_sweep_with_debug_smoke_ends_in_a_report(tmp_path):
    """-m over network.dim with debug=smoke on tiny_flux: every job trains, samples and is reported."""
    from tests.helpers import REPO_ROOT, TRAIN

    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(TRAIN), "-m", "model=tiny_flux", "network.dim=2,4", "debug=smoke",
                             f"hydra.sweep.dir={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    rows = runs["runs"] if isinstance(runs, dict) else runs
    assert len(rows) == 2 and (tmp_path / "report.html").is_file() and (tmp_path / "samples_prompt00.png").is_file()
    for dim in (2, 4):
        state, meta = load_lora(tmp_path / f"network.dim={dim}" / f"demo_dim-{dim}.safetensors")
        assert meta["ss_network_dim"] == str(dim) and meta["ss_base_model_version"] == "flux1"
        assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == dim
