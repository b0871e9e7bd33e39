"""Step checkpoints and checkpoint rotation, as sd-scripts' --save_every_n_steps,
--save_last_n_epochs and --save_last_n_steps: the files on disk after a real tiny run."""

from __future__ import annotations

import pytest
import torch

from atelier.errors import ConfigError
from atelier.network.lora_file import load_lora
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)


def saved(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.glob("*.safetensors"))


def test_step_checkpoints_keep_the_last_n_steps(tmp_path):
    run_dir, summary = train(tmp_path, "training.max_train_steps=10", "output.save_every_n_epochs=null",
                             "output.save_every_n_steps=2", "output.save_last_n_steps=4")  # fmt: skip
    # Saved at steps 2, 4, 6, 8 (10 is the final LoRA); at step 8 those older than step 4 went.
    assert saved(run_dir) == ["demo-step00000004.safetensors", "demo-step00000006.safetensors",
                              "demo-step00000008.safetensors", "demo.safetensors"]  # fmt: skip
    assert summary["checkpoints"] == ["demo-step00000004.safetensors", "demo-step00000006.safetensors",
                                      "demo-step00000008.safetensors"]  # fmt: skip
    _, meta = load_lora(run_dir / "demo-step00000006.safetensors")
    assert meta["ss_steps"] == "6"


def test_epoch_checkpoints_keep_the_last_n_and_never_the_final_file(tmp_path):
    run_dir, summary = train(tmp_path, "training.max_train_epochs=4", "training.max_train_steps=null",
                             "training.train_batch_size=8", "output.save_every_n_epochs=1",
                             "output.save_last_n_epochs=2")  # fmt: skip
    assert saved(run_dir) == ["demo-000002.safetensors", "demo-000003.safetensors", "demo.safetensors"]
    assert summary["checkpoints"] == ["demo-000002.safetensors", "demo-000003.safetensors"]
    final, _ = load_lora(run_dir / "demo.safetensors")
    assert any(v.abs().sum() > 0 for k, v in final.items() if k.endswith("lora_up.weight"))
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.parametrize("key", ["save_every_n_steps", "save_last_n_epochs", "save_last_n_steps"])
def test_a_count_below_one_names_its_key(key):
    with pytest.raises(ConfigError, match=f"output.{key} must be at least 1"):
        make_cfg(f"output.{key}=0")


def test_step_checkpoints_leave_a_schedule_free_run_as_it_was(tmp_path):
    """The eval/train switch of a schedule-free optimizer rounds its weights: it happens only on
    the steps that save, so a run whose step checkpoints never fall due trains bit for bit alike."""
    common = ["optimizer=adamw_schedulefree", "training.max_train_steps=4", "output.save_every_n_epochs=null"]
    plain, _ = train(tmp_path, *common, name="plain")
    with_option, _ = train(tmp_path, *common, "output.save_every_n_steps=1000", name="option")
    a, _ = load_lora(plain / "demo.safetensors")
    b, _ = load_lora(with_option / "demo.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("value", "why"), [("ckpt", "a pickle, which can run code"), ("pt", "a pickle"),
                                            ("diffusers", "a whole-model folder"), ("onnx", "not a format")])
def test_save_model_as_takes_safetensors_and_says_why_not_the_others(value, why):
    with pytest.raises(ConfigError, match=f"output.save_model_as={value}: {why}.*set output.save_model_as=safetensors"):
        make_cfg(f"output.save_model_as={value}")
    assert make_cfg("output.save_model_as=safetensors").output.save_model_as == "safetensors"



@pytest.mark.parametrize(("epochs", "ratio", "every"), [(10, 3, 3), (10, 4, 2), (5, 2, 2), (5, 5, 1), (5, 9, 1)])
def test_save_n_epoch_ratio_is_sd_scripts_arithmetic(epochs, ratio, every):
    # train_network.py: save_every_n_epochs = floor(num_train_epochs / save_n_epoch_ratio) or 1.
    out = make_cfg(f"output.save_n_epoch_ratio={ratio}").output
    assert out.epochs_between_checkpoints(epochs) == every
    assert make_cfg("output.save_every_n_epochs=4").output.epochs_between_checkpoints(epochs) == 4  # ratio null


def test_save_n_epoch_ratio_replaces_save_every_n_epochs(tmp_path):
    # 9 steps of 2 a epoch: 5 epochs (sd-scripts counts them from max_train_steps too); ratio 2: every 2 epochs.
    run_dir, summary = train(tmp_path, "training.max_train_steps=9", "training.train_batch_size=28",
                             "output.save_every_n_epochs=1", "output.save_n_epoch_ratio=2")  # fmt: skip
    assert saved(run_dir) == ["demo-000002.safetensors", "demo-000004.safetensors", "demo.safetensors"]
    assert load_lora(run_dir / "demo-000004.safetensors")[1]["ss_epoch"] == "4"


def test_save_n_epoch_ratio_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"output.save_n_epoch_ratio must be at least 1 \(or null\), got 0"):
        make_cfg("output.save_n_epoch_ratio=0")
