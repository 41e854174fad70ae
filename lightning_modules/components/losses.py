"""Training losses of PromptAD, FineGrainedAD (Eq. 2–3) and KAG-prompt (focal, Dice, image cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prompt_contrastive_loss(
    tokens: torch.Tensor,
    normal_prototype: torch.Tensor,
    abnormal_features: torch.Tensor,
    temperature: float | torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_clip (PromptAD; FineGrainedAD Eq. 2): each normal token must pick p̄ⁿ over every abnormal prompt.

    ``−log e^{t⟨w·v,p̄ⁿ⟩} / (e^{t⟨w·v,p̄ⁿ⟩} + Σ_{p∈𝒫ᵃ} e^{t⟨w·v,p⟩})`` averaged over tokens.
    tokens: [..., D] L2-normalised; token_weights: [...] region weights w (FineGrainedAD), scaling the token
    as the authors' code does (so a weight acts as a per-token temperature).
    """
    v = tokens.reshape(-1, tokens.shape[-1])
    if token_weights is not None:
        v = v * token_weights.reshape(-1, 1)
    prototypes = torch.cat([normal_prototype.unsqueeze(0), abnormal_features])
    logits = temperature * v @ prototypes.T
    return F.cross_entropy(logits, torch.zeros(len(v), dtype=torch.long, device=v.device))


def explicit_anomaly_margin_loss(
    tokens: torch.Tensor,
    normal_prototype: torch.Tensor,
    abnormal_prototype: torch.Tensor,
    margin: float,
    token_weights: torch.Tensor | None = None,
    sum_over_tokens_quirk: bool = False,
) -> torch.Tensor:
    """L_EAM: ``relu(‖v − p̄ⁿ‖² − ‖v − p̄ᵃ‖² + m)``, normal tokens closer to p̄ⁿ than to p̄ᵃ by the margin m.

    PromptAD uses m = 0 and FineGrainedAD m = 1. With ``sum_over_tokens_quirk`` the squared differences of
    [K,N,D] tokens are summed over the token axis N instead of the channel axis, as PromptAD's ``TripletLoss`` does
    (the loss then compares per channel).
    """
    v = tokens if token_weights is None else tokens * token_weights.unsqueeze(-1)
    axis = -2 if sum_over_tokens_quirk else -1
    if sum_over_tokens_quirk and v.dim() < 3:
        raise ValueError("the token-axis quirk needs tokens shaped [K,N,D]")
    to_normal = (v - normal_prototype).pow(2).sum(dim=axis)
    to_abnormal = (v - abnormal_prototype).pow(2).sum(dim=axis)
    return F.relu(to_normal - to_abnormal + margin).mean()


def prompt_mean_loss(handcrafted: torch.Tensor, learnable: torch.Tensor) -> torch.Tensor:
    """L_mean = ‖mean(norm AHP) − mean(norm ALP)‖²: learnable abnormal prompts stay near the handcrafted ones."""
    return (F.normalize(handcrafted, dim=-1).mean(0) - F.normalize(learnable, dim=-1).mean(0)).pow(2).sum()


def level_regulariser(
    image_learnable: torch.Tensor,
    component_learnables: torch.Tensor,
    background_normal: torch.Tensor,
    weight: float = 1.0,
) -> torch.Tensor:
    """FineGrainedAD L_reg (Eq. 3): ``‖mean(ALP_img) − mean(norm Σᵢ ALP_cᵢ) − λ·mean(NHP_bg)‖``, not squared.

    image_learnable: [P,D] unit image-level ALP features; component_learnables: [N_c,P,D] ALP features of each
    component (row p of every component used the same abnormal context set; unit features in our reading, raw ones
    in the authors' code); background_normal: [Pn,D] unit NHP features. The component sum is renormalised row by row
    before averaging, as the authors' code does, so the loss does not grow with the number of components. λ is the
    weight of the background term (1 in the paper).
    """
    components = F.normalize(component_learnables.sum(dim=0), dim=-1).mean(dim=0)
    return (image_learnable.mean(dim=0) - components - weight * background_normal.mean(dim=0)).norm()


def focal_loss(
    probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6
) -> torch.Tensor:
    """Binary focal loss on anomaly probabilities [B,H,W] and {0,1} targets: ``−(1−p_t)^γ log p_t``, mean."""
    p = probabilities.clamp(eps, 1 - eps)
    p_true = torch.where(target > 0.5, p, 1 - p)
    return (-(1 - p_true).pow(gamma) * p_true.log()).mean()


def dice_loss(probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, averaged: ``1 − (2Σpg + ε) / (Σp + Σg + ε)`` with smoothing ε = 1."""
    p = probabilities.flatten(1)
    g = target.float().flatten(1)
    return (1 - (2 * (p * g).sum(1) + eps) / (p.sum(1) + g.sum(1) + eps)).mean()


def image_cross_entropy(abnormal_probability: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of image anomaly probabilities [B] against labels [B]."""
    p = abnormal_probability.clamp(eps, 1 - eps)
    return F.binary_cross_entropy(p, labels.float())
