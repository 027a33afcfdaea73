"""cnc-hf: CNC (Cross-modal Normality Constraint, AAAI 2025) for multi-class visual anomaly detection.

    from cnc_hf import CNCConfig, CNCModel, AnomalyMapPipeline
    model = CNCModel.from_clip_pretrained("openai/clip-vit-large-patch14-336")

Importing the package registers "cnc" with AutoConfig/AutoModel/AutoImageProcessor and the
"image-anomaly-detection" pipeline task (cnc_hf.registration). Without torch installed, only the ONNX Runtime path
(`cnc_hf.onnx_runtime`, `cnc-hf predict --onnx`) is available; the model's names say so when used.
"""

__version__ = "0.1.0"
__all__ = ["AnomalyMapPipeline", "CNCConfig", "CNCImageProcessor", "CNCModel", "CNCOutput", "save_model_dir",
           "__version__"]

try:
    import torch  # noqa: F401
except ImportError as missing:  # a deployment without torch: exported ONNX models only
    _NO_TORCH = missing

    def __getattr__(name):
        if name in __all__:
            raise ImportError(f"cnc_hf.{name} needs torch ({_NO_TORCH}); without torch, cnc_hf.onnx_runtime runs "
                              "models exported with `cnc-hf export`")
        raise AttributeError(f"module 'cnc_hf' has no attribute {name!r}")
else:
    from cnc_hf.modeling import CNCConfig, CNCModel, CNCOutput
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf.modeling.pipeline_cnc import AnomalyMapPipeline
    from cnc_hf.model_dir import save_model_dir
    from cnc_hf.registration import register as _register

    _register()
