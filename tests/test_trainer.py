"""The training loop on the tiny model, in-process (fast): what each option does."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

import atelier.config
from atelier.config.schema import AtelierConfig
from atelier.config.typed import run_config
from atelier.objective import steps as steps_module
from atelier.loop.adapter import Adapter
from atelier.loop.build import load_base
from atelier.loop.trainer import NonFiniteLossError, Trainer
from atelier.network.lora_file import load_lora
from atelier.loop.run import run_training
from tests.helpers import REPO_ROOT

@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; tests use several."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield


FAST = ["sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=2"]


def make_cfg(*overrides: str) -> AtelierConfig:
    """The typed config train.py's job would train (atelier.config.typed: the one boundary)."""
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return run_config(compose("config", overrides=[*FAST, *overrides]))


def train(tmp_path, *overrides: str, name: str = "run"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = run_training(make_cfg(*overrides), run_dir)
    return run_dir, summary


def steps_logged(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss/step" in r]


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a, _ = train(tmp_path, "training.max_train_steps=3", name="a")
    b, _ = train(tmp_path, "training.max_train_steps=3", name="b")
    c, _ = train(tmp_path, "training.max_train_steps=3", "training.seed=7", name="c")
    wa, wb, wc = (load_lora(d / "demo.safetensors")[0] for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if k.endswith("lora_up.weight"))
    # Training moved the zero-initialised up weights.
    assert any(wa[k].abs().sum() > 0 for k in wa if k.endswith("lora_up.weight"))


def test_epochs_steps_and_gradient_accumulation(tmp_path):
    # demo: 6 images x6 repeats + 5 x4 = 56 samples; batch 8 -> 7 batches per epoch.
    run_dir, summary = train(
        tmp_path, "training.max_train_epochs=2", "training.train_batch_size=8", "training.gradient_accumulation_steps=3"
    )
    # 2 epochs x ceil(7 / 3) optimizer steps.
    assert summary["steps"] == 2 * math.ceil(7 / 3) == len(steps_logged(run_dir))
    assert summary["epochs"] == 2


def test_max_train_steps_wins_over_epochs(tmp_path):
    run_dir, summary = train(tmp_path, "training.max_train_steps=5", "training.max_train_epochs=10")
    assert summary["steps"] == 5 and summary["epochs"] == 1


def test_epoch_checkpoints_names_and_metadata(tmp_path):
    run_dir, summary = train(
        tmp_path,
        "training.max_train_epochs=3",
        "training.train_batch_size=8",
        "output.save_every_n_epochs=1",
        "output.save_precision=fp16",
        "optimizer.unet_lr=2e-4",
    )
    names = sorted(p.name for p in run_dir.glob("*.safetensors"))
    # The last epoch is the final file, as in sd-scripts.
    assert names == ["demo-000001.safetensors", "demo-000002.safetensors", "demo.safetensors"]
    state, meta = load_lora(run_dir / "demo.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values())
    assert meta["ss_epoch"] == "3" and meta["ss_steps"] == "21" and meta["ss_max_train_steps"] == "21"
    # The embedded model's hashes, as A1111 shows them for the base.
    assert len(meta["ss_new_sd_model_hash"]) == 64 and len(meta["ss_sd_model_hash"]) == 8
    _, first = load_lora(run_dir / "demo-000001.safetensors")
    assert first["ss_epoch"] == "1" and first["ss_steps"] == "7"
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": "{}",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0002",
        "ss_text_encoder_lr": "0.0001",
        "ss_lr_scheduler": "constant",
        "ss_num_epochs": "3",
        "ss_seed": "42",
        "ss_resolution": "(64, 64)",
        "ss_clip_skip": "1",
        "ss_mixed_precision": "no",
        "ss_min_snr_gamma": "None",
        "ss_noise_offset": "None",
        "ss_output_name": "demo",
        "ss_sd_model_name": "tiny-sd15",
        "modelspec.architecture": "stable-diffusion-v1/lora",
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    assert json.loads(meta["ss_tag_frequency"])["6_atelier cube"]["atelier cube"] == 6
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "4_atelier orb": {"n_repeats": 4, "img_count": 5},
        "6_atelier cube": {"n_repeats": 6, "img_count": 6},
    }
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert len(meta["sshs_model_hash"]) == 64


def test_unet_only_and_text_encoder_only(tmp_path):
    unet_dir, _ = train(tmp_path, "training.max_train_steps=1", "network.train_unet_only=true", name="u")
    te_dir, _ = train(tmp_path, "training.max_train_steps=1", "network.train_text_encoder_only=true", name="t")
    unet_keys = load_lora(unet_dir / "demo.safetensors")[0]
    te_keys = load_lora(te_dir / "demo.safetensors")[0]
    assert unet_keys and all(k.startswith("lora_unet_") for k in unet_keys)
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)


def test_a_learning_rate_of_zero_is_a_rate_not_unset(tmp_path):
    """text_encoder_lr=0 freezes the text-encoder modules (their lora_up starts at zero and
    stays there); it once fell back to learning_rate through `or`."""
    run_dir, _ = train(tmp_path, "training.max_train_steps=2", "optimizer.learning_rate=1e-2",
                       "optimizer.text_encoder_lr=0")  # fmt: skip
    state, metadata = load_lora(run_dir / "demo.safetensors")
    ups = {k: v for k, v in state.items() if k.endswith("lora_up.weight")}
    assert all(not v.any() for k, v in ups.items() if k.startswith("lora_te_"))
    assert any(v.any() for k, v in ups.items() if k.startswith("lora_unet_"))
    assert (metadata["ss_text_encoder_lr"], metadata["ss_unet_lr"]) == ("0.0", "0.01")


def test_start_from_weights_reads_rank_and_alpha_from_file(tmp_path):
    first, _ = train(tmp_path, "training.max_train_steps=2", "network.dim=4", "network.alpha=2", name="first")
    cfg = make_cfg("network.dim=16", f"network.weights={first / 'demo.safetensors'}")
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    state = load_lora(first / "demo.safetensors")[0]
    mine = trainer.network.kohya_state_dict()
    assert all(torch.equal(mine[k], state[k]) for k in state)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain, _ = train(tmp_path, "training.max_train_steps=2", name="plain")
    ckpt, _ = train(tmp_path, "training.max_train_steps=2", "training.gradient_checkpointing=true", name="ckpt")
    a, b = load_lora(plain / "demo.safetensors")[0], load_lora(ckpt / "demo.safetensors")[0]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.v_parameterization=true"],
        ["training.min_snr_gamma=5", "training.noise_offset=0.1", "training.clip_skip=2"],
        ["training.mixed_precision=bf16"],
        ["optimizer=prodigy", "scheduler=cosine"],
        ["optimizer=dadapt_adam", "scheduler=cosine_with_restarts"],
        ["optimizer=adamw8bit", "scheduler=linear"],
        ["optimizer=lion", "scheduler=polynomial"],
        ["optimizer=adafactor", "scheduler=constant_with_warmup"],
    ],
)
def test_options_train_with_finite_loss(tmp_path, overrides):
    _, summary = train(tmp_path, "training.max_train_steps=4", *overrides)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert math.isfinite(summary["final_loss"])


def test_v_parameterization_sets_the_target(tmp_path):
    trainer = Trainer(make_cfg("model.v_parameterization=true"), tmp_path)
    trainer.base = load_base(trainer.cfg, trainer.device)
    assert trainer.base.noise_scheduler.config.prediction_type == "v_prediction"


def test_nan_loss_stops_with_step_and_keeps_checkpoints(tmp_path, monkeypatch):
    real_loss = steps_module.diffusion_loss
    calls = {"n": 0}

    def loss_that_breaks(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 10 else loss

    monkeypatch.setattr(steps_module, "diffusion_loss", loss_that_breaks)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = make_cfg("training.max_train_epochs=3", "training.train_batch_size=8", "output.save_every_n_epochs=1")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 10 \(epoch 2\)"):
        run_training(cfg, run_dir)
    checkpoint = run_dir / "demo-000001.safetensors"
    state, meta = load_lora(checkpoint)  # intact and loadable
    assert meta["ss_epoch"] == "1" and all(torch.isfinite(v).all() for v in state.values())
    assert not (run_dir / "demo.safetensors").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "NonFiniteLossError" in summary["reason"]


def test_tensorboard_and_metrics_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = train(tmp_path, "training.max_train_steps=3")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/step", "lr/unet", "lr/text_encoder", "time/step_seconds", "loss/epoch"} <= tags
    assert [e.step for e in events.Scalars("loss/step")] == [1, 2, 3]
    assert len(steps_logged(run_dir)) == 3


def test_trains_a_user_model_from_a_folder_or_a_single_file(tmp_path, tiny_model_path):
    """model.path takes the same loading path as the embedded model."""
    from atelier.models.loading import load_base_model
    from tests.builders import save_single_file

    folder_dir, folder_summary = train(tmp_path, "model=sd15", f"model.path={tiny_model_path}", "model.resolution=64",
                                       "training.max_train_steps=2", name="folder")
    base = load_base_model(str(tiny_model_path))
    single = tmp_path / "tiny.safetensors"
    save_single_file(single, base.unet, base.vae, base.text_encoder)
    file_dir, file_summary = train(tmp_path, "model=sd15", f"model.path={single}", f"model.config={tiny_model_path}",
                                   "model.resolution=64", "training.max_train_steps=2", name="file")
    a, meta = load_lora(folder_dir / "demo.safetensors")
    b, _ = load_lora(file_dir / "demo.safetensors")
    assert all(torch.allclose(a[k], b[k]) for k in a)  # the same weights, loaded two ways
    assert meta["ss_sd_model_name"] == tiny_model_path.name


def interrupt_after_epoch(monkeypatch, epoch: int) -> None:
    """Make the next run raise KeyboardInterrupt in the first step after `epoch` ends."""
    real_end_epoch = Adapter.epoch_outputs

    def end_epoch_then_break(self, finished):
        real_end_epoch(self, finished)
        if finished == epoch:
            monkeypatch.setattr(Adapter, "step_inputs", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))

    monkeypatch.setattr(Adapter, "epoch_outputs", end_epoch_then_break)


def test_interrupted_run_continues_from_its_state_to_the_same_weights(tmp_path, monkeypatch):
    args = ["training.max_train_epochs=3", "training.train_batch_size=8", "output.save_every_n_epochs=null"]
    full, _ = train(tmp_path, *args, name="full")

    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_cfg(*args), run_dir)
    assert (run_dir / "training_state.pt").is_file() and not (run_dir / "demo.safetensors").exists()
    monkeypatch.undo()

    summary = run_training(make_cfg(*args), run_dir)  # started again in the same dir
    assert summary["steps"] == 21 and len(summary["epoch_losses"]) == 3
    a, b = load_lora(full / "demo.safetensors")[0], load_lora(run_dir / "demo.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in steps_logged(run_dir)] == list(range(1, 22))  # no duplicated steps
    assert not (run_dir / "training_state.pt").exists()


def test_state_from_another_config_is_refused(tmp_path):
    from atelier.loop.state import StateMismatchError, config_fingerprint, save_training_state

    save_training_state(tmp_path, {"config_fingerprint": config_fingerprint(make_cfg("network.dim=4"))})
    with pytest.raises(StateMismatchError, match="different config"):
        Trainer(make_cfg("network.dim=8"), tmp_path).train()
