"""cnc-hf: CNC (Cross-modal Normality Constraint, AAAI 2025) for multi-class visual anomaly detection.

    from cnc_hf import CNCConfig, CNCModel, AnomalyMapPipeline
    model = CNCModel.from_clip_pretrained("openai/clip-vit-large-patch14-336")

Importing the package registers "cnc" with AutoConfig/AutoModel and the
"image-anomaly-detection" pipeline task.
"""

from transformers import AutoConfig, AutoModel

from cnc_hf.modeling import CNCConfig, CNCModel, CNCOutput
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

AutoConfig.register("cnc", CNCConfig, exist_ok=True)
AutoModel.register(CNCConfig, CNCModel, exist_ok=True)

from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir  # noqa: E402  (registers the task)

__version__ = "0.1.0"
__all__ = ["AnomalyMapPipeline", "CNCConfig", "CNCImageProcessor", "CNCModel", "CNCOutput", "save_model_dir",
           "__version__"]
