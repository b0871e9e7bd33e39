"""sd-scripts' per-step caption options in the data pipeline and in training: enable_wildcard
(multi-line caption files), token_warmup_min/step (the step each batch trains at) and
secondary_separator."""

from __future__ import annotations

from pathlib import Path

from atelier.conditioning.training_data import StepPlace
from atelier.data.dataset import scan_dataset
from tests.test_dataset_pipeline import NO_SAMPLES, data_for, make_images
from tests.test_trainer import fresh_accelerate_state, steps_logged, train  # noqa: F401


def captioned(root: Path, captions: list[str]) -> Path:
    return make_images(root, "2_thing", [(64, 64)] * len(captions), captions=captions)


def test_enable_wildcard_keeps_every_line_of_a_caption_file(tmp_path):
    root = captioned(tmp_path, ["one, x\n\n  two, y  \nthree", "single"])
    assert [item.caption for item in scan_dataset(root).items] == ["one, x", "single"]  # sd-scripts: the first line
    index = scan_dataset(root, all_caption_lines=True)
    assert [item.caption for item in index.items] == ["one, x\ntwo, y\nthree", "single"]
    # ss_tag_frequency counts the tags of every line.
    assert index.tag_frequency() == {"2_thing": {"one": 1, "x": 1, "two": 1, "y": 1, "three": 1, "single": 1}}


def test_wildcard_captions_are_picked_per_step_and_never_cached(tmp_path):
    root = captioned(tmp_path, ["a {red|blue} cube\nan orb", "plain"])
    data = data_for(f"dataset.train_data_dir={root}", "dataset.enable_wildcard=true", batch_size=1)
    assert not data.static_captions
    seen = {caption for epoch in range(1, 11) for batch in data.epoch(epoch) for caption in batch.captions}
    assert seen == {"a red cube", "a blue cube", "an orb", "plain"}


def test_token_warmup_follows_the_optimizer_step_of_each_batch(tmp_path):
    root = captioned(tmp_path, ["t1, t2, t3, t4, t5"])
    data = data_for(f"dataset.train_data_dir={root}", "dataset.token_warmup_step=4", batch_size=1)
    # 2 repeats: batches 0 and 1; with 2 accumulation steps both train at step 2 of the run.
    place = StepPlace(first_step=2, accumulation=2, world_size=1, total_steps=10)
    counts = [len(b.captions[0].split(", ")) for b in data.epoch(2, place)]
    assert counts == [1 + 2 * (5 - 1) // 4] * 2  # floor(step * (tags - min) / warmup) + min
    late = StepPlace(first_step=4, accumulation=1, world_size=1, total_steps=10)
    assert [len(b.captions[0].split(", ")) for b in data.epoch(3, late)] == [5, 5]
    assert place.step_of(5) == 4 and StepPlace(0, 1, 2, 10).step_of(5) == 2  # process j % 2's share


def test_caption_step_options_train(tmp_path):
    root = captioned(tmp_path, ["t1, t2;;;t3, {a|b}, t4\nother, line", "u1, u2, u3"])
    run_dir, summary = train(tmp_path, f"dataset.train_data_dir={root}", "dataset.enable_wildcard=true",
                             "dataset.token_warmup_step=0.5", "dataset.secondary_separator=';;;'",
                             "dataset.shuffle_caption=true", "training.max_train_steps=4", NO_SAMPLES)  # fmt: skip
    assert summary["status"] == "completed" and len(steps_logged(run_dir)) == 4
