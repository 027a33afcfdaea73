"""The `cnc-hf` command line: demo, train, evaluate, predict, export, push, card, convert, app.

Each subcommand is a thin front for a module that also runs on its own, so `--help` of the
subcommand is that module's help:

    cnc-hf demo                      build demo data, train, evaluate, save, predict (minutes on a CPU)
    cnc-hf train ...                 = python -m cnc_hf_train.train ... (accelerate launch -m for many GPUs)
    cnc-hf evaluate --model DIR ...  = python -m cnc_hf.evaluation ...
    cnc-hf predict IMG... --model DIR [--output_dir DIR]
    cnc-hf predict IMG... --onnx FILE   the same with ONNX Runtime, no torch
    cnc-hf export --model DIR --output FILE.onnx   = python -m cnc_hf.onnx_export ...
    cnc-hf push MODEL_DIR REPO_ID    = python -m cnc_hf.hub_cli push ...
    cnc-hf card MODEL_DIR            = python -m cnc_hf.hub_cli card ...
    cnc-hf convert --format mvtec --root DIR --output_dir DIR   = python -m cnc_hf.data.convert ...
    cnc-hf app --model DIR_OR_ID     a Gradio app (extra "app": pip install -e ".[app]")
"""

from __future__ import annotations

import importlib
import subprocess
import sys

COMMANDS = {
    "demo": ("cnc_hf.demo", "build the demo data set, train, evaluate, save and predict, in minutes on a CPU"),
    "train": (None, "train CNC (runs cnc_hf_train.train, the repository's training/train.py; see `cnc-hf train --help`)"),
    "evaluate": ("cnc_hf.evaluation", "evaluate a model dir on a data set: per-category table (markdown + JSON)"),
    "predict": ("cnc_hf.predict", "score images with a model and write heat-map overlays"),
    "export": ("cnc_hf.onnx_export", "export a model to ONNX for ONNX Runtime (predict --onnx runs it without torch)"),
    "push": ("cnc_hf.hub_cli", "upload a finished model dir (weights, code, card) to the Hugging Face Hub"),
    "card": ("cnc_hf.hub_cli", "(re)write the model card (README.md) of a model dir"),
    "convert": ("cnc_hf.data.convert", "turn local MVTec AD / VisA / image folders into parquet shards (and push them)"),
    "app": ("cnc_hf.app", "start a Gradio app to try a model in the browser"),
}


def _usage() -> str:
    lines = ["usage: cnc-hf COMMAND [ARGS...]", "", "CNC anomaly detection (AAAI 2025), Hugging Face-native.", "",
             "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `cnc-hf COMMAND --help` for the flags of each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(f"\ncnc-hf: unknown command {command!r}; expected one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if command == "train":
        # A separate process: the package never imports the training code (training -> cnc_hf only).
        return subprocess.call([sys.executable, "-m", "cnc_hf_train.train", *rest])
    module = importlib.import_module(COMMANDS[command][0])
    if command in ("push", "card") and (not rest or rest[0] != command):
        rest = [command, *rest]  # hub_cli serves both as subcommands
    try:
        result = module.main(rest)
    except Exception as err:  # a mistyped folder, an unreachable Hub: one line, exit 2
        if type(err).__name__ not in ("ModelNotAvailableError", "HubUnreachableError"):
            raise
        print(f"cnc-hf {command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
