"""Names a sweep gives its jobs' LoRA files, and keys that are never sweep axes."""

from __future__ import annotations

from atelier.sweep.naming import file_suffix, is_bookkeeping, job_names, lora_names, swept_keys


def test_lora_names_carry_the_swept_values():
    jobs = [["optimizer=adamw", "network.dim=4", "debug=smoke"], ["optimizer=prodigy", "network.dim=8", "debug=smoke"]]
    assert lora_names(jobs, "demo") == ["demo_optimizer-adamw_dim-4", "demo_optimizer-prodigy_dim-8"]


def test_lora_names_are_filesystem_safe_and_unique():
    jobs = [["a.b=x/y"], ["a.b=x y"], ["a.b=[1,2]"], ["a.b="]]
    names = lora_names(jobs, "${project}")
    assert names == ["${project}_b-x-y", "${project}_b-x-y_1", "${project}_b-1-2", "${project}_b-empty"]
    for name in names:
        assert set(name.removeprefix("${project}")) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-.+")


def test_two_keys_with_the_same_last_part_keep_their_full_name():
    keys = ["network.lr", "optimizer.lr"]
    assert file_suffix(["network.lr=1", "optimizer.lr=2"], keys) == "network.lr-1_optimizer.lr-2"


def test_a_single_job_and_a_swept_output_name_keep_their_own_name():
    assert lora_names([["debug=smoke"]], "demo") == ["demo"]
    jobs = [["output.output_name=a", "network.dim=4"], ["output.output_name=b", "network.dim=4"]]
    assert lora_names(jobs, ["a", "b"]) == ["a", "b"]


def test_bookkeeping_keys_are_never_axes():
    assert is_bookkeeping("resume") and is_bookkeeping("+hydra.job.chdir") and is_bookkeeping("hydra/launcher")
    assert not is_bookkeeping("network.dim") and not is_bookkeeping("resumed")
    jobs = [["network.dim=4", "resume=true", "hydra.job.chdir=true"], ["network.dim=8", "resume=false"]]
    assert swept_keys(jobs) == ["network.dim"]
    assert job_names(jobs) == ["network.dim=4", "network.dim=8"]
