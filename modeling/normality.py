"""Feature-level normality promotion, Eq. (5)-(8)."""

from __future__ import annotations

import torch


def control_coefficient(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    r"""Eq. (6): Psi(alpha, beta) = 1/2 (1 + tanh(alpha - beta)), element-wise."""
    return 0.5 * (1.0 + torch.tanh(alpha - beta))


def normality_promotion(features: torch.Tensor, joint_features: torch.Tensor, g_n: torch.Tensor,
                        g_a: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Eq. (5) for encoded and Eq. (8) for decoded features: f* = f (+) lambda Psi(alpha, beta).

    Args:
        features: f_i or \hat f_i, patch tokens (B, L, C) in the visual space.
        joint_features: the same tokens in CLIP's joint space, L2-normalised (B, L, P).
        g_n, g_a: normal / abnormal text features of layer i, L2-normalised (P,).

    alpha = f (x) g_n and beta = f (x) g_a (Eq. 7) are the per-patch products taken in the joint
    space, where text and image features are comparable (cosine similarities, as both are
    normalised). lambda = 1/||f|| uses each patch's own L2 norm, so the promotion is a small,
    scale-free shift of every channel of that patch.
    """
    # At least float32, autocast or not: bf16 keeps ~3 significant digits, which would blur alpha - beta
    # and round the shift lambda * Psi (~1/||f|| per channel) away against f's own values.
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        joint = joint_features.to(dtype)
        alpha = joint @ g_n.to(dtype)  # (B, L), Eq. (7)
        beta = joint @ g_a.to(dtype)
        psi = control_coefficient(alpha, beta)
        f = features.to(dtype)
        lam = 1.0 / f.norm(dim=-1).clamp_min(eps)
        return f + (lam * psi).unsqueeze(-1)
