"""The visual decoder F_D: residual attention blocks, the basic module of ViT."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (LN - attention - residual, LN - MLP - residual), SDPA attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=eps)
        inner = int(round(hidden_size * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CNCDecoder(nn.Module):
    r"""F_D = F_D^1 ... F_D^n applied in sequence; the output of each block is a decoded feature.

    Reverse distillation: the first block reconstructs the deepest tapped layer, so block j
    yields \hat f_{n+1-j}. `forward` returns [\hat f_1, ..., \hat f_n] in the order of the taps.
    """

    def __init__(self, num_blocks: int, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]
