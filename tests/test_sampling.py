"""Sampling during training: sd-scripts prompt lines, samplers, sample files, grids."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageChops, ImageOps

from atelier.config.sample_prompts import (
    FALLBACK_SEED_BASE,
    SampleDefaults,
    SamplePrompt,
    load_prompt_file,
    parse_prompts,
)
from atelier.config.samplers import SAMPLER_NAMES
from atelier.sampling.samplers import make_scheduler

# ---------------------------------------------------------------- prompt lines


def test_parse_all_options() -> None:
    [p] = parse_prompts("a photo of sks dog --n blurry, lowres --w 640 --h 384 --s 28 --l 5.5 --d 42", SampleDefaults())
    assert p == SamplePrompt("a photo of sks dog", "blurry, lowres", 640, 384, 28, 5.5, 42, 0)


def test_options_in_any_order_and_case() -> None:
    lines = [
        "cat --w 128 --h 64 --d 7 --l 3 --s 5 --n dog",
        "cat --N dog --S 5 --L 3 --D 7 --H 64 --W 128",
    ]
    first, second = parse_prompts(lines, SampleDefaults())
    assert (first.index, second.index) == (0, 1)
    second.index = 0
    assert first == second


def test_defaults_comments_and_blank_lines() -> None:
    text = "# sample prompts\n\nfirst\n   \n  # indented comment\nsecond --s 3\n"
    defaults = SampleDefaults(width=256, height=320, steps=12, cfg_scale=4.0, negative_prompt="ugly", seed=100)
    first, second = parse_prompts(text, defaults)
    assert first == SamplePrompt("first", "ugly", 256, 320, 12, 4.0, 100, 0)
    assert (second.prompt, second.steps, second.index, second.seed) == ("second", 3, 1, 101)


def test_seed_without_d_is_fixed_and_never_random() -> None:
    text = "a\nb --d 5\nc"
    seeds = [p.seed for p in parse_prompts(text, SampleDefaults())]
    assert seeds == [FALLBACK_SEED_BASE, 5, FALLBACK_SEED_BASE + 2]
    assert [p.seed for p in parse_prompts(text, SampleDefaults())] == seeds
    assert [p.seed for p in parse_prompts(text, SampleDefaults(seed=10))] == [10, 5, 12]


def test_size_rounded_down_to_multiple_of_8_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="atelier.config.sample_prompts"):
        [p] = parse_prompts("x --w 515 --h 100", SampleDefaults())
    assert (p.width, p.height) == (512, 96)
    assert "--w 515" in caplog.text and "--h 100" in caplog.text


def test_double_dash_inside_prompt_is_text_and_last_option_wins() -> None:
    [p] = parse_prompts("a -- b, c--d --s 3 --s 4", SampleDefaults())
    assert (p.prompt, p.steps) == ("a -- b, c--d", 4)


def test_per_prompt_sampler() -> None:
    [p, q] = parse_prompts("x --ss Euler_A\ny", SampleDefaults())
    assert (p.sampler, q.sampler) == ("euler_a", None)


@pytest.mark.parametrize(
    ("line", "option"),
    [("cat --w 64 --x 3", "--x"), ("cat --cn control.png", "--cn"), ("cat --w512", "--w512")],
)
def test_unknown_option_names_line_and_option(line: str, option: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_prompts(f"# header\n{line}", SampleDefaults())
    assert "line 2" in str(error.value) and f"unknown option {option};" in str(error.value)


@pytest.mark.parametrize(
    ("line", "option"),
    [("cat --w wide", "--w"), ("cat --s 2.5", "--s"), ("cat --l high", "--l"), ("cat --l nan", "--l"),
     ("cat --d", "--d"), ("cat --d -3", "--d"), ("cat --ss turbo", "--ss")],
)
def test_bad_value_names_line_and_option(line: str, option: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_prompts(["ok", line], SampleDefaults())
    assert "line 2" in str(error.value) and f"option {option}" in str(error.value)


def test_load_prompt_file(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("# c\none --d 1\ntwo\n", encoding="utf-8")
    assert [p.prompt for p in load_prompt_file(file)] == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="sampling.prompt_file"):
        load_prompt_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model's tensors gain nothing from intra-op threads, and on a busy 2-core
    # machine OpenMP threads oversubscribe and spin: measured 10-30x slower with 2 threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def components(tiny_model_path: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(tiny_model_path, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_model_path, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(tiny_model_path, subfolder="tokenizer"),
        "scheduler_config": json.loads((tiny_model_path / "scheduler" / "scheduler_config.json").read_text()),
    }


def make_pipeline(components: dict, sampler: str = "ddim"):
    from atelier.sampling.generate import build_pipeline

    for name in ("unet", "vae", "text_encoder"):
        components[name].eval()
    return build_pipeline(sampler=sampler, **components)


def tiny_prompts(text: str = "a red cube --d 1\na blue ball --n green --l 4") -> list[SamplePrompt]:
    return parse_prompts(text, SampleDefaults(width=64, height=64, steps=2))


def pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.tensor(list(image.convert("RGB").getdata()))


SCIPY = importlib.util.find_spec("scipy") is not None


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_builds_and_renders(components: dict, name: str, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples

    if "lms" in name and not SCIPY:
        with pytest.raises(ImportError, match="scipy"):
            make_pipeline(components, name)
        return
    pipeline = make_pipeline(components, name)
    assert pipeline.safety_checker is None
    [path] = generate_samples(pipeline, tiny_prompts("x --d 3"), tmp_path, "s", 1, 1, "cpu")
    values = pixels(path).float()
    assert values.std() > 0


def test_sampler_classes_and_unknown_name(components: dict) -> None:
    from atelier.sampling.samplers import sampler_name

    config = components["scheduler_config"]
    assert [sampler_name(make_scheduler(n, config)) for n in ("k_euler", "dpmsolver", "dpmsingle")] == [
        "euler", "dpmsolver", "dpmsingle"
    ]
    assert type(make_scheduler("k_euler_a", config)).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("dpmsolver", config).config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++", config).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("ddim", config).config.clip_sample is False
    with pytest.raises(ValueError, match="unknown sampler 'turbo'.*euler_a"):
        make_pipeline(components, "turbo")


SAMPLE_NAME = re.compile(r"^run_e000003_(\d\d)_\d{14}_(\d+)\.png$")


def test_generate_samples_files_and_manifest(components: dict, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples
    from atelier.sampling.manifest import read_manifest

    prompts = tiny_prompts()
    paths = generate_samples(make_pipeline(components), prompts, tmp_path / "sample", "run", 3, 30, "cpu")
    assert [p.parent for p in paths] == [tmp_path / "sample"] * 2
    for path, prompt in zip(paths, prompts):
        match = SAMPLE_NAME.match(path.name)
        assert match, path.name
        assert (int(match[1]), int(match[2])) == (prompt.index, prompt.seed)
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert image.info["parameters"].startswith(prompt.prompt)

    records = read_manifest(tmp_path / "sample")
    assert [r["file"] for r in records] == [p.name for p in paths]
    second = records[1]
    assert {k: second[k] for k in ("index", "prompt", "negative_prompt", "seed", "epoch", "step")} == {
        "index": 1, "prompt": "a blue ball", "negative_prompt": "green", "seed": FALLBACK_SEED_BASE + 1,
        "epoch": 3, "step": 30,
    }
    assert (second["width"], second["height"], second["steps"], second["cfg_scale"]) == (64, 64, 2, 4.0)

    [by_step] = generate_samples(make_pipeline(components), prompts[:1], tmp_path / "sample", "run", None, 500, "cpu")
    assert re.match(r"^run_000500_00_\d{14}_1\.png$", by_step.name)
    assert len(read_manifest(tmp_path / "sample")) == 3


def test_same_seed_same_pixels_different_seed_differs(components: dict, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples

    pipeline = make_pipeline(components, "euler_a")  # ancestral: noise at every step too
    prompts = tiny_prompts("same --d 11\nsame --d 12")
    first = generate_samples(pipeline, prompts, tmp_path / "a", "r", 1, 1, "cpu")
    torch.manual_seed(999)  # the global RNG must not matter
    again = generate_samples(pipeline, prompts, tmp_path / "b", "r", 1, 1, "cpu")
    assert torch.equal(pixels(first[0]), pixels(again[0]))
    assert not torch.equal(pixels(first[0]), pixels(first[1]))


def test_training_state_is_left_as_it_was(components: dict, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples

    pipeline = make_pipeline(components)
    unet, text_encoder = components["unet"], components["text_encoder"]
    lora_like = torch.nn.Dropout(0.5)  # stands for a kohya network: not a child of the UNet
    unet.train()
    text_encoder.encoder.layers[0].train()  # mixed modes inside one module
    modes_seen = []
    hook = unet.register_forward_pre_hook(lambda m, args: modes_seen.append((m.training, lora_like.training)))
    # kohya-style LoRA replaces Linear.forward on the instance; sampling must go through it.
    linear = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    original_forward, patched_calls = linear.forward, []
    linear.forward = lambda x: patched_calls.append(1) or original_forward(x)
    rng_before = torch.get_rng_state()
    try:
        generate_samples(pipeline, tiny_prompts(), tmp_path, "r", 1, 1, "cpu", eval_modules=[lora_like])
    finally:
        hook.remove()
        del linear.forward
    assert set(modes_seen) == {(False, False)}
    assert patched_calls
    assert unet.training and lora_like.training and all(m.training for m in unet.modules())
    assert not text_encoder.training and text_encoder.encoder.layers[0].training
    assert not text_encoder.encoder.layers[1].training
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in unet.parameters())


def test_clip_skip_and_per_prompt_sampler(components: dict, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples
    from atelier.sampling.manifest import read_manifest

    pipeline = make_pipeline(components)
    prompts = tiny_prompts("cat --d 4\ncat --d 4 --ss euler")
    plain = generate_samples(pipeline, prompts, tmp_path / "a", "r", 1, 1, "cpu")
    skipped = generate_samples(pipeline, prompts, tmp_path / "b", "r", 1, 1, "cpu", clip_skip=2)
    assert not torch.equal(pixels(plain[0]), pixels(skipped[0]))
    assert not torch.equal(pixels(plain[0]), pixels(plain[1]))  # the sampler did change
    assert [r["sampler"] for r in read_manifest(tmp_path / "a")] == ["ddim", "euler"]
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"


def test_refuses_modules_on_another_device(components: dict, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples

    with pytest.raises(ValueError, match="unet is on cpu"):
        generate_samples(make_pipeline(components), tiny_prompts(), tmp_path, "r", 1, 1, "cuda")


def test_broken_manifest_is_set_aside(tmp_path: Path) -> None:
    from atelier.sampling.manifest import MANIFEST_NAME, append_manifest, read_manifest

    (tmp_path / MANIFEST_NAME).write_text("[{truncated", encoding="utf-8")
    append_manifest(tmp_path, [{"file": "a.png"}])
    assert read_manifest(tmp_path) == [{"file": "a.png"}]
    assert len(list(tmp_path.glob(f"{MANIFEST_NAME}.broken-*"))) == 1


# ---------------------------------------------------------------- grids


def cell(grid: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    return grid.crop(box)


def test_make_grid_prompts_by_epochs_latest_sample(components: dict, tmp_path: Path) -> None:
    from atelier.sampling.generate import generate_samples
    from atelier.sampling.grid import default_cell_size, grid_layout, make_grid

    pipeline = make_pipeline(components)
    samples = tmp_path / "sample"
    assert make_grid(samples, tmp_path / "grid.png") is None

    prompts = tiny_prompts()
    generate_samples(pipeline, prompts, samples, "r", 1, 10, "cpu")
    epoch2 = generate_samples(pipeline, prompts, samples, "r", 2, 20, "cpu")
    # Epoch 1 sampled again for prompt 0 (e.g. after a resume): the grid shows this one.
    redo = dataclasses.replace(prompts[0], seed=77)
    [latest] = generate_samples(pipeline, [redo], samples, "r", 1, 10, "cpu")

    out = make_grid(samples, tmp_path / "grid.png", title="tiny run")
    assert out == tmp_path / "grid.png"
    grid = Image.open(out).convert("RGB")
    cell_size = default_cell_size([(64, 64)])
    layout = grid_layout(2, 2, cell_size, title="tiny run")
    assert grid.size == layout.size
    width = 2 * layout.margin + layout.label_w + 2 * (layout.gap + layout.cell_w)
    height = 2 * layout.margin + layout.title_h + layout.header_h + 2 * (layout.gap + layout.cell_h)
    assert layout.size == (width, height) and layout.title_h > 0
    expected = {(0, 0): latest, (0, 1): epoch2[0], (1, 1): epoch2[1]}
    for (row, col), path in expected.items():
        want = ImageOps.contain(Image.open(path).convert("RGB"), cell_size, Image.Resampling.LANCZOS)
        assert ImageChops.difference(cell(grid, layout.cell_box(row, col)), want).getbbox() is None


def test_grid_image_missing_cell_and_short_row() -> None:
    from atelier.sampling.grid import MISSING, grid_image, grid_layout

    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    rows = [[red, None, blue], [blue]]
    labels = ["run-a-bs-2-ep-10-op-AdamW-lr-1e-4-net-4-ap-2-" * 3, "run b"]
    grid = grid_image(rows, labels, ["epoch 1", "epoch 2", "epoch 3"], cell_size=(64, 48))
    layout = grid_layout(2, 3, (64, 48))
    assert grid.size == layout.size
    assert cell(grid, layout.cell_box(0, 0)).getcolors() == [(64 * 48, (255, 0, 0))]
    assert cell(grid, layout.cell_box(1, 0)).getcolors() == [(64 * 48, (0, 0, 255))]
    for row, col in [(0, 1), (1, 1), (1, 2)]:
        x0, y0, _, _ = layout.cell_box(row, col)
        assert grid.getpixel((x0 + 1, y0 + 1)) == MISSING
    with pytest.raises(ValueError, match="row labels"):
        grid_image(rows, ["one"], ["e1", "e2", "e3"])
    with pytest.raises(ValueError, match="column labels"):
        grid_image(rows, labels, ["e1"])
