"""The post-training tools as `atelier` subcommands.

Each tool's module (atelier/tools/<tool>.py) is imported only when it runs, so
`atelier --help` stays fast. Every tool that writes refuses to replace an existing
output without --force, and writes atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import importlib

SAVE_PRECISIONS = ("float", "fp16", "bf16")

RESIZE_EPILOG = """\
examples:
  atelier resize mychar.safetensors mychar-r8.safetensors --rank 8
  atelier resize mychar.safetensors mychar-dyn.safetensors --dynamic sv_fro --param 0.9 --rank 32

Per module, W = up @ down * alpha / rank is factored by SVD and its top k singular
values kept: up = U_k sqrt(S_k), down = sqrt(S_k) Vh_k, alpha = k * old_alpha / old_rank
(the truncated W exactly; the alpha/rank ratio unchanged). Dynamic k per module:
  sv_ratio X       keep singular values > largest / X
  sv_cumulative X  smallest k whose singular values sum to >= X of the total
  sv_fro X         smallest k keeping >= X of the Frobenius norm
with --rank as the upper bound. Prints the Frobenius norm fraction each module keeps.
"""

IMPORT_EPILOG = """\
examples:
  atelier import-kohya my_lora_config.toml           # sd-scripts --config_file (its dataset_config too)
  atelier import-kohya "SDXL - LoHA v1.0.json"        # a kohya_ss GUI config
  atelier import-kohya train_command.sh --name mychar # a saved accelerate launch ... command line
  python train.py experiment=mychar                   # train it
  python train.py -m experiment=mychar network.dim=16,32   # or sweep around it

Options with no Atelier equivalent are listed, never dropped; options the source left out get
sd-scripts' defaults, so the run trains what the source did.
"""

MERGE_EPILOG = """\
examples:
  # LoRAs into a base checkpoint (SD1 single file, original layout): a new checkpoint
  atelier merge v1-5-pruned.safetensors mychar.safetensors style.safetensors --ratios 0.8 0.5 -o merged.safetensors
  # FLUX.1 LoRAs into the BFL transformer file (or a diffusers FLUX.1 folder): a BFL transformer file
  atelier merge flux1-dev.safetensors myflux.safetensors -o flux1-dev-myflux.safetensors
  # ... and its CLIP-L modules into clip_l.safetensors
  atelier merge flux1-dev.safetensors myflux.safetensors -o flux1-dev-myflux.safetensors \\
      --clip-l clip_l.safetensors --clip-l-output clip_l-myflux.safetensors
  # several LoRAs into one LoRA (ranks concatenated, exact)
  atelier merge --loras mychar.safetensors style.safetensors --ratios 0.7 0.3 -o mixed.safetensors

Into a checkpoint: W += ratio * up @ down * alpha / rank for every module; keys, dtypes and
metadata of the checkpoint are kept. The UNet layout is read from the checkpoint, or from
--config (a diffusers folder of the same base model, or `atelier skeleton` of one).
Into FLUX.1 (as sd-scripts' flux_merge_lora.py): the transformer modules are merged and one BFL
transformer file is written (a diffusers folder's fused qkv / linear1 updates split by rows onto
its q, k, v, MLP Linears); CLIP-L modules go into --clip-l's file, written to --clip-l-output
(without them they are left out: the transformer file holds no CLIP-L).
"""

CHECK_EPILOG = """\
example:
  atelier check mychar.safetensors
  atelier check mychar.safetensors --flagged-only

Per module: shapes, rank, alpha, ||up @ down * alpha / rank||, mean |w| of down and up.
Flags: ZERO (the module changes nothing), NaN/Inf. Exit status 1 when any module has
NaN/Inf weights, else 0.
"""

INFO_EPILOG = """\
example:
  atelier info outputs/demo/runs/2026-11-21_16-14-14/demo.safetensors
  atelier info mychar.safetensors --json | jq '.metadata.ss_tag_frequency'

Shows the tensor summary (modules, ranks, dtypes) and the metadata, with JSON-valued
fields (ss_tag_frequency, ss_dataset_dirs, ss_bucket_info, ss_network_args) decoded.
"""

EXPORT_EPILOG = """\
example:
  atelier export-kohya outputs/demo/runs/2026-11-21_16-14-14
  -> prints the `accelerate launch train_network.py ...` command of the run, and writes
     kohya_config.toml (--config_file), kohya_dataset.toml (--dataset_config) and
     kohya_prompts.txt (--sample_prompts) into the run dir (or --out)

Options with no sd-scripts equivalent are listed at the end.
"""

SKELETON_EPILOG = """\
example:
  atelier skeleton /models/stable-diffusion-v1-5 /models/sd15-configs
  python train.py model=sd15 model.path=/models/my-model.safetensors model.config=/models/sd15-configs

Copies model_index.json, every component's config, the scheduler config and the tokenizer
files: no weights (a few hundred KB). Use it as model.config to load single-file
checkpoints of that architecture offline.
"""

CONVERT_EPILOG = """\
example:
  atelier convert-ckpt v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors --allow-pickle

A .ckpt is a Python pickle: unpickling one can run code hidden in it. With --allow-pickle
it is read with torch's restricted (weights-only) unpickler, and any non-tensor object it
names is replaced by an inert stub, so no code from the file runs; the tensors are written
unchanged to .safetensors.
"""


def _lazy(module: str, name: str):
    def run(args: argparse.Namespace) -> int:
        from atelier.tools.common import fail_cleanly

        tool = importlib.import_module(f"atelier.tools.{module}")
        return fail_cleanly(name, lambda: tool.run(args))

    return run


def _parser(subparsers: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str):
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(subparsers, "resize", "lower a LoRA's rank by SVD (fixed or dynamic per module)",
                "Resize a kohya LoRA: SVD of each module's update, keep the top singular values.", RESIZE_EPILOG)  # fmt: skip
    p.add_argument("input", help="the LoRA .safetensors file")
    p.add_argument("output", help="the resized LoRA to write")
    p.add_argument("--rank", type=_positive_int, metavar="N", help="new rank (with --dynamic: the largest rank kept)")
    p.add_argument("--dynamic", choices=("sv_ratio", "sv_cumulative", "sv_fro"), help="choose the rank per module")
    p.add_argument("--param", type=float, metavar="X", help="the --dynamic method's threshold")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, cuda:1; default: cpu)")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS, help="output dtype (default: the input's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_lazy("resize", "resize"))

    p = _parser(subparsers, "merge", "merge LoRAs into a base checkpoint, or several LoRAs into one",
                "Merge LoRAs into an SD1 single-file checkpoint or a FLUX.1 transformer (BASE LORA...), or into "
                "one LoRA (--loras).",
                MERGE_EPILOG)  # fmt: skip
    p.add_argument("inputs", nargs="*", metavar="BASE LORA", help="the base checkpoint, then the LoRAs to merge into it")
    p.add_argument("--loras", nargs="+", metavar="LORA", help="merge these LoRAs into one LoRA instead")
    p.add_argument("--ratios", nargs="+", type=float, metavar="R", help="one weight per LoRA (default: 1.0 each)")
    p.add_argument("-o", "--output", required=True, help="the file to write")
    p.add_argument("--config", metavar="DIR", help="diffusers folder (or skeleton) describing the base checkpoint")
    p.add_argument("--clip-l", metavar="FILE", help="FLUX.1: a CLIP-L file (clip_l.safetensors) to merge the LoRAs' "
                   "CLIP-L modules into (sd-scripts' --clip_l)")
    p.add_argument("--clip-l-output", metavar="FILE", help="FLUX.1: where to write that CLIP-L (--clip_l_save_to)")
    p.add_argument("--device", default="cpu", help="where the sums run (default: cpu)")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS, help="--loras output dtype (default: the first LoRA's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_lazy("merge", "merge"))

    p = _parser(subparsers, "check", "find zero and NaN/Inf modules in a LoRA",
                "Check every module of a LoRA file: norms, mean |w|, ZERO and NaN/Inf flags.", CHECK_EPILOG)  # fmt: skip
    p.add_argument("lora", help="the LoRA .safetensors file")
    p.add_argument("--flagged-only", action="store_true", help="list only the flagged modules")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("check", "check"))

    p = _parser(subparsers, "info", "show a LoRA's metadata, JSON fields decoded",
                "Show the tensor summary and metadata of a .safetensors file.", INFO_EPILOG)  # fmt: skip
    p.add_argument("file", help="the LoRA (or any .safetensors) file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("info", "info"))

    p = _parser(subparsers, "export-kohya", "the sd-scripts command line and TOML configs of a run",
                "Translate a run's config.yaml to kohya sd-scripts (train_network.py).", EXPORT_EPILOG)  # fmt: skip
    p.add_argument("run_dir", help="a run dir (holds config.yaml)")
    p.add_argument("--out", metavar="DIR", help="where to write the files (default: the run dir)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_lazy("export_kohya", "export-kohya"))

    p = _parser(subparsers, "import-kohya", "an sd-scripts config / dataset TOML, kohya_ss GUI JSON or command line as "
                "an experiment config", "Write what a kohya user has as conf/experiment/<name>.yaml.", IMPORT_EPILOG)  # fmt: skip
    p.add_argument("file", help="a --config_file or --dataset_config TOML, a kohya_ss GUI .json, or a file holding the "
                   "`accelerate launch train_network.py ...` command")  # fmt: skip
    p.add_argument("--sdxl", action="store_true", help="the config is for sdxl_train_network.py (a TOML does not say; "
                   "a command line and a GUI JSON do)")  # fmt: skip
    p.add_argument("--flux", action="store_true", help="the config is for flux_train_network.py (as --sdxl)")
    p.add_argument("--name", help="the experiment's name (default: the file's name)")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: conf/experiment/<name>.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing experiment config")
    p.set_defaults(func=_lazy("import_kohya", "import-kohya"))

    p = _parser(subparsers, "kohya-options", "every sd-scripts train_network.py option: its Atelier key, or why none",
                "The coverage table of sd-scripts' train_network.py options (docs/kohya-options.md).", "")  # fmt: skip
    p.add_argument("--write", metavar="FILE", help="write the table to FILE instead of printing it")
    p.set_defaults(func=_lazy("kohya_coverage", "kohya-options"))

    p = _parser(subparsers, "skeleton", "copy a diffusers folder's configs + tokenizer (no weights) for model.config",
                "Write a config-only copy of a diffusers pipeline folder.", SKELETON_EPILOG)  # fmt: skip
    p.add_argument("diffusers_folder", help="a diffusers pipeline folder (with model_index.json)")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing out_dir")
    p.set_defaults(func=lambda args: _run_skeleton(args))

    p = _parser(subparsers, "convert-ckpt", "convert a pickled .ckpt to .safetensors (needs --allow-pickle)",
                "Convert a pickled checkpoint to .safetensors without running code from it.", CONVERT_EPILOG)  # fmt: skip
    p.add_argument("input", help="the .ckpt / .pt / .pth / .bin file")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--allow-pickle", action="store_true", help="required: read the pickle (restricted unpickler)")
    p.add_argument("--save-precision", choices=("keep", *SAVE_PRECISIONS), default="keep",
                   help="dtype of floating-point tensors (default: keep)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_lazy("convert_ckpt", "convert-ckpt"))


def _run_skeleton(args: argparse.Namespace) -> int:
    from atelier.tools.common import ToolError, fail_cleanly

    def run() -> int:
        from atelier.models.skeleton import SkeletonError, write_skeleton

        try:
            files = write_skeleton(args.diffusers_folder, args.out_dir, force=args.force)
        except SkeletonError as error:
            raise ToolError(str(error)) from error
        print(f"wrote {len(files)} files (configs and tokenizer, no weights) to {args.out_dir}")
        return 0

    return fail_cleanly("skeleton", run)
