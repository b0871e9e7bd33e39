"""Nothing changed for users: the default run and a 4-job sweep write the LoRA files recorded
in tests/data/unchanged_outputs.json (tensors bit for bit, ss_* metadata but the times).

The record was made before a refactor, on the commit it names (tests/unchanged_outputs.py
says how to record again). A refactor that changes a single weight bit, a tensor name or a
metadata value fails here.
"""

from __future__ import annotations

import json

import pytest

from tests.unchanged_outputs import RECORD, REPO_ROOT, platform_fingerprint, produce


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict:
    return produce(REPO_ROOT, tmp_path_factory.mktemp("unchanged"))


def test_the_same_files_with_the_same_tensor_layout_and_metadata(recorded, produced):
    assert len(recorded["runs"]["default"]) == 1 and len(recorded["runs"]["sweep"]) == 4
    assert {run: sorted(jobs) for run, jobs in produced.items()} == {
        run: sorted(jobs) for run, jobs in recorded["runs"].items()
    }
    for run, jobs in recorded["runs"].items():
        for job, old in jobs.items():
            new = produced[run][job]
            assert new["layout"] == old["layout"], f"{run}/{job}: tensor names, dtypes or shapes changed"
            changed = {k: (old["metadata"].get(k), new["metadata"].get(k))
                       for k in old["metadata"].keys() | new["metadata"].keys()
                       if old["metadata"].get(k) != new["metadata"].get(k)}  # fmt: skip
            assert not changed, f"{run}/{job}: metadata changed (recorded, now): {changed}"


def test_the_same_tensor_values_bit_for_bit(recorded, produced):
    # One record per platform the values were recorded on (bit-identical only on the same kernels).
    records = [json.loads(path.read_text()) for path in sorted(RECORD.parent.glob(f"{RECORD.stem}*.json"))]
    here = [r for r in records if r["platform"] == platform_fingerprint()]
    if not here:
        pytest.skip(
            f"values were recorded on {[r['platform'] for r in records]}, this is {platform_fingerprint()}: record "
            f"them here with `python -m tests.unchanged_outputs --commit {recorded['commit'][:12]} --out "
            f"{RECORD.parent / (RECORD.stem + '.<cpu>.json')}`"
        )
    recorded = here[0]
    for run, jobs in recorded["runs"].items():
        for job, old in jobs.items():
            assert produced[run][job]["values"] == old["values"], f"{run}/{job}: a weight changed"
