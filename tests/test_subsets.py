"""dataset.subsets ([13] point 2): several image folders with their own repeats, caption options
and is_reg, as the [[datasets.subsets]] of sd-scripts' dataset config.

The proof that subsets are read as sd-scripts reads them: the demo's two N_name folders given as
subsets (num_repeats and class_tokens as their names say) train the same LoRA, bit for bit, with
the same ss_* metadata, as train_data_dir does. Then each subset's own options, reg subsets, the
refusals, `atelier dataset check`, and the export/import round trip.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from atelier.cli import main
from atelier.errors import DatasetError, UserError
from tests.helpers import error_lines, final_lora, run_train
from tests.test_dataset_pipeline import data_for, make_images
from tests.test_tools_import import export_run, import_to
from tests.test_trainer import make_cfg

DEMO = Path(__file__).resolve().parents[1] / "atelier" / "assets" / "demo_dataset"
ORB, CUBE = DEMO / "4_atelier orb", DEMO / "6_atelier cube"


def subsets(*entries: dict) -> str:
    """A dataset.subsets override in Hydra's grammar: {key: value, ...}, strings quoted."""

    def value(v: object) -> str:
        if isinstance(v, str):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return json.dumps(v)

    return "dataset.subsets=[" + ",".join(
        "{" + ",".join(f"{k}:{value(v)}" for k, v in entry.items()) + "}" for entry in entries) + "]"


AS_FOLDER_NAMES = subsets({"image_dir": str(ORB), "num_repeats": 4, "class_tokens": "atelier orb"},
                          {"image_dir": str(CUBE), "num_repeats": 6, "class_tokens": "atelier cube"})  # fmt: skip


def tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_the_demo_folders_as_subsets_train_what_train_data_dir_trains(tmp_path):
    common = ["debug=smoke", "sampling.limit=0", "training.max_train_steps=3"]
    folders = run_train(*common, f"hydra.run.dir={tmp_path / 'folders'}")
    as_subsets = run_train(*common, "dataset=subsets", "dataset.name=demo", AS_FOLDER_NAMES,
                           f"hydra.run.dir={tmp_path / 'subsets'}")  # fmt: skip
    assert folders.returncode == 0, folders.stderr[-3000:]
    assert as_subsets.returncode == 0, as_subsets.stderr[-3000:]
    expected, expected_meta = tensors_and_metadata(final_lora(tmp_path / "folders"))
    got, got_meta = tensors_and_metadata(final_lora(tmp_path / "subsets"))
    assert expected.keys() == got.keys()
    assert all(expected[k].equal(got[k]) for k in expected)
    for key in ("ss_dataset_dirs", "ss_tag_frequency", "ss_num_train_images", "ss_num_reg_images"):
        assert got_meta[key] == expected_meta[key], key


def test_each_subset_draws_its_captions_with_its_own_options(tmp_path):
    plain = make_images(tmp_path, "plain", [(64, 64)] * 3, captions=["a, b, c, d"] * 3) / "plain"
    shuffled = make_images(tmp_path, "shuffled", [(64, 64)] * 3, captions=["w, x, y, z"] * 3) / "shuffled"
    data = data_for(
        "dataset=subsets", "dataset.name=mine", "dataset.caption_prefix='pre,'",
        subsets({"image_dir": str(plain), "num_repeats": 2},
                {"image_dir": str(shuffled), "shuffle_caption": True, "keep_tokens": 1, "caption_prefix": "own,"}),
    )  # fmt: skip
    assert data.num_samples == 3 * 2 + 3
    seen: dict[str, set[str]] = {"plain": set(), "shuffled": set()}
    for epoch in range(1, 6):
        for batch in data.epoch(epoch):
            for i, caption in zip(batch.indices, batch.captions):
                seen[data.items[i].folder_name].add(caption)
    # The dataset's prefix, never shuffled; the other subset: its own prefix kept first, the rest shuffled.
    assert seen["plain"] == {"pre, a, b, c, d"}
    assert all(c.startswith("own, ") and sorted(c.split(", ")[1:]) == ["w", "x", "y", "z"] for c in seen["shuffled"])
    assert len(seen["shuffled"]) > 1
    assert not data.static_captions  # one subset shuffles: no text-encoder cache
    assert data.fixed_caption(data.items[-1]) == "own, w, x, y, z"


def test_reg_subsets_are_balanced_and_weighted_like_reg_data_dir(tmp_path):
    train = make_images(tmp_path, "char", [(64, 64)] * 2, captions=["char"] * 2) / "char"
    reg = make_images(tmp_path, "woman", [(64, 64)] * 5) / "woman"
    data = data_for(
        "dataset=subsets", "dataset.name=mine", "dataset.prior_loss_weight=0.5",
        subsets({"image_dir": str(train), "num_repeats": 3},
                {"image_dir": str(reg), "is_reg": True, "class_tokens": "woman"}),
    )  # fmt: skip
    assert data.num_train_items == 2 and data.num_samples == 12  # 6 reg samples balance 2 images x 3 repeats
    assert {data.items[i].caption for i in range(2, len(data.items))} == {"woman"}  # no caption files: class_tokens
    batch = data.epoch(1)[0]
    weights = data.loss_weights(batch).tolist()
    assert all(w == (1.0 if i < 2 else 0.5) for i, w in zip(batch.indices, weights))
    assert list(data.dataset_dirs()) == ["char", "woman"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.train_data_dir=/data/x"], "dataset.train_data_dir=/data/x and dataset.subsets both give"),
    (["dataset.subsets=[{image_dir: /a/x, is_reg: true}]"], "only regularization subsets"),
    (["dataset.subsets=[{image_dir: /a/x}, {image_dir: /b/x}]"], "dataset.subsets[0].image_dir and dataset.subsets[1]"),
    (["dataset.subsets=[{image_dir: /a/x, keep_tokens: -1}]"], "dataset.subsets[0].keep_tokens must not be negative"),
    (["dataset.subsets=[{image_dir: /a/x, num_repeats: 0}]"], "num_repeats must be at least 1"),
    (["dataset.subsets=[]"], "dataset.train_data_dir is null and dataset.subsets is empty"),
])  # fmt: skip
def test_bad_subsets_are_refused_at_the_config_boundary_naming_the_key(overrides, message):
    # In process: the config boundary train.py's job crosses first (the subprocess test below shows the CLI path).
    with pytest.raises(UserError, match=re.escape(message)):
        make_cfg("dataset=subsets", "dataset.name=x", "dataset.subsets=[{image_dir: /a/x}]", *overrides)


def test_a_bad_subset_stops_train_py_before_training(tmp_path):
    result = run_train("dataset=subsets", "dataset.name=x", "dataset.subsets=[{image_dir: /a/x, keep_tokens: -1}]",
                       f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.returncode != 0
    assert any("dataset.subsets[0].keep_tokens must not be negative" in line for line in error_lines(result)), \
        result.stderr[-2000:]


def test_a_subset_key_that_is_dataset_wide_here_is_refused_naming_it(tmp_path):
    result = run_train("dataset=subsets", "dataset.name=x", "dataset.subsets=[{image_dir: /a/x, flip_aug: true}]",
                       f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.returncode != 0 and "Key 'flip_aug' not in 'SubsetConfig'" in result.stderr


def test_a_folder_of_concept_folders_given_as_image_dir_is_refused_naming_it(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.subsets\[0\].image_dir=.* holds concept folders .*4_atelier orb"):
        data_for("dataset=subsets", "dataset.name=x", subsets({"image_dir": str(DEMO)}))


def test_dataset_check_reports_the_subsets(tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ORB, broken)
    (broken / "orb_03.png").write_bytes(b"not a png")
    code = main(["dataset", "check", "dataset=subsets", "dataset.name=x",
                 subsets({"image_dir": str(CUBE), "num_repeats": 6}, {"image_dir": str(broken), "num_repeats": 2})])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1  # the corrupt image would stop training
    assert "broken/orb_03.png" in out and "corrupt image" in out
    assert "6_atelier cube" in out and "images x repeats" in out


def test_export_then_import_gives_back_the_subsets(tmp_path):
    own = [{"image_dir": str(CUBE), "num_repeats": 6, "class_tokens": "atelier cube", "shuffle_caption": True,
            "keep_tokens": 1},
           {"image_dir": str(ORB), "num_repeats": 4, "caption_prefix": "orb", "caption_extension": ".txt"}]  # fmt: skip
    original, run_dir = export_run(tmp_path, "dataset=subsets", "dataset.name=mine", subsets(*own),
                                   "dataset.caption_dropout_rate=0.1")  # fmt: skip
    toml = (run_dir / "kohya_dataset.toml").read_text()
    assert "keep_tokens = 1" in toml and 'caption_prefix = "orb"' in toml
    imported = import_to(tmp_path, run_dir / "kohya_config.toml")
    assert imported["dataset"]["train_data_dir"] is None
    assert imported["dataset"]["subsets"] == original["dataset"]["subsets"]
    assert imported["dataset"]["caption_dropout_rate"] == 0.1 and imported["dataset"]["name"] == "6_atelier cube"


def test_a_dataset_toml_whose_subsets_are_not_n_name_folders_imports_as_subsets(tmp_path, capsys):
    source = tmp_path / "dataset.toml"
    source.write_text(
        "[general]\nresolution = 512\nflip_aug = true\n[[datasets]]\n"
        f"[[datasets.subsets]]\nimage_dir = 'cats'\nnum_repeats = 10\nclass_tokens = 'cat'\ncolor_aug = true\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'dogs'}'\nflip_aug = false\ncustom_attributes = 1\n"
    )  # fmt: skip
    cfg = import_to(tmp_path, source)
    printed = capsys.readouterr().out
    assert cfg["dataset"]["subsets"] == [
        {**_unset(), "image_dir": str(tmp_path / "cats"), "num_repeats": 10, "class_tokens": "cat"},
        {**_unset(), "image_dir": str(tmp_path / "dogs")},
    ]
    assert cfg["dataset"]["name"] == "cats"
    # The same color_aug can only be dataset-wide when all agree: the general value (off) is the other's.
    assert "color_aug per subset" in printed and "flip_aug per subset" in printed
    assert "dogs: custom_attributes=1" in printed


def _unset() -> dict:
    """A dataset.subsets entry's defaults, as the composed config shows them."""
    from dataclasses import asdict

    from atelier.config.schema.subset import SubsetConfig

    return asdict(SubsetConfig(image_dir="?"))
