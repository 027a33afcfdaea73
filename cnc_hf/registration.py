"""Everything cnc-hf registers with transformers, in one place; `import cnc_hf` runs `register()`.

- AutoConfig: model_type "cnc" -> CNCConfig; AutoModel: CNCConfig -> CNCModel;
  AutoImageProcessor: CNCConfig -> CNCImageProcessor.
- the pipeline task "image-anomaly-detection" -> AnomalyMapPipeline (PIPELINE_REGISTRY, transformers'
  public route for a custom task).

After that, `pipeline("image-anomaly-detection", model=model_dir)` runs the installed code. A saved
config.json also lists the pipeline as remote code (`custom_pipelines`), so that a process without
cnc-hf runs `pipeline(..., trust_remote_code=True)` from the files in the model directory; why the
installed config class then does not report that entry is written beside `CNCConfig.custom_pipelines`.
No class is patched here: registration is all this module does.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from cnc_hf.modeling import CNCConfig, CNCModel
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.modeling.pipeline_cnc import PIPELINE_TYPE, TASK, AnomalyMapPipeline


def register() -> None:
    """Register the CNC classes and the pipeline task with transformers (idempotent)."""
    AutoConfig.register(CNCConfig.model_type, CNCConfig, exist_ok=True)
    AutoModel.register(CNCConfig, CNCModel, exist_ok=True)
    AutoImageProcessor.register(CNCConfig, image_processor_classes={"pil": CNCImageProcessor}, exist_ok=True)
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=AnomalyMapPipeline, pt_model=AutoModel, type=PIPELINE_TYPE)


__all__ = ["register"]
