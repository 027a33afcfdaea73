"""The CNC model: configuration, model and its parts (torch + transformers only)."""

from .configuration_cnc import CNCConfig, default_feature_layers
from .modeling_cnc import CNCModel, CNCOutput, CNCPreTrainedModel

__all__ = ["CNCConfig", "CNCModel", "CNCOutput", "CNCPreTrainedModel", "default_feature_layers"]
