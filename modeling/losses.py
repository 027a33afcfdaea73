"""Training objectives: Eq. (4)/(10) alignment, (9) distillation, (11) constraint, (16) total."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def normality_alignment_loss(global_features: torch.Tensor, text_features: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Eq. (4) (encoder, L_c1) and Eq. (10) (decoder, L_c2):

        sum_i -log exp(e_i.g_n^i/tau) / (exp(e_i.g_n^i/tau) + exp(e_i.g_a^i/tau))

    Args:
        global_features: e_i, the class tokens in the joint space, L2-normalised (B, n, P).
        text_features: [g_n^i, g_a^i], L2-normalised (n, 2, P).
    Returns the sum over layers i, averaged over the batch.
    """
    # float32 even under autocast: at tau = 0.001 a bf16 cosine's rounding (~1e-3) would move a logit by ~1.
    with torch.autocast(device_type=global_features.device.type, enabled=False):
        logits = torch.einsum("bnp,nkp->bnk", global_features.float(), text_features.float()) / tau  # (B, n, 2)
    # -log softmax(...)[normal] = logsumexp(logits) - logit_normal, computed stably.
    per_layer = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    return per_layer.sum(dim=1).mean()


def distillation_loss(encoded: list[torch.Tensor], decoded: list[torch.Tensor]) -> torch.Tensor:
    r"""Eq. (9): sum_i (1 - cos(Flat(f_i*), Flat(\hat f_i*))), each map flattened whole
    (H*W*C per image), averaged over the batch."""
    loss = 0.0
    for f, f_hat in zip(encoded, decoded):
        loss = loss + (1.0 - F.cosine_similarity(f.flatten(1).float(), f_hat.flatten(1).float(), dim=1)).mean()
    return loss


def constraint_loss(loss_c1: torch.Tensor, loss_c2: torch.Tensor, epoch: int, theta: int, gamma: float) -> torch.Tensor:
    r"""Eq. (11): L_c1 before epoch theta, L_c1 + gamma L_c2 from epoch theta on (epochs count from 0)."""
    return loss_c1 if epoch < theta else loss_c1 + gamma * loss_c2
