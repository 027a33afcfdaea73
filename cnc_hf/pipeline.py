"""The anomaly-map pipeline, registered with transformers, and the finished model directory.

Importing this module registers the task `"image-anomaly-detection"` (and CNCImageProcessor for
AutoImageProcessor), so that after `import cnc_hf`

    pipeline("image-anomaly-detection", model=model_dir)

works with the installed code, while a process without cnc-hf uses the code saved in the model
directory:

    pipeline("image-anomaly-detection", model=model_dir, trust_remote_code=True)

`save_model_dir(model, processor, output_dir)` writes the directory that both need (and that
`cnc_hf.hub.push_to_hub` uploads).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from cnc_hf.modeling import CNCConfig
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.modeling.pipeline_cnc import TASK, AnomalyMapPipeline, overlay_heatmap

# The files a finished model directory holds (besides README.md and metrics.json); hub.py checks them.
WEIGHTS_NAME = "model.safetensors"
PIPELINE_CODE = "pipeline_cnc.py"
PROCESSOR_CODE = "image_processing_cnc.py"


def _register() -> None:
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=AnomalyMapPipeline, pt_model=AutoModel, type="image")
    AutoImageProcessor.register(CNCConfig, image_processor_classes={"pil": CNCImageProcessor}, exist_ok=True)
    _serve_registered_pipelines_locally()


def _serve_registered_pipelines_locally() -> None:
    """Let the installed package serve the pipeline that a saved config lists as remote code.

    A saved CNC config lists the pipeline under `custom_pipelines` (that is how a process
    WITHOUT cnc-hf finds `pipeline_cnc.py` with `trust_remote_code=True`). transformers then
    demands `trust_remote_code=True` for that task even when the installed package registered
    the same task in this process. The installed config class (the one AutoConfig uses when
    trust_remote_code is not set) therefore reports, on READ, only the entries whose task this
    process does not already serve; the stored value (`__dict__`, what `to_dict` and
    `save_pretrained` write) keeps every entry. The remote copy of the config class is not
    touched, so `trust_remote_code=True` still runs the saved code.
    """
    if isinstance(CNCConfig.__dict__.get("custom_pipelines"), property):
        return

    def get(config):
        saved = config.__dict__.get("custom_pipelines") or {}
        registered = PIPELINE_REGISTRY.supported_tasks
        return {
            task: info for task, info in saved.items()
            if not (task in registered and registered[task]["impl"].__name__ == str(info.get("impl", "")).split(".")[-1])
        }

    def set_(config, value):
        config.__dict__["custom_pipelines"] = value

    CNCConfig.custom_pipelines = property(get, set_, doc="Pipelines saved as remote code (see cnc_hf.pipeline).")


def custom_pipelines_entry() -> dict:
    """The `custom_pipelines` value of a saved config, in the format `Pipeline.save_pretrained` writes."""
    info = PIPELINE_REGISTRY.supported_tasks[TASK]
    return {
        TASK: {
            "impl": f"{info['impl'].__module__.split('.')[-1]}.{info['impl'].__name__}",
            "pt": [cls.__name__ for cls in info["pt"]],
            "type": info.get("type", "image"),
        }
    }


def save_model_dir(model, processor: CNCImageProcessor | None, output_dir: str | os.PathLike) -> Path:
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


_register()

__all__ = ["AnomalyMapPipeline", "TASK", "custom_pipelines_entry", "overlay_heatmap", "save_model_dir"]
