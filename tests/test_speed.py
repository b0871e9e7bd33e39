"""Speed switches really change what runs; jobs of one process reuse the base model safely."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from atelier.config.schema import TrainingConfig
from atelier.loop.build import load_base
from atelier.loop.trainer import Trainer
from atelier.network.lora_file import load_lora
from atelier.runtime import reuse
from atelier.data.latents import PixelBatches, PixelJob, PixelLoader
from atelier.loop.speed import apply_backend_settings, is_compiled, optimizer_args
from atelier.utils.lean_imports import hide_peft_and_bitsandbytes_from_diffusers
from tests.helpers import run_train
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def no_reuse_left_over():
    reuse.force_reuse(None)
    yield
    reuse.force_reuse(None)


def loaded(tmp_path, *overrides):
    trainer = Trainer(make_cfg(*overrides), tmp_path)
    trainer.base = load_base(trainer.cfg, trainer.device)
    return trainer


def conv_weights(unet):
    return [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_puts_the_unet_convs_in_nhwc(tmp_path):
    plain = loaded(tmp_path)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(plain.base.unet)
                   if w.shape[-1] > 1)  # fmt: skip
    nhwc = loaded(tmp_path, "training.channels_last=true")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(nhwc.base.unet))


def test_attention_sets_the_processor(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sdpa = loaded(tmp_path)
    assert {type(p) for p in sdpa.base.unet.attn_processors.values()} == {AttnProcessor2_0}
    math_ = loaded(tmp_path, "training.attention=math")
    assert {type(p) for p in math_.base.unet.attn_processors.values()} == {AttnProcessor}
    assert math_.base.text_encoder.config._attn_implementation == "eager"


def test_xformers_without_the_package_says_what_to_do(tmp_path):
    pytest.importorskip("diffusers")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="xformers package"):
        loaded(tmp_path, "training.attention=xformers")


def test_math_and_sdpa_attention_train_to_the_same_weights(tmp_path):
    a, _ = train(tmp_path, "training.max_train_steps=2", name="sdpa")
    b, _ = train(tmp_path, "training.max_train_steps=2", "training.attention=math", name="math")
    wa, wb = load_lora(a / "demo.safetensors")[0], load_lora(b / "demo.safetensors")[0]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_torch_compile_wraps_the_unet_and_trains(tmp_path):
    # backend "eager": Dynamo traces the UNet (LoRA included) without generating kernels.
    trainer = Trainer(make_cfg("training.torch_compile=true", "training.dynamo_backend=eager"), tmp_path)
    trainer.setup()
    assert is_compiled(trainer.base.unet)
    assert not is_compiled(loaded(tmp_path).base.unet)
    run_dir, summary = train(tmp_path, "training.max_train_steps=2", "training.torch_compile=true",
                             "training.dynamo_backend=eager", name="compiled")  # fmt: skip
    plain, _ = train(tmp_path, "training.max_train_steps=2", name="plain")
    assert summary["status"] == "completed"
    wa, wb = load_lora(run_dir / "demo.safetensors")[0], load_lora(plain / "demo.safetensors")[0]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_fused_optimizer_only_where_torch_has_the_kernel(caplog):
    on = TrainingConfig(fused_optimizer=True)
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    assert optimizer_args("AdamW", {}, on, cuda) == {"fused": True}
    assert optimizer_args("AdamW", {}, on, cpu) == {"fused": True}  # torch >= 2.4 (pyproject pins newer)
    assert optimizer_args("SGDNesterov", {}, on, cpu) == {"fused": True}
    with caplog.at_level(logging.INFO, logger="atelier.loop.speed"):
        assert optimizer_args("AdamW", {}, on, meta) == {}
        assert optimizer_args("Prodigy", {}, on, cuda) == {}
    assert "ignored on meta" in caplog.text and "Prodigy has no fused kernel" in caplog.text
    assert optimizer_args("AdamW", {"fused": False}, on, cuda) == {"fused": False}
    assert optimizer_args("AdamW", {}, TrainingConfig(fused_optimizer=False), cuda) == {}


def test_fused_adamw_on_cpu_is_used_and_trains_like_the_loop(tmp_path):
    trainer = Trainer(make_cfg("training.fused_optimizer=true"), tmp_path / "setup")
    trainer.setup()
    assert trainer.optimizer.defaults["fused"] is True
    fused_dir, _ = train(tmp_path, "training.max_train_steps=3", "training.fused_optimizer=true", name="fused")
    loop_dir, _ = train(tmp_path, "training.max_train_steps=3", name="loop")
    fused, loop = load_lora(fused_dir / "demo.safetensors")[0], load_lora(loop_dir / "demo.safetensors")[0]
    assert fused.keys() == loop.keys()
    assert all(torch.allclose(fused[k], loop[k], rtol=1e-4, atol=1e-6) for k in fused)


def test_tf32_is_a_logged_no_op_on_cpu(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="atelier.loop.speed"):
        assert apply_backend_settings(TrainingConfig(allow_tf32=True), torch.device("cpu")) == {"allow_tf32": False}
    assert "no-op" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atelier.loop.speed"):
        loaded(tmp_path, "training.allow_tf32=true")  # the trainer applies it as the model loads
    assert "allow_tf32=true: no-op on cpu" in caplog.text


def _worker_pid(self, job):
    return torch.tensor([os.getpid()])


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_are_kept_across_epochs(persistent, monkeypatch):
    # Workers are forked: they run the patched method and report their process id.
    monkeypatch.setattr(PixelBatches, "__getitem__", _worker_pid)
    loader = PixelLoader(False, False, num_workers=1, persistent_workers=persistent)
    job = PixelJob((), (), (), ())
    epoch1 = {int(t) for t in loader([job, job])}
    epoch2 = {int(t) for t in loader([job, job])}
    assert os.getpid() not in epoch1 and len(epoch1) == 1
    assert (epoch1 == epoch2) == persistent


# ------------------------------------------------------------- process start
NEVER_FOR_LORA = {"peft", "bitsandbytes", "lycoris"}


def imported_packages(importtime_log: str) -> set[str]:
    """Top-level packages named in `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in importtime_log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}  # fmt: skip


def test_a_lora_run_never_imports_peft_or_bitsandbytes(tmp_path, monkeypatch):
    """diffusers and lycoris would import them (~1 s of every process; atelier.utils.lean_imports)."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every import to stderr
    proc = run_train("debug=smoke", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = imported_packages(proc.stderr)
    assert {"torch", "diffusers", "transformers"} <= imported
    assert not imported & NEVER_FOR_LORA


def test_8bit_optimizer_and_lycoris_still_import_what_they_need(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    proc = run_train("debug=smoke", f"hydra.run.dir={tmp_path / 'adamw8bit'}", "optimizer=adamw8bit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert imported_packages(proc.stderr) & NEVER_FOR_LORA == {"bitsandbytes"}
    proc = run_train("debug=smoke", f"hydra.run.dir={tmp_path / 'loha'}", "network=loha")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert imported_packages(proc.stderr) & NEVER_FOR_LORA == NEVER_FOR_LORA  # lycoris imports both


def test_diffusers_is_left_alone_once_a_model_class_is_imported():
    import diffusers.utils
    from diffusers import UNet2DConditionModel  # noqa: F401

    peft_backend = diffusers.utils.USE_PEFT_BACKEND
    assert hide_peft_and_bitsandbytes_from_diffusers() is False
    assert diffusers.utils.USE_PEFT_BACKEND == peft_backend


# --------------------------------------------------------------- reuse in sweeps
def test_second_job_of_a_process_trains_as_if_alone(tmp_path):
    """Job 1 dirties its base (LoRA patches, channels_last, checkpointing, math attention);
    job 2 gets a fresh copy of the kept base and ends with the same weights as alone."""
    job2 = ["training.max_train_steps=3", "network.dim=4", "training.seed=5"]
    alone, _ = train(tmp_path, *job2, name="alone")
    reuse.force_reuse(True)
    train(tmp_path, "training.max_train_steps=2", "training.channels_last=true", "training.attention=math",
          "training.gradient_checkpointing=true", name="job1")  # fmt: skip
    assert len(reuse._BASES) == 1 and reuse._LATENTS
    kept = next(iter(reuse._BASES.values()))[0]
    assert not any(type(m).__name__.endswith("LoRAModule") for m in kept.unet.modules())
    second, summary = train(tmp_path, *job2, name="job2")
    wa, wb = load_lora(alone / "demo.safetensors")[0], load_lora(second / "demo.safetensors")[0]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["phase_seconds"]["model_load"] < 5


def test_a_reused_base_shares_the_kept_weights_in_new_modules(tmp_path):
    reuse.force_reuse(True)
    job = loaded(tmp_path)
    kept = next(iter(reuse._BASES.values()))[0]
    for name in ("unet", "vae", "text_encoder"):
        theirs, ours = getattr(kept, name), getattr(job.base, name)
        assert ours is not theirs
        assert all(a is not b for a, b in zip(ours.modules(), theirs.modules()))
        assert [p.data_ptr() for p in ours.parameters()] == [p.data_ptr() for p in theirs.parameters()]
        assert [b.data_ptr() for b in ours.buffers()] == [b.data_ptr() for b in theirs.buffers()]
    assert job.base.tokenizer is kept.tokenizer


def _counting_loader():
    import types

    calls = []

    def load():
        calls.append(1)
        torch.manual_seed(0)
        return types.SimpleNamespace(tokenizer=None, unet=torch.nn.Linear(4, 4))

    return load, calls


def test_a_job_that_writes_the_kept_weights_makes_the_next_one_reload(caplog):
    reuse.force_reuse(True)
    m, t = make_cfg().model, make_cfg().training
    load, calls = _counting_loader()
    first = reuse._load_or_copy(m, t, load)
    pristine = first.unet.weight.detach().clone()
    second = reuse._load_or_copy(m, t, load)
    assert len(calls) == 1  # untouched: copied, not loaded
    with torch.no_grad():
        second.unet.weight.add_(1.0)  # a (buggy) job writes a frozen base weight in place
    with caplog.at_level(logging.WARNING, logger="atelier.runtime.reuse"):
        third = reuse._load_or_copy(m, t, load)
    assert len(calls) == 2 and "loading it again" in caplog.text
    assert torch.equal(third.unet.weight, pristine)


def test_a_job_moving_its_copy_leaves_the_kept_weights_alone():
    reuse.force_reuse(True)
    m, t = make_cfg().model, make_cfg().training
    load, calls = _counting_loader()
    job = reuse._load_or_copy(m, t, load)
    kept = next(iter(reuse._BASES.values()))[0]
    pristine = kept.unet.weight.detach().clone()
    job.unet.to(torch.bfloat16).requires_grad_(False)  # what a bf16 run does to its frozen base
    assert kept.unet.weight.dtype == torch.float32 and kept.unet.weight.requires_grad
    assert torch.equal(kept.unet.weight, pristine)
    reuse._load_or_copy(m, t, load)
    assert len(calls) == 1


def test_startup_objects_are_frozen_once_per_process():
    """Freezing again later could pin a finished job's cyclic garbage (its model) for good."""
    code = (
        "import gc\n"
        "from atelier.runtime import reuse\n"
        "reuse.freeze_startup_objects()\n"
        "frozen = gc.get_freeze_count()\n"
        "job = [[] for _ in range(1000)]\n"
        "reuse.freeze_startup_objects()\n"
        "print(frozen, gc.get_freeze_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, second = map(int, out.split())
    assert first > 100_000  # torch's import alone makes more
    assert second == first


def test_reuse_only_in_an_in_process_sweep(tmp_path):
    assert not reuse.in_process_sweep()  # no Hydra multirun here
    train(tmp_path, "training.max_train_steps=1", name="a")
    assert not reuse._BASES and not reuse._LATENTS


def test_summary_has_phase_seconds(tmp_path):
    _, summary = train(tmp_path, "training.max_train_steps=2")
    phases = summary["phase_seconds"]
    for name in ("model_load", "latents", "network", "optimizer", "steps", "final_outputs", "other"):
        assert name in phases, phases
    assert sum(phases.values()) == pytest.approx(summary["wall_seconds"], abs=0.05)


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_key_reaches_the_step_encoder(persistent):
    from atelier.conditioning.training_data import TrainingData

    cfg = make_cfg("dataset.random_crop=true", "dataset.max_data_loader_n_workers=1",
                   f"dataset.persistent_data_loader_workers={str(persistent).lower()}")  # fmt: skip
    data = TrainingData(cfg.dataset, 1, 2)
    data.prepare(None, torch.device("cpu"))  # augmented: per-step encoding, the VAE is not read yet
    assert data.step_encoder.pixels._loader.persistent_workers is persistent


def test_a_reused_base_frees_the_previous_jobs_copy_first():
    """In an in-process sweep, the previous job's copy of the base model (kept alive by a
    reference cycle) is freed before the next job's copy is made: two models, not three."""
    import gc
    import types
    import weakref

    reuse.force_reuse(True)
    m, t = make_cfg().model, make_cfg().training

    def load():
        return types.SimpleNamespace(tokenizer=None, unet=torch.nn.Linear(4, 4))

    previous = reuse._load_or_copy(m, t, load)
    previous.cycle = previous
    alive = weakref.ref(previous.unet)
    del previous
    gc.disable()  # only the reuse code may collect
    try:
        reuse._load_or_copy(m, t, load)
        assert alive() is None
    finally:
        gc.enable()
