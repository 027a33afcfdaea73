"""The CNC model: configuration, model and its parts (torch + transformers only).

Names are imported on first use (PEP 562), so that `cnc_hf.modeling.image_processing_cnc` and
`cnc_hf.modeling.heatmap`, which need no torch, can serve the torch-free ONNX Runtime path.
"""

import importlib

_WHERE = {
    "CNCConfig": ".configuration_cnc",
    "default_feature_layers": ".configuration_cnc",
    "CNCModel": ".modeling_cnc",
    "CNCOutput": ".modeling_cnc",
    "CNCPreTrainedModel": ".modeling_cnc",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
