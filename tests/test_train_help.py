"""`python train.py --help` is our own page: what the tool does, examples, every group and option."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO_ROOT, TRAIN

GROUPS = ["model", "network", "optimizer", "scheduler", "dataset", "training", "sampling", "output", "experiment", "debug"]


def test_help_page_names_examples_groups_and_where_options_are() -> None:
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Kohya-Atelier: train LoRAs")
    assert "Powered by Hydra" not in out  # not Hydra's page
    assert not re.search(r"^\s*schema[:/]", out, re.M) and "schema/" not in out  # no internal group
    for example in ("python train.py debug=smoke", "python train.py -m optimizer=adamw,prodigy",
                    "dataset=folder dataset.train_data_dir=", "experiment=demo", "atelier report --live"):
        assert example in out, example
    listed = {}
    for group in GROUPS:
        match = re.search(rf"^  {group}:\s+(.*?)(?=^  \S|^\n)", out, re.S | re.M)
        assert match, group
        listed[group] = set(re.findall(r"[a-z0-9_]+", match.group(1).split("(")[0]))
        options = {p.stem for p in (REPO_ROOT / "conf" / group).glob("*.yaml")}
        assert options <= listed[group], (group, options - listed[group])
    assert "conf/<group>/<option>.yaml" in out and "--cfg job" in out


def test_readme_commands_run_from_the_venv_as_written() -> None:
    """Each command line in README's code blocks names .venv/bin/ (a plain shell has no `atelier`)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.strip() for line in readme.splitlines()
                if re.match(r"    (\S*/)?(atelier|python|tensorboard|pytest)\b(?!/)", line)]  # fmt: skip
    assert len(commands) > 10
    bare = [c for c in commands if not c.startswith(".venv/bin/")]
    assert not bare, bare
    for tool in {c.split()[0] for c in commands}:
        assert (REPO_ROOT / tool).is_file(), tool  # the setup script made it
