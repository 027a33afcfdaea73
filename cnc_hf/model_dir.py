"""The finished model directory: `save_model_dir` writes it, `validate_model_dir` says which of its files
belong to the model (what `cnc_hf.hub` uploads).

    save_model_dir(model, processor, output_dir)
    validate_model_dir(model_dir)    # the files that belong to the model, or ModelDirError

It serves both ways of running the model: `pipeline("image-anomaly-detection", model=dir)` with
cnc-hf installed, and `pipeline(..., trust_remote_code=True)` from the code files saved in the
directory, in a process without cnc-hf.

The list of files is explicit, never "everything in the folder": the weights (safetensors only),
config.json, preprocessor_config.json, the code files the saved auto_map / custom_pipelines
entries need (and their relative imports), README.md, and when present metrics.json,
training_args.json and heatmap_example.png. Training leftovers (checkpoints/, runs/, logs,
heatmaps/) stay local. A folder with a pickle-format file at its top level
(.bin/.pt/.pth/.pkl/.pickle/.ckpt) is refused: loading such files can run arbitrary code.
Checking needs no torch; saving imports the model code when called.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

# The files a finished model directory holds (besides README.md and metrics.json).
WEIGHTS_NAME = "model.safetensors"
PIPELINE_CODE = "pipeline_cnc.py"
PROCESSOR_CODE = "image_processing_cnc.py"
WEIGHT_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HEATMAP_EXAMPLE = "heatmap_example.png"
OPTIONAL_FILES = ("metrics.json", "training_args.json", HEATMAP_EXAMPLE)


class ModelDirError(ValueError):
    """A model directory that cannot be published or loaded as it is."""


def read_json(path: Path) -> dict | None:
    """The JSON file at `path`, None when there is none, ModelDirError when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from err


def _code_files(model_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """The .py files the saved auto_map / custom_pipelines entries name, with their relative imports."""
    from transformers.dynamic_module_utils import get_relative_imports

    refs = list((config.get("auto_map") or {}).values())
    refs += [info.get("impl", "") for info in (config.get("custom_pipelines") or {}).values()]
    processor = read_json(model_dir / "preprocessor_config.json") or {}
    refs += list((processor.get("auto_map") or {}).values())
    wanted, queue = set(), []
    for ref in refs:
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if item:
                queue.append(item.split("--")[-1].split(".")[0] + ".py")
    while queue:
        name = queue.pop()
        if name in wanted:
            continue
        wanted.add(name)
        if not (model_dir / name).is_file():
            raise ModelDirError(f"{model_dir}: code file {name} is missing (the config refers to it); "
                                "save with cnc_hf.pipeline.save_model_dir")
        queue += [f"{module}.py" for module in get_relative_imports(str(model_dir / name))]
    return sorted(wanted)


def _weight_files(model_dir: Path) -> list[str]:
    if (model_dir / WEIGHT_INDEX).is_file():
        index = read_json(model_dir / WEIGHT_INDEX) or {}
        weights = sorted(set((index.get("weight_map") or {}).values())) + [WEIGHT_INDEX]
        missing = [w for w in weights if not (model_dir / w).is_file()]
        if missing:
            raise ModelDirError(f"{model_dir}: weight shards {missing} listed in {WEIGHT_INDEX} are missing")
        return weights
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelDirError(f"{model_dir}: no model.safetensors; save the model with save_pretrained first")


def validate_model_dir(model_dir: str | os.PathLike, *, will_write: Iterable[str] = ()) -> list[str]:
    """Check that `model_dir` is a finished, safe CNC model dir; return the files that belong to it.

    Raises ModelDirError (a ValueError) naming the problem: not a directory, pickle files at the
    top level, no safetensors weights, no config.json / preprocessor_config.json, not a CNC config,
    no `custom_pipelines` entry, or missing code files. README.md is not required (the upload renders
    it). `will_write`: README.md / heatmap_example.png that the upload would write, listed as if there
    (a dry run lists what a real upload sends without writing them).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory")
    pickles = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelDirError(
            f"{model_dir}: refusing to publish pickle-format files {pickles}; they can run code when loaded. "
            "Save with save_pretrained (safetensors) and remove them."
        )
    weights = _weight_files(model_dir)
    config = read_json(model_dir / "config.json")
    if config is None:
        raise ModelDirError(f"{model_dir}: no config.json")
    if config.get("model_type") != "cnc":
        raise ModelDirError(f"{model_dir}: config.json is a {config.get('model_type')!r} model; expected 'cnc'")
    if not (model_dir / "preprocessor_config.json").is_file():
        raise ModelDirError(f"{model_dir}: no preprocessor_config.json (the image processor the pipeline loads)")
    if "image-anomaly-detection" not in (config.get("custom_pipelines") or {}):
        raise ModelDirError(
            f"{model_dir}: config.json has no custom_pipelines entry for 'image-anomaly-detection', so the pipeline "
            "would not load with trust_remote_code; save with cnc_hf.pipeline.save_model_dir"
        )
    files = weights + ["config.json", "preprocessor_config.json"] + _code_files(model_dir, config)
    will_write = set(will_write)
    files += [name for name in ("README.md",) + OPTIONAL_FILES if (model_dir / name).is_file() or name in will_write]
    return files


def save_model_dir(model, processor, output_dir: str | os.PathLike) -> Path:
    """Write the finished model directory and return its path.

    Contents: `model.safetensors`, `config.json` (with `auto_map` and `custom_pipelines`),
    `preprocessor_config.json`, and the code files of the model, the processor and the pipeline.
    This is what `transformers.Pipeline.save_pretrained` writes for a registered custom pipeline;
    we go through it so the layout stays transformers' own. The model is not moved to another device.
    The files replace an earlier save atomically for readers (cnc_hf.atomic): a kill at any point
    leaves the old model, the new one, or no config.json, never old weights beside a new config.
    `processor=None` saves a `CNCImageProcessor` at `model.config.image_size`.
    """
    from cnc_hf.atomic import save_atomically
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf.modeling.pipeline_cnc import AnomalyMapPipeline

    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"output_dir: {output_dir} is a file; expected a directory")
    if processor is None:
        processor = CNCImageProcessor(size=model.config.image_size)

    def write(staging: Path) -> None:
        was_training = model.training
        AnomalyMapPipeline(model=model, image_processor=processor, device=model.device).save_pretrained(staging)
        model.train(was_training)
        missing = [name for name in (WEIGHTS_NAME, "config.json", "preprocessor_config.json", PIPELINE_CODE,
                                     PROCESSOR_CODE) if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"save_model_dir: {staging} lacks {missing} after saving; this is a bug in cnc_hf")

    return save_atomically(output_dir, write)


__all__ = ["HEATMAP_EXAMPLE", "ModelDirError", "OPTIONAL_FILES", "PICKLE_SUFFIXES", "PIPELINE_CODE", "PROCESSOR_CODE",
           "WEIGHTS_NAME", "WEIGHT_INDEX", "read_json", "save_model_dir", "validate_model_dir"]
