"""Kept for imports written before the split: the pipeline class lives in `cnc_hf.modeling.pipeline_cnc`
(it is also the remote-code file saved next to the model), the registration with transformers in
`cnc_hf.registration` (run by `import cnc_hf`), and the finished model directory in `cnc_hf.model_dir`.
"""

from cnc_hf.model_dir import PIPELINE_CODE, PROCESSOR_CODE, WEIGHTS_NAME, save_model_dir
from cnc_hf.modeling.pipeline_cnc import TASK, AnomalyMapPipeline, custom_pipelines_entry, overlay_heatmap

__all__ = ["AnomalyMapPipeline", "PIPELINE_CODE", "PROCESSOR_CODE", "TASK", "WEIGHTS_NAME", "custom_pipelines_entry",
           "overlay_heatmap", "save_model_dir"]
