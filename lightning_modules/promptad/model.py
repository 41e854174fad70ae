"""PromptAD (Li et al., CVPR 2024) as methods.md §1 reconstructs it from the authors' code: pure torch.

Vision branch: the memory bank on raw tokens of two blocks (FineGrainedAD Eq. 1).
Text branch: ``T_j = softmax(t·[⟨v_j,p̄ⁿ⟩, ⟨v_j,p̄ᵃ⟩])₁`` on V-V tokens; pixel map ``M = 1/(1/T + 1/M_v)``;
image score ``s = 1/(1/max M_v + 1/softmax(t·[⟨cls,p̄ⁿ⟩, ⟨cls,p̄ᵃ⟩])₁)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput, ClipBackbone
from fsad.lightning_modules.components.losses import (
    explicit_anomaly_margin_loss,
    prompt_contrastive_loss,
    prompt_mean_loss,
)
from fsad.lightning_modules.components.memory_bank import MemoryBank
from fsad.lightning_modules.components.postprocess import harmonic_fusion
from fsad.lightning_modules.components.prompt_states import abnormal_states, display_name
from fsad.lightning_modules.components.prompts import GroupFeatures, PromptGroupTexts, PromptLearner


def class_prompt_texts(category: str) -> PromptGroupTexts:
    """PromptAD's prompt bodies: ``<name>.`` (NHP, ALP) and every abnormal state of the category (AHP)."""
    name = display_name(category)
    return PromptGroupTexts(
        normal=[f"{name}."],
        abnormal=[state.format(name) + "." for state in abnormal_states(category)],
        learnable_abnormal=[f"{name}."],
    )


def two_way_probability(features: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, temperature) -> torch.Tensor:
    """``softmax(t·[⟨f,pⁿ⟩, ⟨f,pᵃ⟩])₁`` for L2-normalised features [..., D]."""
    logits = temperature * torch.stack([features @ normal, features @ abnormal], dim=-1)
    return logits.softmax(dim=-1)[..., 1]


class PromptADModel(nn.Module):
    """Prompt learner + memory bank; the frozen backbone is passed in, never owned."""

    def __init__(
        self, width: int, n_ctx: int = 4, n_ctx_ab: int = 1, n_pro_ab: int = 4, eam_margin: float = 0.0,
        mean_loss_weight: float = 0.001, temperature_quirk: bool = False, eam_token_axis_quirk: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.prompts = PromptLearner(width, n_ctx, n_ctx_ab, n_pro_ab)
        self.memory = MemoryBank()
        self.eam_margin = eam_margin
        self.mean_loss_weight = mean_loss_weight
        self.temperature_quirk = temperature_quirk
        self.last_image_parts: torch.Tensor | None = None  # [B,2] (max M_v, text score) of the last forward
        self.eam_token_axis_quirk = eam_token_axis_quirk
        self.text: GroupFeatures | None = None

    def temperature(self, backbone: ClipBackbone) -> torch.Tensor:
        """CLIP's temperature ``exp(logit_scale)``, or the raw ``logit_scale`` (≈4.6) with the authors' quirk."""
        scale = backbone.logit_scale.detach()
        return scale if self.temperature_quirk else scale.exp()

    def build(self, backbone: ClipBackbone, category: str) -> None:
        self.prompts.build(backbone, {"class": class_prompt_texts(category)})
        self.text = None

    def fit_support(self, support: BackboneOutput) -> None:
        self.memory.fit(support.taps)

    def cache_text(self, backbone: ClipBackbone) -> None:
        """Encode the prompts once for evaluation (the contexts are fixed after training)."""
        with torch.no_grad():
            self.text = self.prompts.encode(backbone)["class"]

    def losses(self, features: BackboneOutput, backbone: ClipBackbone) -> dict[str, torch.Tensor]:
        """L = L_clip + L_EAM + λ·L_mean on the V-V patch tokens, plus the same L_clip + L_EAM on the CLS token."""
        text = self.prompts.encode(backbone)["class"]
        t = self.temperature(backbone)
        patches = F.normalize(features.vv_tokens, dim=-1)
        cls = F.normalize(features.cls, dim=-1)
        normal, abnormal_mean = text.normal_prototype, text.abnormal_prototype
        losses = {
            "clip": prompt_contrastive_loss(patches, normal, text.abnormal, t),
            "eam": explicit_anomaly_margin_loss(
                patches, normal, abnormal_mean, self.eam_margin, sum_over_tokens_quirk=self.eam_token_axis_quirk
            ),
            "clip_cls": prompt_contrastive_loss(cls, normal, text.abnormal, t),
            "eam_cls": explicit_anomaly_margin_loss(cls, normal, abnormal_mean, self.eam_margin),
            "mean": self.mean_loss_weight * prompt_mean_loss(text.handcrafted, text.learnable),
        }
        losses["total"] = sum(losses.values())
        return losses

    def forward(self, features: BackboneOutput, backbone: ClipBackbone) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid maps [B,rows,cols] and image scores [B] from one backbone pass."""
        if self.text is None:
            self.cache_text(backbone)
        text, t = self.text, self.temperature(backbone)
        visual = self.memory(features.taps)
        textual = two_way_probability(
            F.normalize(features.vv_tokens, dim=-1), text.normal_prototype, text.abnormal_prototype, t
        )
        grid = harmonic_fusion(textual, visual).reshape(visual.shape[0], *features.grid)
        image_text = two_way_probability(
            F.normalize(features.cls, dim=-1), text.normal_prototype, text.abnormal_prototype, t
        )
        self.last_image_parts = torch.stack([visual.amax(dim=1), image_text], dim=1)  # for the paper's fusion quirk
        return grid, harmonic_fusion(visual.amax(dim=1), image_text)
