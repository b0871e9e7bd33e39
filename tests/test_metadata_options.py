"""[13] point 2, metadata: training_comment, the modelspec.* texts (metadata_title / author /
description / license / tags / trigger_phrase / usage_hint / thumbnail / merged_from / preprocessor /
is_negative_embedding) and no_metadata, where sd-scripts writes them:
train_network.py's metadata dict (ss_training_comment) and library/train_util.get_sai_model_spec
(the modelspec.* keys, also written with --no_metadata, beside SS_METADATA_MINIMUM_KEYS)."""

from __future__ import annotations

import base64
import json

import pytest

from atelier.errors import ConfigError
from atelier.network.lora_file import load_lora
from atelier.outputs.metadata import (
    MINIMUM_KEYS,
    WRITTEN_WHEN_GIVEN,
    checkpoint_metadata,
    thumbnail_data_url,
    training_metadata,
)
from atelier.outputs.run_dir import write_resolved_config
from atelier.tools.export_kohya import build_export, load_run_config
from tests.test_options import compose_config
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (autouse fixture)
from tests.unchanged_outputs import RECORD, VOLATILE

# Two epochs of two batches: an epoch checkpoint (demo-000001) and the final file.
TWO_EPOCHS = ["training.max_train_epochs=2", "training.train_batch_size=28", "output.save_every_n_epochs=1"]
GIVEN = {
    "training_comment": ("ss_training_comment", "first try, 2 epochs"),
    "metadata_title": ("modelspec.title", "Cube style"),
    "metadata_author": ("modelspec.author", "A. Person"),
    "metadata_description": ("modelspec.description", "Draws cubes."),
    "metadata_license": ("modelspec.license", "CC-BY-4.0"),
    "metadata_tags": ("modelspec.tags", "cube,style"),
    "metadata_trigger_phrase": ("modelspec.trigger_phrase", "cubestyle"),
    "metadata_usage_hint": ("modelspec.usage_hint", "Use the word cubestyle"),
    "metadata_thumbnail": ("modelspec.thumbnail", "data:image/png;base64,iVBORw0KGgo="),
    "metadata_merged_from": ("modelspec.merged_from", "cube-a, cube-b"),
    "metadata_preprocessor": ("modelspec.preprocessor", "canny"),
    "metadata_is_negative_embedding": ("modelspec.is_negative_embedding", "no"),
}
OVERRIDES = [f"output.{name}='{value}'" for name, (_, value) in GIVEN.items()]


def saved_files(run_dir) -> list:
    files = sorted(run_dir.glob("*.safetensors"))
    assert [p.name for p in files] == ["demo-000001.safetensors", "demo.safetensors"]
    return files


def test_each_option_is_written_to_the_epoch_checkpoints_and_the_final_file(tmp_path):
    run_dir, _ = train(tmp_path, *TWO_EPOCHS, *OVERRIDES)
    for path in saved_files(run_dir):
        _, meta = load_lora(path)  # checks sshs_model_hash too
        assert {key: meta.get(key) for key, _ in GIVEN.values()} == dict(GIVEN.values()), path.name
        # The rest is as without them: the training keys, the tags of the captions.
        assert meta["ss_output_name"] == "demo" and json.loads(meta["ss_tag_frequency"])
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and "sshs_legacy_hash" in meta
    assert load_lora(run_dir / "demo-000001.safetensors")[1]["ss_epoch"] == "1"


def test_no_metadata_keeps_what_sd_scripts_keeps(tmp_path):
    run_dir, _ = train(tmp_path, *TWO_EPOCHS, *OVERRIDES, "output.no_metadata=true")
    for path in saved_files(run_dir):
        _, meta = load_lora(path)
        ss_keys = {k for k in meta if k.startswith("ss_")}
        # sd-scripts: SS_METADATA_MINIMUM_KEYS (those it has) + get_sai_model_spec + the sshs_* hashes.
        assert ss_keys == set(MINIMUM_KEYS), path.name
        assert set(meta) - ss_keys - {"sshs_model_hash", "sshs_legacy_hash"} == {
            k for k in meta if k.startswith("modelspec.")
        }
        assert "ss_training_comment" not in meta and "ss_tag_frequency" not in meta and "ss_epoch" not in meta
        modelspec = {key: value for key, value in GIVEN.values() if key.startswith("modelspec.")}
        assert {key: meta.get(key) for key in modelspec} == modelspec
        assert meta["ss_network_dim"] == "8" and meta["ss_network_module"] == "networks.lora"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and "modelspec.date" in meta


def test_the_defaults_change_nothing(tmp_path):
    cfg = make_cfg()
    kwargs = {"base_model_name": "base", "optimizer_name": "AdamW", "dataset_dirs": {}, "tag_frequency": {},
              "num_train_images": 1, "num_batches_per_epoch": 1, "num_epochs": 1, "max_train_steps": 1,
              "started_at": 1.0}  # fmt: skip
    meta = training_metadata(cfg, **kwargs)
    assert not set(WRITTEN_WHEN_GIVEN) & set(meta) and meta["modelspec.title"] == cfg.output.output_name
    saved = checkpoint_metadata(meta, epoch=1, steps=1, finished_at=2.0)
    assert saved == checkpoint_metadata(meta, epoch=1, steps=1, finished_at=2.0, no_metadata=False)
    assert set(meta) < set(saved)
    # A default run's file has the keys the unchanged-outputs record has (values: test_unchanged_outputs.py).
    run_dir, _ = train(tmp_path, "training.max_train_steps=2")
    _, written = load_lora(run_dir / "demo.safetensors")
    recorded = next(iter(json.loads(RECORD.read_text())["runs"]["default"].values()))["metadata"]
    kept = {k for k in written if k.startswith(("ss_", "modelspec.")) and k not in VOLATILE}
    assert kept == set(recorded)


def exported_args(run_dir, *overrides: str) -> dict:
    run_dir.mkdir()
    write_resolved_config(run_dir, compose_config(*overrides))
    return build_export(load_run_config(run_dir), run_dir).args


def test_export_kohya_gives_the_options(tmp_path):
    args = exported_args(tmp_path / "given", *OVERRIDES, "output.no_metadata=true")
    assert {name: args.get(name) for name in GIVEN} == {name: value for name, (_, value) in GIVEN.items()}
    assert args["no_metadata"] is True
    args = exported_args(tmp_path / "defaults")
    assert not set(GIVEN) & set(args) and not args.get("no_metadata")


def test_a_thumbnail_file_is_written_as_a_data_url(tmp_path):
    # sd-scripts' file_to_data_url: data:<MIME type from the name>;base64,<the file's bytes>.
    png = tmp_path / "thumb.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert thumbnail_data_url(str(png)) == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    odd = tmp_path / "thumb.unknownext"
    odd.write_bytes(b"x")
    assert thumbnail_data_url(str(odd)) == "data:application/octet-stream;base64,eA=="
    assert thumbnail_data_url("data:,as given") == "data:,as given" and thumbnail_data_url(None) is None
    run_dir, _ = train(tmp_path, "training.max_train_steps=1", f"output.metadata_thumbnail={png}")
    assert load_lora(run_dir / "demo.safetensors")[1]["modelspec.thumbnail"] == thumbnail_data_url(str(png))
    # export-kohya gives sd-scripts the file (it converts it itself).
    assert exported_args(tmp_path / "export", f"output.metadata_thumbnail={png}")["metadata_thumbnail"] == str(png)


def test_a_missing_thumbnail_file_is_refused(tmp_path):
    # sd-scripts warns and writes no thumbnail; here the run does not start.
    with pytest.raises(ConfigError, match="output.metadata_thumbnail=.*no such file"):
        make_cfg(f"output.metadata_thumbnail={tmp_path / 'nothere.png'}")
