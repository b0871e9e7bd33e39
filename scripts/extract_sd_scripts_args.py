"""Write atelier/tools/sd_scripts_args.json: every option of sd-scripts' train_network.py, read
from its source (no sd-scripts import, so none of its dependencies are needed).

    python scripts/extract_sd_scripts_args.py <sd-scripts checkout or bare git dir> [commit]

train_network.py's setup_parser() calls the library's add_*_arguments functions; every
parser.add_argument("--name", ...) in them (and in setup_parser itself) is one option. The
functions' support_* parameters are all true for train_network.py, so every branch counts.
atelier.tools.kohya_coverage reads the file (the coverage table, import-kohya's defaults).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "atelier" / "tools" / "sd_scripts_args.json"
SCRIPT = "train_network.py"
# module path of each add_*_arguments function setup_parser may call, by the name it is called with
LIBRARY_FILES = ("library/train_util.py", "library/utils.py", "library/sai_model_spec.py",
                 "library/deepspeed_utils.py", "library/config_util.py", "library/custom_train_functions.py")


def read(source: Path, commit: str, path: str) -> str:
    if (source / "HEAD").is_file() and not (source / ".git").exists():  # a bare git dir
        return subprocess.run(["git", f"--git-dir={source}", "show", f"{commit}:{path}"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    return (source / path).read_text(encoding="utf-8")


def functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def called_names(function: ast.FunctionDef) -> list[str]:
    names = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            target = node.func
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
            if name and name.startswith("add_") and name.endswith("_arguments"):
                names.append(name)
    return names


def literal(node: ast.AST | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return {"expr": ast.unparse(node)}


def options_in(function: ast.FunctionDef, origin: str) -> list[dict[str, Any]]:
    found = []
    for node in ast.walk(function):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        if not flags:
            continue
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        kind = keywords.get("type")
        help_text = literal(keywords.get("help"))
        found.append({
            "name": flags[0][2:],
            "aliases": [f[2:] for f in flags[1:]],
            "type": ast.unparse(kind) if kind is not None else None,
            "action": literal(keywords.get("action")),
            "nargs": literal(keywords.get("nargs")),
            "default": literal(keywords.get("default")),
            "choices": literal(keywords.get("choices")),
            "help": help_text.split(" / ")[0].strip() if isinstance(help_text, str) else None,
            "defined_in": origin,
        })  # fmt: skip
    return found


def extract(source: Path, commit: str) -> dict[str, Any]:
    library: dict[str, tuple[str, ast.FunctionDef]] = {}
    for path in LIBRARY_FILES:
        for name, function in functions(ast.parse(read(source, commit, path))).items():
            library.setdefault(name, (path, function))
    setup = functions(ast.parse(read(source, commit, SCRIPT)))["setup_parser"]
    options = options_in(setup, SCRIPT)
    for name in called_names(setup):
        path, function = library[name]
        options += options_in(function, f"{path}:{name}")
    unique: dict[str, dict[str, Any]] = {}
    for option in options:
        unique.setdefault(option["name"], option)  # argparse would refuse a second one anyway
    return {"script": SCRIPT, "commit": commit, "options": sorted(unique.values(), key=lambda o: o["name"])}


def main() -> None:
    source = Path(sys.argv[1]).expanduser().resolve()
    commit = sys.argv[2] if len(sys.argv) > 2 else "HEAD"
    if commit == "HEAD" and (source / "HEAD").is_file() and not (source / ".git").exists():
        commit = subprocess.run(["git", f"--git-dir={source}", "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
    data = extract(source, commit)
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(data['options'])} options of {SCRIPT} at {commit}")


if __name__ == "__main__":
    main()
