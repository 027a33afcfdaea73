"""The finished model directory: what `save_model_dir` writes, and `cnc_hf.hub` checks and uploads.

It serves both ways of running the model: `pipeline("image-anomaly-detection", model=dir)` with
cnc-hf installed, and `pipeline(..., trust_remote_code=True)` from the code files saved in the
directory, in a process without cnc-hf.
"""

from __future__ import annotations

import os
from pathlib import Path

from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.modeling.pipeline_cnc import AnomalyMapPipeline, custom_pipelines_entry

# The files a finished model directory holds (besides README.md and metrics.json); hub.py checks them.
WEIGHTS_NAME = "model.safetensors"
PIPELINE_CODE = "pipeline_cnc.py"
PROCESSOR_CODE = "image_processing_cnc.py"


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


__all__ = ["PIPELINE_CODE", "PROCESSOR_CODE", "WEIGHTS_NAME", "custom_pipelines_entry", "save_model_dir"]
