"""sd-scripts' sampling options ([13] point 2): --sample_every_n_steps, --sample_at_first,
prompt files in .txt, .toml and .json as sd-scripts' load_prompts reads them, and --g."""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

import pytest

from atelier.config.sample_prompts import SampleDefaults, load_prompt_file, parse_prompts
from atelier.errors import ConfigError
from atelier.sampling.manifest import SAMPLES_DIR, read_manifest
from tests.test_tools_export import cli, make_run
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)

DEFAULTS = SampleDefaults(width=64, height=64, steps=20, cfg_scale=7.0, seed=100)

# sd-scripts' layout: [prompt] holds what every prompt shares, each [[prompt.subset]] one prompt.
PROMPTS_TOML = """
[prompt]
width = 128
sample_steps = 12
scale = 5.5

[[prompt.subset]]
prompt = "a red cube"
negative_prompt = "blurry"
seed = 7

[[prompt.subset]]
prompt = "a blue sphere"
height = 96
sample_sampler = "euler_a"
guidance_scale = 3.5
"""


def prompts_of(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_prompt_file(path, DEFAULTS)


def test_a_toml_prompt_file_reads_as_sd_scripts_reads_it(tmp_path):
    cube, sphere = prompts_of(tmp_path, "prompts.toml", PROMPTS_TOML)
    assert (cube.prompt, cube.negative_prompt, cube.width, cube.height, cube.steps, cube.cfg_scale, cube.seed) == \
        ("a red cube", "blurry", 128, 64, 12, 5.5, 7)  # height: the run's default
    assert (sphere.width, sphere.height, sphere.sampler, sphere.guidance, sphere.index) == (128, 96, "euler_a", 3.5, 1)
    assert sphere.seed == DEFAULTS.seed + 1  # no seed: the default's, one per prompt position


def test_a_json_prompt_file_takes_lines_and_tables(tmp_path):
    entries = ["a red cube --w 96 --d 3 --g 2.5", {"prompt": "a blue sphere", "scale": 4, "sample_steps": 9}]
    line, table = prompts_of(tmp_path, "prompts.json", json.dumps(entries))
    assert (line.prompt, line.width, line.seed, line.guidance) == ("a red cube", 96, 3, 2.5)
    assert (table.prompt, table.cfg_scale, table.steps, table.guidance, table.index) == ("a blue sphere", 4.0, 9, None, 1)


def test_the_same_prompt_reads_the_same_from_each_kind_of_file(tmp_path):
    txt = prompts_of(tmp_path, "p.txt", "a cube --n dark --w 80 --h 72 --s 5 --l 3 --d 9 --ss dpmsolver++ --g 1.5\n")
    table = {"prompt": "a cube", "negative_prompt": "dark", "width": 80, "height": 72, "sample_steps": 5, "scale": 3,
             "seed": 9, "sample_sampler": "dpmsolver++", "guidance_scale": 1.5}  # fmt: skip
    js = prompts_of(tmp_path, "p.json", json.dumps([table]))
    toml = prompts_of(tmp_path, "p.toml", "[prompt]\n[[prompt.subset]]\n" + "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in table.items()))
    assert txt == js == toml


@pytest.mark.parametrize(("name", "text", "message"), [
    ("p.json", json.dumps([{"prompt": "x", "scael": 4}]), "unknown key `scael`"),
    ("p.json", json.dumps([{"prompt": "x", "controlnet_image": "c.png"}]), "`controlnet_image` is for ControlNet"),
    ("p.json", json.dumps([{"negative_prompt": "x"}]), "needs a `prompt` string"),
    ("p.json", json.dumps([{"prompt": "x", "width": "wide"}]), "option --w needs an integer"),
    ("p.json", json.dumps({"prompt": "x"}), "must hold a JSON list"),
    ("p.toml", "[[prompt]]\nprompt = 'x'\n", "needs a [prompt] table with [[prompt.subset]]"),
    ("p.toml", "[prompt\n", "is not valid TOML"),
    ("p.yaml", "x", "is not a prompt file sd-scripts reads (.txt, .toml, .json)"),
])  # fmt: skip
def test_a_bad_prompt_file_names_the_file_and_the_problem(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as error:
        prompts_of(tmp_path, name, text)
    assert name in str(error.value)


def test_a_prompt_file_error_stops_the_config_with_the_key(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "x", "scael": 4}]))
    with pytest.raises(ConfigError, match=r"sampling.prompt_file: .*unknown key `scael`"):
        make_cfg(f"sampling.prompt_file={path}")


def test_g_is_guidance_and_stays_out_of_sd_sampling(caplog):
    (prompt,) = parse_prompts(["a cube --g 3.5"], DEFAULTS)
    assert prompt.guidance == 3.5 and prompt.cfg_scale == DEFAULTS.cfg_scale
    with pytest.raises(ValueError, match="option --g needs a number"):
        parse_prompts(["a cube --g strong"], DEFAULTS)


@pytest.mark.parametrize(("overrides", "message"), [
    (["sampling.sample_every_n_steps=2"], "sampling.sample_every_n_steps=2 and sampling.sample_every_n_epochs=5 "
                                          "are both set.*set sampling.sample_every_n_epochs=null"),
    (["sampling.sample_every_n_epochs=null", "sampling.sample_every_n_steps=0"], "sample_every_n_steps=0: must be at least 1"),
    (["sampling.sample_every_n_epochs=0"], "sample_every_n_epochs=0: must be at least 1"),
])  # fmt: skip
def test_sampling_schedules_are_checked_before_training(overrides, message):
    # make_cfg's FAST turns epoch sampling off; the first case puts the default back.
    extra = ["sampling.sample_every_n_epochs=5"] if overrides == ["sampling.sample_every_n_steps=2"] else []
    with pytest.raises(ConfigError, match=message):
        make_cfg(*extra, *overrides)


def test_samples_at_first_and_every_n_steps_on_a_real_run(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="atelier.loop.samples"):
        run_dir, summary = train(tmp_path, "training.max_train_steps=5", "sampling.sample_every_n_steps=2",
                                 "sampling.sample_at_first=true", "sampling.prompts=['a cube --g 3']")  # fmt: skip
    assert summary["status"] == "completed"
    records = read_manifest(run_dir / SAMPLES_DIR)
    # Before the first step (named for epoch 0), after steps 2 and 4 (named by step), and
    # after the last step (its epoch's samples, as without the option).
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (None, 2), (None, 4), (summary["epochs"], 5)]
    names = [r["file"] for r in records]
    assert names[0].startswith("demo_e000000_00_") and names[1].startswith("demo_000002_00_")
    assert all((run_dir / SAMPLES_DIR / name).is_file() for name in names)
    assert any("--g" in message and "not used" in message for message in caplog.messages)


def test_a_continued_run_does_not_sample_at_first_again():
    """sample_at_first is about the base model: a run that starts past step 0 has no first step."""
    from atelier.loop.adapter import Adapter
    from atelier.loop.run_start import RunStart

    adapter = Adapter.__new__(Adapter)  # only the fields first_samples_due reads
    adapter.cfg = make_cfg("training.max_train_steps=2", "sampling.sample_at_first=true")
    adapter.result = type("Result", (), {"steps": 3})()
    adapter.parallel = type("Parallel", (), {"is_main": True})()
    adapter.start = RunStart()  # no training.initial_step: a fresh run starts at step 0
    assert not adapter.first_samples_due
    adapter.result.steps = 0
    assert adapter.first_samples_due
    adapter.parallel.is_main = False
    assert not adapter.first_samples_due


def test_export_kohya_maps_the_sampling_options(tmp_path, capsys):
    run_dir = make_run(tmp_path, "debug=smoke", "sampling.sample_every_n_epochs=null", "sampling.sample_every_n_steps=50",
                       "sampling.sample_at_first=true", "sampling.prompts=['a cube --g 2.5']")  # fmt: skip
    assert cli("export-kohya", run_dir) == 0
    printed = capsys.readouterr().out
    config = tomllib.loads((run_dir / "kohya_config.toml").read_text())
    assert config["sample_every_n_steps"] == 50 and config["sample_at_first"] is True
    assert "sample_every_n_epochs" not in config
    assert "--sample_at_first" in printed and "--sample_every_n_steps 50" in printed
    assert "--g 2.5" in (run_dir / "kohya_prompts.txt").read_text()
