"""[10] point 1: a model family is one plug-in (atelier.plugins), and the run asks it.

- every family has exactly one plug-in, which implements the whole interface;
- on the tiny SD1, SDXL and FLUX models, each plug-in's answers are its family's (loader,
  caption encoder, objective, LoRA modules and their names, sampler, metadata);
- a run asks the plug-in for each of them: a recording plug-in put in place of SD1's sees every
  call of a short training run with samples, and what it returns is what the run uses;
- no code outside atelier/plugins picks behaviour by the family's denoiser or objective.
"""

from __future__ import annotations

import inspect
import re

import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.conditioning.flux_text import FluxCaptionEncoder
from atelier.conditioning.sdxl import SDXLCaptionEncoder
from atelier.families import FAMILIES
from atelier.loop.trainer import Trainer
from atelier.network.lora_file import load_lora
from atelier.objective.steps import DiffusionObjective, FlowMatchingObjective
from atelier.plugins import PLUGINS, FluxPlugin, StableDiffusionPlugin, plugin_of
from atelier.plugins.plugin import FamilyPlugin
from atelier.sampling.flux_samples import FluxSamplePipeline
from atelier.sampling.manifest import SAMPLES_DIR, read_manifest
from tests.helpers import REPO_ROOT, final_lora
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)

# Behaviour picked by what a family is, outside the plug-ins. The config's rules and the tools'
# option export read the facts (they run before a model is loaded); the sampler renders with
# the pipeline the plug-in built, each pipeline kind its own way.
BEHAVIOUR_BRANCH = re.compile(r"\.(denoiser|objective|unet_naming)\s*[!=]=\s*[\"'](?!diffusers)|"
                              r"isinstance\([^)]*Flux[A-Za-z]*(Pipeline|Model)\)")  # fmt: skip
READS_FACTS = {
    "atelier/config/schema/root.py": "the config's rules: FLUX options only with a flow-matching family",
    "atelier/tools/kohya_options.py": "export-kohya writes the flow-matching options only for their script",
    "atelier/sampling/generate.py": "renders with the pipeline the plug-in built (FluxSamplePipeline renders its own)",
}


def test_every_family_has_one_plugin_implementing_the_whole_interface():
    assert list(PLUGINS) == list(FAMILIES)
    for version, plugin in PLUGINS.items():
        assert plugin.facts is FAMILIES[version]
        assert plugin_of(version) is plugin
        assert isinstance(plugin, FamilyPlugin) and not inspect.isabstract(type(plugin))
    assert [type(p) for p in PLUGINS.values()] == [StableDiffusionPlugin] * 3 + [FluxPlugin]
    # Every FLUX-only metadata key is one of FLUX's options or set by its plug-in: none leaks to SD.
    assert "ss_timestep_sampling" in FluxPlugin.own_metadata and not StableDiffusionPlugin.own_metadata


def test_no_code_outside_the_plugins_picks_behaviour_by_the_family():
    found = []
    for path in sorted((REPO_ROOT / "atelier").rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative.startswith(("atelier/plugins/", "atelier/families/")) or relative in READS_FACTS:
            continue
        found += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                  if BEHAVIOUR_BRANCH.search(line)]  # fmt: skip
    assert not found, "ask atelier.plugins.plugin_of(version) instead:\n" + "\n".join(found)
    for relative in READS_FACTS:  # each exception is still needed
        assert BEHAVIOUR_BRANCH.search((REPO_ROOT / relative).read_text()), f"{relative} no longer branches: drop it"


FAMILY_RUNS = {
    "sd1": (("model=tiny",), CaptionEncoder, DiffusionObjective, StableDiffusionPipeline, 7.0),
    "sdxl": (("model=tiny_sdxl",), SDXLCaptionEncoder, DiffusionObjective, StableDiffusionXLPipeline, 7.0),
    "flux1": (("model=tiny_flux",), FluxCaptionEncoder, FlowMatchingObjective, FluxSamplePipeline, 1.0),
}


@pytest.mark.parametrize("version", list(FAMILY_RUNS))
def test_each_plugin_answers_with_its_familys_parts(version):
    overrides, encoder_type, objective_type, pipeline_type, cfg_scale = FAMILY_RUNS[version]
    cfg = make_cfg(*overrides)
    plugin = plugin_of(cfg.model.version)
    assert plugin.facts.version == version
    base = plugin.load(cfg.model)
    assert base.version == version and type(base.unet).__name__ == plugin.facts.denoiser
    encoder = plugin.caption_encoder(base, cfg.training)(base.tokenizers if len(base.tokenizers) > 1 else base.tokenizer,
                                                        base.text_encoders if len(base.text_encoders) > 1 else
                                                        base.text_encoder, clip_skip=1, cache=False,
                                                        autocast=_no_autocast)  # fmt: skip
    assert type(encoder) is encoder_type
    assert type(plugin.objective(cfg.training, base)) is objective_type
    assert type(plugin.sample_pipeline(base, cfg)) is pipeline_type
    assert plugin.sample_cfg_scale(cfg.sampling.cfg_scale) == cfg_scale
    # A scale given is the scale used, for every family (7.0 too: SD's default is no FLUX default).
    for given in (4.5, 7.0):
        assert plugin.sample_cfg_scale(make_cfg(*overrides, f"sampling.cfg_scale={given}").sampling.cfg_scale) == given


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("overrides", [
    ("model=tiny",), ("model=tiny", "network=locon"), ("model=tiny", "network.train_unet_only=true"),
    ("model=tiny_sdxl",), ("model=tiny_flux",), ("model=tiny_flux", "network.train_blocks=double"),
    ("model=tiny_flux", "network.train_text_encoder_only=true"),
])  # fmt: skip
def test_lora_names_are_the_modules_of_the_network_the_plugin_builds(overrides):
    cfg = make_cfg(*overrides)
    plugin = plugin_of(cfg.model.version)
    base = plugin.load(cfg.model)
    net = cfg.network
    network = plugin.network(net, base, unet=not net.train_text_encoder_only, text_encoder=not net.train_unet_only)
    names = plugin.lora_names(base, net)
    assert names == list(network.loras) and names


class RecordingPlugin(StableDiffusionPlugin):
    """SD1's plug-in, noting each call and marking what it returns, to show a run uses it."""

    def __init__(self):
        super().__init__(PLUGINS["sd1"].facts)
        self.calls: list[str] = []

    def _note(self, name, value):
        self.calls.append(name)
        return value

    def load(self, model, cache_dir=None):
        return self._note("load", super().load(model, cache_dir))

    def caption_encoder(self, base, t):
        return self._note("caption_encoder", super().caption_encoder(base, t))

    def objective(self, t, base):
        return self._note("objective", super().objective(t, base))

    def lora_names(self, base, net):
        return self._note("lora_names", super().lora_names(base, net))

    def network(self, net, base, unet, text_encoder):
        return self._note("network", super().network(net, base, unet, text_encoder))

    def sample_cfg_scale(self, given):
        return self._note("sample_cfg_scale", 3.25)  # marked: the samples must carry it

    def check_sample_prompts(self, prompts, sampling):
        return self._note("check_sample_prompts", super().check_sample_prompts(prompts, sampling))

    def sample_clip_skip(self, t):
        return self._note("sample_clip_skip", super().sample_clip_skip(t))

    def sample_pipeline(self, base, cfg):
        return self._note("sample_pipeline", super().sample_pipeline(base, cfg))

    def metadata(self, meta):
        self._note("metadata", None)
        meta["ss_plugin_mark"] = "recorded"  # marked: the saved file must carry it


def test_a_run_asks_the_plugin_for_everything_family_dependent(tmp_path, monkeypatch):
    recorder = RecordingPlugin()
    monkeypatch.setitem(PLUGINS, "sd1", recorder)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Trainer(make_cfg("training.max_train_steps=2", "sampling.sample_every_n_steps=2", "sampling.limit=1"),
            run_dir).train()  # fmt: skip
    asked = set(recorder.calls)
    wanted = {name for name, member in inspect.getmembers(FamilyPlugin) if getattr(member, "__isabstractmethod__", False)}
    # lora_names answers which modules a LoRA targets (checked against the built network above); a
    # run builds the network itself.
    assert wanted - {"lora_names"} <= asked, f"not asked: {sorted(wanted - asked)}"
    assert "metadata" in asked
    assert load_lora(final_lora(run_dir))[1]["ss_plugin_mark"] == "recorded"
    records = read_manifest(run_dir / SAMPLES_DIR)
    assert records and all(record["cfg_scale"] == 3.25 for record in records)
