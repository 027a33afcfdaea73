"""CLIP's joint image-text space, where Eq. (4), (7) and (10) compare visual and text features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def project_to_joint_space(tokens: torch.Tensor, projection: nn.Linear, layer_norm: nn.LayerNorm | None = None):
    """`projection(layer_norm(tokens))`, L2-normalised, always in float32 (autocast or not, whatever the
    weights' dtype). At tau = 0.001 a cosine rounded to bf16 (~3 digits) moves a logit of Eq. (4)/(10) by
    about 1, and alpha - beta of Eq. (6) by as much as the difference it measures; casting the loss later
    cannot restore what a bf16 projection already rounded."""
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x = tokens.float()
        if layer_norm is not None:
            x = F.layer_norm(x, layer_norm.normalized_shape, layer_norm.weight.float(), layer_norm.bias.float(),
                             layer_norm.eps)
        bias = projection.bias.float() if projection.bias is not None else None
        return F.normalize(F.linear(x, projection.weight.float(), bias), dim=-1)
