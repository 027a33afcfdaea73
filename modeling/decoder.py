"""The visual decoder F_D: residual attention blocks, the basic module of ViT."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain softmax(q k^T * scaling) v, (B, heads, L, d) in, (B, L, heads, d) out: transformers' "eager"
    attention (as in its clip/siglip modeling files)."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (LN - attention - residual, LN - MLP - residual).

    The attention goes through transformers' attention interface, chosen per call by
    `config._attn_implementation` ("sdpa" by default, "eager", or any registered kernel), so
    `from_pretrained(..., attn_implementation=...)` and `model.set_attn_implementation(...)` switch it
    together with CLIP's. Without a config (a block used on its own) it runs SDPA.
    """

    is_causal = False  # read by transformers' sdpa/flash kernels: every patch attends to every patch

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5, config=None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.scaling = (hidden_size // num_heads) ** -0.5
        self.ln_1 = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=eps)
        inner = int(round(hidden_size * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        implementation = getattr(self.config, "_attn_implementation", None) or "sdpa"
        attention: Callable = eager_attention_forward
        if implementation != "eager":  # the lookup of transformers' own modeling files (5.0 and later)
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        out, _ = attention(self, q, k, v, None, scaling=self.scaling, dropout=0.0)
        return self.out_proj(out.reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CNCDecoder(nn.Module):
    r"""F_D = F_D^1 ... F_D^n applied in sequence; the output of each block is a decoded feature.

    Reverse distillation: the first block reconstructs the deepest tapped layer, so block j
    yields \hat f_{n+1-j}. `forward` returns [\hat f_1, ..., \hat f_n] in the order of the taps.
    `config` (the model's) selects the attention implementation (see ResidualAttentionBlock).
    """

    def __init__(self, num_blocks: int, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, config=None):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualAttentionBlock(hidden_size, num_heads, mlp_ratio, config=config)
                                    for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]
