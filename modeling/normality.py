"""Feature-level normality promotion, Eq. (5)-(8)."""

from __future__ import annotations

import torch


def control_coefficient(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    r"""Eq. (6): Psi(alpha, beta) = 1/2 (1 + tanh(alpha - beta)), element-wise."""
    return 0.5 * (1.0 + torch.tanh(alpha - beta))


PROMOTION_SCALES = ("map", "patch")


def normality_promotion(features: torch.Tensor, joint_features: torch.Tensor, g_n: torch.Tensor,
                        g_a: torch.Tensor, scale: str = "map", eps: float = 1e-6) -> torch.Tensor:
    r"""Eq. (5) for encoded and Eq. (8) for decoded features: f* = f (+) lambda Psi(alpha, beta).

    Args:
        features: f_i or \hat f_i, patch tokens (B, L, C) in the visual space (L = H*W).
        joint_features: the same tokens in CLIP's joint space, L2-normalised (B, L, P).
        g_n, g_a: normal / abnormal text features of layer i, L2-normalised (P,).
        scale: what the L2 norm of lambda = 1/||f_i|| runs over.
            `"map"` (the paper: "f_i, f_i* in R^{HxWxC}, lambda = 1/||f_i|| is a scaled coefficient,
            ||.|| is the L2 norm"): the whole H x W x C map of each image, one lambda per image.
            `"patch"`: each patch's own C-vector, one lambda per patch (about sqrt(H*W) times larger:
            16x on a 16x16 grid); what cnc-hf did before this switch existed.

    alpha = f (x) g_n and beta = f (x) g_a (Eq. 7) are the per-patch products taken in the joint
    space, where text and image features are comparable (cosine similarities, as both are
    normalised). Psi (H x W) is added to every channel of its patch (the (+) of Eq. 5).
    """
    # At least float32, autocast or not: bf16 keeps ~3 significant digits, which would blur alpha - beta
    # and round the shift lambda * Psi (~1/||f||) away against f's own values.
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        joint = joint_features.to(dtype)
        alpha = joint @ g_n.to(dtype)  # (B, L), Eq. (7)
        beta = joint @ g_a.to(dtype)
        psi = control_coefficient(alpha, beta)
        f = features.to(dtype)
        if scale == "map":
            lam = 1.0 / f.flatten(1).norm(dim=1).clamp_min(eps).unsqueeze(1)  # (B, 1)
        elif scale == "patch":
            lam = 1.0 / f.norm(dim=-1).clamp_min(eps)  # (B, L)
        else:
            raise ValueError(f"promotion scale {scale!r}: expected one of {PROMOTION_SCALES}")
        return f + (lam * psi).unsqueeze(-1)
