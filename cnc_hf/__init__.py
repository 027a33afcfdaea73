"""cnc-hf: CNC (Cross-modal Normality Constraint, AAAI 2025) for multi-class visual anomaly detection.

    from cnc_hf import CNCConfig, CNCModel
    model = CNCModel.from_clip_pretrained("openai/clip-vit-large-patch14-336")
"""

from transformers import AutoConfig, AutoModel

from modeling import CNCConfig, CNCModel, CNCOutput

AutoConfig.register("cnc", CNCConfig, exist_ok=True)
AutoModel.register(CNCConfig, CNCModel, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["CNCConfig", "CNCModel", "CNCOutput", "__version__"]
