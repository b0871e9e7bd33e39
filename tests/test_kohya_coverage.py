"""docs/kohya-options.md ([13] point 4): every option of sd-scripts' train_network.py with our
key or the reason there is none, generated from the schema and sd_scripts_args.json."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

from atelier.config.options import all_options, sd_scripts_name
from atelier.config.schema import flag_name
from atelier.tools.kohya_coverage import NOT_HERE, REGENERATE, ours_by_flag, render_coverage, sd_scripts_options
from tests.helpers import REPO_ROOT

DOC = REPO_ROOT / "docs" / "kohya-options.md"


def test_every_sd_scripts_option_has_our_key_or_a_reason():
    ours = ours_by_flag()
    unexplained = [name for name in sd_scripts_options() if name not in ours and not NOT_HERE.get(name)]
    assert not unexplained, f"give these an Atelier key (option(flag=...)) or a reason in NOT_HERE: {unexplained}"


def test_a_reason_is_dropped_once_the_option_is_ours():
    stale = sorted(set(NOT_HERE) & set(ours_by_flag()))
    assert not stale, f"these have an Atelier key now: delete them from NOT_HERE: {stale}"
    unknown = sorted(set(NOT_HERE) - set(sd_scripts_options()))
    assert not unknown, f"not options of train_network.py (typo?): {unknown}"


def test_the_options_that_make_no_sense_here_are_said_so():
    for name in ("huggingface_repo_id", "deepspeed", "zero_stage", "xformers", "mem_eff_attn"):
        assert NOT_HERE[name] and "not supported yet" not in NOT_HERE[name], name


def test_every_field_with_an_sd_scripts_name_is_in_the_table():
    table = DOC.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines() if line.startswith("| `--")}
    for option in all_options():
        if option.flag:
            row = rows.get(f"--{flag_name(option.flag)}")
            assert row is not None and f"`{option.key}`" in row, (option.key, sd_scripts_name(option.flag))


def test_the_table_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render_coverage(), f"docs/kohya-options.md is out of date: run {REGENERATE}"


def test_atelier_kohya_options_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "atelier.cli", "kohya-options"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == render_coverage()


def test_the_extractor_reads_every_add_argument_of_setup_parser(tmp_path):
    """scripts/extract_sd_scripts_args.py on a small tree shaped like sd-scripts': options of
    setup_parser and of the library functions it calls, and nothing from functions it does not."""
    (tmp_path / "library").mkdir()
    (tmp_path / "train_network.py").write_text(textwrap.dedent('''
        from library import train_util
        def setup_parser():
            parser = argparse.ArgumentParser()
            train_util.add_training_arguments(parser, True)
            parser.add_argument("--network_dim", type=int, default=None, help="rank / 次元")
            return parser
    '''))
    (tmp_path / "library" / "train_util.py").write_text(textwrap.dedent('''
        def add_training_arguments(parser, support_dreambooth):
            parser.add_argument("--xformers", action="store_true", help="use xformers")
            if support_dreambooth:
                parser.add_argument("--prior_loss_weight", type=float, default=1.0)
        def add_unused_arguments(parser):
            parser.add_argument("--never", type=int)
    '''))
    for name in ("utils", "sai_model_spec", "deepspeed_utils", "config_util", "custom_train_functions"):
        (tmp_path / "library" / f"{name}.py").write_text("")
    spec = importlib.util.spec_from_file_location("extract_sd_scripts_args", REPO_ROOT / "scripts" / "extract_sd_scripts_args.py")
    extractor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extractor)
    data = extractor.extract(tmp_path, "HEAD")
    by_name = {o["name"]: o for o in data["options"]}
    assert sorted(by_name) == ["network_dim", "prior_loss_weight", "xformers"]
    assert by_name["network_dim"]["help"] == "rank" and by_name["network_dim"]["type"] == "int"
    assert by_name["xformers"]["action"] == "store_true" and by_name["prior_loss_weight"]["default"] == 1.0
    assert by_name["prior_loss_weight"]["defined_in"] == "library/train_util.py:add_training_arguments"
