"""Gated mixture-of-experts, Eq. (13)-(15)."""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert E_t: Linear - GELU - Linear (the paper says only "a MLP")."""

    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inner_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def route_top_k(logits: torch.Tensor, top_k: int, gating: str = "topk_softmax"):
    r"""Top-K routing of Eq. (13)-(14).

    Args:
        logits: router outputs G(z_r) before normalisation, (R, T).
    Returns:
        `(gates, indices, weights)`: `gates` (R, T) holds H_t for the K chosen experts and 0
        elsewhere (the G(z_r) summed by the importance loss); `indices`/`weights` (R, K) are the
        chosen experts and their H_k.
        `"topk_softmax"`: H = softmax over the K largest logits (each row of weights sums to 1).
        `"softmax_topk"`: H = the K largest entries of softmax over all T logits.
    """
    if gating == "topk_softmax":
        top_logits, indices = logits.topk(top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
    elif gating == "softmax_topk":
        weights, indices = logits.softmax(dim=-1).topk(top_k, dim=-1)
    else:
        raise ValueError(f"unknown moe gating {gating!r}")
    gates = torch.zeros_like(logits).scatter(-1, indices, weights)
    return gates, indices, weights


IMPORTANCE_LOSS_FORMS = ("cv2", "literal")


def importance_loss(gates: torch.Tensor, eps: float = 1e-10, form: str = "cv2") -> torch.Tensor:
    r"""Eq. (15), the importance loss over I = sum_r G(z_r) in R^T (R routed patches, T experts).

    The paper writes L_moe = SD(sum_r G(z_r))^2 / ((1/R sum_r G(z_r))^2 + eps) and cites it as "a
    universal importance loss (Bengio et al. 2015)", i.e. the squared coefficient of variation.
    `"cv2"` (default): SD(I)^2 / (mean_t(I)^2 + eps), that squared coefficient of variation,
    the same whatever the batch size. `"literal"`: the formula as printed, its T-vector
    denominator (1/R) I read as a scalar through its mean over the experts; it equals R^2 times
    `"cv2"` (R = B*H*W, ~2000 at batch 8 on 16x16 patches), so it would outweigh every other
    loss by ~10^6 and change with the batch size. SD is the population standard deviation over
    the T experts, so T = 1 gives 0 rather than NaN.
    """
    importance = gates.float().sum(dim=0)
    if form == "cv2":
        mean = importance.mean()
    elif form == "literal":
        mean = (importance / gates.shape[0]).mean()
    else:
        raise ValueError(f"importance loss form {form!r}: expected one of {IMPORTANCE_LOSS_FORMS}")
    return importance.var(correction=0) / (mean**2 + eps)


class GatedMixtureOfExperts(nn.Module):
    r"""Router G (Eq. 13) and T experts; each patch z_r goes through its top-K experts and
    z*_r = sum_k H_k E_k(z_r) (Eq. 14)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, mlp_ratio: float = 1.0,
                 gating: str = "topk_softmax"):
        super().__init__()
        self.top_k, self.gating = top_k, gating
        self.router = nn.Linear(hidden_size, num_experts)
        inner = max(1, int(round(hidden_size * mlp_ratio)))
        self.experts = nn.ModuleList(ExpertMLP(hidden_size, inner) for _ in range(num_experts))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., C) -> (z* (..., C), gates (R, T)) with R = number of tokens.

        Dense dispatch: every expert runs on every token (two batched matmuls over the stacked expert
        weights) and `gates`, zero outside each token's top K, weighs and sums them: exactly Eq. (14).
        No shape depends on the routing, so torch.export / ONNX export trace it and a GPU makes no
        host sync per expert; the cost is T/K times the experts' FLOPs, small beside the decoder's.
        """
        flat = z.reshape(-1, z.shape[-1])
        gates, _, _ = route_top_k(self.router(flat), self.top_k, self.gating)
        fc1 = [expert.fc1 for expert in self.experts]
        fc2 = [expert.fc2 for expert in self.experts]
        hidden = torch.einsum("rc,tic->tri", flat, torch.stack([f.weight for f in fc1]))
        hidden = self.experts[0].act(hidden + torch.stack([f.bias for f in fc1]).unsqueeze(1))  # (T, R, I)
        outputs = torch.einsum("tri,tci->trc", hidden, torch.stack([f.weight for f in fc2]))
        outputs = outputs + torch.stack([f.bias for f in fc2]).unsqueeze(1)  # (T, R, C)
        out = torch.einsum("rt,trc->rc", gates.to(outputs.dtype), outputs)
        return out.reshape(z.shape), gates
