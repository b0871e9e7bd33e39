"""Pruning inside the training loop: a run linked to a search trial reports its validation
loss, and the trial's pruner stops it (atelier.search.trial_link, atelier.loop.loop).

The pruner is Optuna's real MedianPruner over a real study in SQLite. What it compares the
runs with is one finished reference trial whose intermediate values the test sets between
the lanes' own validation losses (measured by solo runs first), so which lane falls behind
is known without depending on the numerics of any one platform.
"""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from atelier.errors import ConfigError
from atelier.fused.trainer import FusedTrainer
from atelier.network.lora_file import load_lora
from atelier.search.settings import PrunerSettings
from atelier.search.study import open_study, storage
from atelier.search.tell import start_trial
from tests.test_fused import LANES, assert_same_weights
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)

STEPS = 6
EVERY = 2  # validation (and a report to the trial) every 2 steps: at steps 2 and 4; step 6 is the result
COMMON = ["network.train_unet_only=true", f"training.max_train_steps={STEPS}", "sampling.limit=1",
          "dataset.validation_split=0.25", f"dataset.validate_every_n_steps={EVERY}"]  # fmt: skip


def validation_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/validation"] for r in rows if "loss/validation" in r}


def make_study(sweep_dir, reference: dict[int, float]) -> optuna.Study:
    """A study whose median pruner compares each run with one finished trial (`reference`)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(sweep_dir, storage(sweep_dir), "minimize", pruner=PrunerSettings("median", n_startup_trials=1))
    study.add_trial(optuna.trial.create_trial(value=min(reference.values()), intermediate_values=reference))
    return study


def test_validation_every_n_steps(tmp_path):
    run_dir, summary = train(tmp_path, *COMMON, *LANES[0])
    assert sorted(validation_losses(run_dir)) == [2, 4, 6]  # 6: the last epoch's end (the run's end)
    assert summary["status"] == "completed" and summary["best_validation_loss"] == min(validation_losses(run_dir).values())


def test_a_run_its_trial_prunes_stops_and_keeps_its_lora(tmp_path):
    alone, _ = train(tmp_path, *COMMON, *LANES[0], name="alone")
    at_2 = validation_losses(alone)[2]
    sweep = tmp_path / "sweep"
    study = make_study(sweep, {2: at_2 / 2, 4: at_2 / 2})  # the reference is far better: prune at step 2
    trial = start_trial(study, "job", [])
    run_dir = sweep / "job"
    run_dir.mkdir()
    from atelier.loop.run import run_training

    summary = run_training(make_cfg(*COMMON, *LANES[0], f"trial={trial.number}"), run_dir)
    assert summary["status"] == "pruned" and "pruned by its search trial at step 2" in summary["reason"]
    assert summary["steps"] == 2 and summary["output_file"] is None
    assert summary["checkpoints"] == ["demo-pruned.safetensors"]
    assert not (run_dir / "training_state.pt").exists()
    assert study.trials[trial.number].intermediate_values == {2: pytest.approx(at_2)}
    # The pruned LoRA is the run's weights at step 2: a run of 2 steps saves the same.
    two, _ = train(tmp_path, *[o for o in COMMON if "max_train_steps" not in o], "training.max_train_steps=2",
                   *LANES[0], name="two")  # fmt: skip
    pruned, _ = load_lora(run_dir / "demo-pruned.safetensors")
    expected, _ = load_lora(two / "demo.safetensors")
    assert all(torch.equal(pruned[k], expected[k]) for k in expected)


def test_a_trial_without_its_study_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from atelier.loop.run import run_training

    with pytest.raises(ConfigError, match=r"trial=3: there is no study at .*study\.db"):
        run_training(make_cfg(*COMMON, "trial=3"), run_dir)
    with pytest.raises(ConfigError, match="dataset.validation_split is 0"):
        make_cfg("trial=3")


def test_a_pruned_lane_leaves_the_batch_and_the_others_equal_their_solo_runs(tmp_path):
    """Successive halving inside one pass: the lane that falls behind leaves at its report,
    the group goes on with the others, whose final weights equal the same configs alone."""
    solos = [train(tmp_path, *COMMON, *lane, name=f"solo{i}")[0] for i, lane in enumerate(LANES)]
    at_2 = [validation_losses(d)[2] for d in solos]
    worst = max(range(len(LANES)), key=lambda i: at_2[i])
    others = sorted(at_2)[:-1]
    assert at_2[worst] > others[-1], "two lanes tie at step 2: pick other lanes"
    # Between the worst lane and the next: only the worst is above the median at step 2;
    # at step 4 the reference is out of reach (nobody else is pruned).
    sweep = tmp_path / "sweep"
    study = make_study(sweep, {2: (at_2[worst] + others[-1]) / 2, 4: 1e9})
    trials = [start_trial(study, f"lane{i}", []).number for i in range(len(LANES))]
    cfgs = [make_cfg(*COMMON, *lane, f"trial={n}") for lane, n in zip(LANES, trials)]
    dirs = [sweep / f"lane{i}" for i in range(len(LANES))]
    trainer = FusedTrainer(cfgs, dirs)
    lanes_per_pass: list[list[int]] = []
    fused = trainer.router.fused

    def recording(lanes_and_sizes):
        lanes_per_pass.append([lane for lane, _ in lanes_and_sizes])
        return fused(lanes_and_sizes)

    trainer.router.fused = recording
    summaries = trainer.train()

    states = ["pruned" if i == worst else "completed" for i in range(len(LANES))]
    assert [s["status"] for s in summaries] == states
    assert summaries[worst]["steps"] == 2 and (dirs[worst] / "demo-pruned.safetensors").is_file()
    # Its rows left the batch at the next step; the group went on to the end.
    assert [worst in lanes for lanes in lanes_per_pass] == [True, True] + [False] * (STEPS - 2)
    assert trainer.fused_steps == STEPS
    for i in range(len(LANES)):
        if i != worst:
            got, _ = load_lora(dirs[i] / "demo.safetensors")
            expected, _ = load_lora(solos[i] / "demo.safetensors")
            print(f"lane {i}: largest weight gap vs solo {assert_same_weights(got, expected):.3g}")
            assert study.trials[trials[i]].intermediate_values.keys() == {2, 4}
