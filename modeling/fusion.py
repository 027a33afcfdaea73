"""Multi-layer fusion (MLF), Eq. (12)."""

from __future__ import annotations

import torch
from torch import nn


class MultiLayerFusion(nn.Module):
    r"""Eq. (12): \tilde f = Phi([f_1, f_2, f_3]), Phi a linear layer (3C -> C) with dropout."""

    def __init__(self, num_layers: int, hidden_size: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(num_layers * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.dropout(self.proj(torch.cat(features, dim=-1)))
