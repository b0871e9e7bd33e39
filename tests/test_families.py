"""Model families as plug-ins: each model.version has one family, its facts are sd-scripts', and
nothing outside atelier/families branches on the version any more.

The end-to-end proof that moving SD1/SD2/SDXL onto the families changed no output is
tests/test_unchanged_outputs.py (the recorded LoRA files, bit for bit, with their metadata).
"""

from __future__ import annotations

import re

import pytest

from atelier.config.schema import ModelVersion
from atelier.families import FAMILIES, FLUX1, family_of, family_of_script, known_scripts, unet_blocks, unet_family
from atelier.families.sd import SD1, SD2, SD_BLOCKS, SDXL, SDXL_BLOCKS
from tests.helpers import REPO_ROOT

# Places that read an SD version themselves, each with why: both are the SD plug-in's loading
# (atelier.plugins.sd), which tells SD1, SD2 and SDXL apart.
READS_THE_VERSION = {
    # An original-layout checkpoint's keys say which SD family it is before anything is loaded.
    "atelier/models/sources.py",
    # The random-weight built-ins are named after the SD family they stand for.
    "atelier/models/random_builtins.py",
}
BRANCH = re.compile(r"[!=]=\s*ModelVersion\.|ModelVersion\.\w+\s*[!=]=|version\s*[!=]=\s*[\"'](?:sd1|sd2|sdxl)[\"']|"
                    r"[\"'](?:sd1|sd2|sdxl)[\"']\s*[!=]=\s*\w*version")  # fmt: skip


def test_every_model_version_has_its_family_and_only_those():
    assert list(FAMILIES) == [version.value for version in ModelVersion]
    for version in ModelVersion:
        assert family_of(version) is family_of(version.value) is FAMILIES[version.value]
    with pytest.raises(ValueError, match="model.version='sd3' is not a known model family; use one of: sd1, sd2, sdxl"):
        family_of("sd3")


@pytest.mark.parametrize(("family", "v", "ss", "architecture", "resolution"), [
    (SD1, False, "sd_v1", "stable-diffusion-v1", 512),
    (SD2, False, "sd_v2", "stable-diffusion-v2-512", 512),
    (SD2, True, "sd_v2_v", "stable-diffusion-v2-768-v", 768),
    (SDXL, False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024),
    (SD1, True, "sd1_v", "sd1_v", 512),  # not one of sd-scripts' names: it writes "<version>_v"
])  # fmt: skip
def test_base_model_names_are_sd_scripts(family, v, ss, architecture, resolution):
    """sd-scripts' train_util.get_sai_model_spec / sai_model_spec.py names and resolutions."""
    base = family.base(v)
    assert (family.base_model_version(v), base.architecture, base.resolution) == (ss, architecture, resolution)


def test_scripts_and_flags_are_sd_scripts():
    assert family_of_script("train_network.py") is SD1
    assert family_of_script("train_network.py", v2=True) is SD2
    assert family_of_script("sdxl_train_network.py") is SDXL
    assert family_of_script("flux_train_network.py") is FLUX1
    assert known_scripts() == ["train_network.py", "sdxl_train_network.py", "flux_train_network.py"]
    assert [f.kohya_v2 for f in (SD1, SD2, SDXL)] == [False, True, False]
    assert [(f.loads_single_files, f.merges_into_single_files) for f in (SD1, SD2, SDXL)] == [
        (True, True), (True, False), (False, False)]  # fmt: skip
    with pytest.raises(ValueError, match="sd3_train_network.py trains no model family"):
        family_of_script("sd3_train_network.py")


def test_block_layouts_count_as_sd_scripts():
    """networks/lora.py: NUM_OF_BLOCKS 12 + NUM_OF_MID_BLOCKS 1 (x2 + 1 = 25); SDXL 9 + 3 and the
    embedding and output conv (23)."""
    assert (SD_BLOCKS.count, SDXL_BLOCKS.count) == (25, 23)
    assert SD1.blocks is SD2.blocks is SD_BLOCKS and SDXL.blocks is SDXL_BLOCKS


def test_a_unet_is_told_by_its_marks_and_width(atelier_cache):
    from diffusers import UNet2DConditionModel

    from atelier.models.tiny import ensure_tiny_model

    tiny = UNet2DConditionModel.from_pretrained(ensure_tiny_model(atelier_cache, "tiny-sd15") / "unet")
    tiny_xl = UNet2DConditionModel.from_pretrained(ensure_tiny_model(atelier_cache, "tiny-sdxl") / "unet")
    assert unet_family(tiny.config) is None  # SD's marks, a width of neither SD1 nor SD2: it stands for both
    assert unet_family(tiny_xl.config) is SDXL
    assert unet_blocks(tiny) is SD_BLOCKS and unet_blocks(tiny_xl) is SDXL_BLOCKS
    assert unet_family({**dict(tiny.config), "cross_attention_dim": 1024}) is SD2
    assert unet_family({**dict(tiny.config), "cross_attention_dim": 768}) is SD1


def test_nothing_outside_the_families_branches_on_the_version():
    found = []
    for path in sorted((REPO_ROOT / "atelier").rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative.startswith("atelier/families/") or relative in READS_THE_VERSION:
            continue
        found += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                  if BRANCH.search(line)]  # fmt: skip
    assert not found, "ask atelier.families instead of branching on the version:\n" + "\n".join(found)


def test_a_unet_of_no_family_is_refused_naming_the_families(tmp_path):
    from types import SimpleNamespace

    from atelier.models.load_errors import ModelLoadError
    from atelier.models.loading import _check_matches_version

    class Config(dict):  # diffusers' configs read both ways
        __getattr__ = dict.__getitem__

    unet = SimpleNamespace(config=Config(addition_embed_type="image", cross_attention_dim=64))
    with pytest.raises(ModelLoadError, match="is not an SD1 model .*set model.path to a base model of one of: "
                                             "sd1, sd2, sdxl"):  # fmt: skip
        _check_matches_version(unet, "sd1", tmp_path)
