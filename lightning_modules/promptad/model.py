"""PromptAD (Li et al., CVPR 2024) as methods.md §1 reconstructs it from the authors' code: pure torch.

Vision branch: the memory bank on raw tokens of two blocks (FineGrainedAD Eq. 1).
Text branch: ``T_j = softmax(t·[⟨v_j,p̄ⁿ⟩, ⟨v_j,p̄ᵃ⟩])₁`` on V-V tokens; pixel map ``M = 1/(1/T + 1/M_v)``;
image score ``s = 1/(1/max M_v + 1/softmax(t·[⟨cls,p̄ⁿ⟩, ⟨cls,p̄ᵃ⟩])₁)``.

Two variants (``variant``):

* ``paper``: one prompt learner trained on patch and CLS losses together; prototypes average unit prompt features;
  the image score's ``max M_v`` is over the patch grid; our wording of the defect states.
* ``code``: the released code (``train_seg.py``, ``train_cls.py``, ``PromptAD/model.py``): a segmentation prompt
  set (one normal context set) trained on patch losses gives the maps, a separate classification prompt set (three
  normal context sets) trained on CLS losses gives the image score's text part; prototypes normalise the mean of
  the raw features; ``max M_v`` is over the map bilinearly upsampled to the evaluation size; the authors' wording,
  temperature (``logit_scale`` without ``exp``) and L_EAM summed over the token axis.
"""

from __future__ import annotations

from typing import Literal

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
from fsad.lightning_modules.components.prompt_states import Wording, abnormal_states, display_name
from fsad.lightning_modules.components.prompts import GroupFeatures, PromptGroupTexts, PromptLearner

Variant = Literal["paper", "code"]
VARIANTS: tuple[str, ...] = ("paper", "code")


def check_variant(variant: str) -> None:
    """One clear error for an unknown ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant: {variant!r} is not one of {list(VARIANTS)}")


def class_prompt_texts(category: str, wording: Wording = "ours") -> PromptGroupTexts:
    """PromptAD's prompt bodies: ``<name>.`` (NHP, ALP) and every abnormal state of the category (AHP)."""
    name = display_name(category)
    return PromptGroupTexts(
        normal=[f"{name}."],
        abnormal=[state.format(name) + "." for state in abnormal_states(category, wording)],
        learnable_abnormal=[f"{name}."],
    )


def two_way_probability(
    features: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, temperature
) -> torch.Tensor:
    """``softmax(t·[⟨f,pⁿ⟩, ⟨f,pᵃ⟩])₁`` for L2-normalised features [..., D]."""
    logits = temperature * torch.stack([features @ normal, features @ abnormal], dim=-1)
    return logits.softmax(dim=-1)[..., 1]


def upsampled_max(grid_maps: torch.Tensor, size: int) -> torch.Tensor:
    """Max of [B,rows,cols] grid maps after bilinear upsampling to ``size``² (the authors' image-score max)."""
    up = F.interpolate(grid_maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return up.flatten(1).amax(dim=1)


class PromptADModel(nn.Module):
    """Prompt learner(s) + memory bank; the frozen backbone is passed in, never owned.

    Args:
        width: text-token width of the backbone.
        n_ctx, n_ctx_ab, n_pro_ab: learnable contexts (4, 1, 4).
        eam_margin, mean_loss_weight: m of L_EAM (0) and λ of L_mean (0.001).
        temperature_quirk: use ``logit_scale`` without ``exp`` (the authors' code).
        eam_token_axis_quirk: sum L_EAM over the token axis for patch tokens (the authors' ``TripletLoss``).
        variant: ``paper`` or ``code`` (module docstring).
        n_pro_cls: normal context sets of the code variant's classification prompts (3 in ``train_cls.py``).
        image_max_size: size to which ``M_v`` is upsampled before its max in the code variant (the eval size).
        scoring_dtype: precision of T's softmax, of ``M_v`` and of the CLS score (float32; the backbone's fp16/bf16
            with the low-precision scoring quirk, as the authors' ``calculate_*_anomaly_score``).
    """

    def __init__(
        self, width: int, n_ctx: int = 4, n_ctx_ab: int = 1, n_pro_ab: int = 4, eam_margin: float = 0.0,
        mean_loss_weight: float = 0.001, temperature_quirk: bool = False, eam_token_axis_quirk: bool = False,
        variant: Variant = "paper", n_pro_cls: int = 3, image_max_size: int = 400,
        scoring_dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__()
        check_variant(variant)
        self.variant = variant
        rule = "raw_mean" if variant == "code" else "normalised_mean"
        self.prompts = PromptLearner(width, n_ctx, n_ctx_ab, n_pro_ab, prototype_rule=rule)
        self.cls_prompts = (
            PromptLearner(width, n_ctx, n_ctx_ab, n_pro_ab, n_pro=n_pro_cls, prototype_rule=rule)
            if variant == "code"
            else None
        )
        self.memory = MemoryBank()
        self.eam_margin = eam_margin
        self.mean_loss_weight = mean_loss_weight
        self.temperature_quirk = temperature_quirk
        self.eam_token_axis_quirk = eam_token_axis_quirk
        self.image_max_size = image_max_size
        self.scoring_dtype = scoring_dtype
        #: Whether forward keeps :attr:`last_image_parts`: only the paper protocol's max-fusion callback asks, during
        #: the test loop, so an export records a forward that changes no attribute.
        self.record_image_parts = False
        self.last_image_parts: torch.Tensor | None = None  # [B,2] (max M_v, text score) of the last forward
        self.text: GroupFeatures | None = None
        self.cls_text: GroupFeatures | None = None

    def temperature(self, backbone: ClipBackbone) -> torch.Tensor:
        """CLIP's temperature ``exp(logit_scale)``, or the raw ``logit_scale`` (≈4.6) with the authors' quirk."""
        scale = backbone.logit_scale.detach()
        return scale if self.temperature_quirk else scale.exp()

    def build(self, backbone: ClipBackbone, category: str) -> None:
        texts = {"class": class_prompt_texts(category, "authors" if self.variant == "code" else "ours")}
        self.prompts.build(backbone, texts)
        if self.cls_prompts is not None:
            self.cls_prompts.build(backbone, texts)
        self.text = self.cls_text = None

    def fit_support(self, support: BackboneOutput) -> None:
        self.memory.fit(support.taps)

    def cache_text(self, backbone: ClipBackbone) -> None:
        """Encode the prompts once for evaluation (the contexts are fixed after training)."""
        with torch.no_grad():
            self.text = self.prompts.encode(backbone)["class"]
            self.cls_text = self.cls_prompts.encode(backbone)["class"] if self.cls_prompts is not None else self.text

    def _level_losses(self, tokens: torch.Tensor, text: GroupFeatures, t: torch.Tensor, token_axis: bool) -> tuple:
        """L_clip and L_EAM of normalised tokens against one prompt set."""
        normal = text.normal_prototype
        clip = prompt_contrastive_loss(tokens, normal, text.abnormal, t)
        eam = explicit_anomaly_margin_loss(
            tokens, normal, text.abnormal_prototype, self.eam_margin, sum_over_tokens_quirk=token_axis
        )
        return clip, eam

    def losses(self, features: BackboneOutput, backbone: ClipBackbone) -> dict[str, torch.Tensor]:
        """L = L_clip + L_EAM + λ·L_mean on the V-V patch tokens, plus L_clip + L_EAM on the CLS token.

        In the code variant the CLS terms (and their own L_mean) train the separate classification prompts, so the
        sum optimises the authors' two models independently (their parameters are disjoint).
        """
        t = self.temperature(backbone)
        text = self.prompts.encode(backbone)["class"]
        cls_text = self.cls_prompts.encode(backbone)["class"] if self.cls_prompts is not None else text
        patches = F.normalize(features.vv_tokens, dim=-1)
        cls = F.normalize(features.cls, dim=-1)
        clip, eam = self._level_losses(patches, text, t, self.eam_token_axis_quirk)
        clip_cls, eam_cls = self._level_losses(cls, cls_text, t, False)
        losses = {
            "clip": clip,
            "eam": eam,
            "clip_cls": clip_cls,
            "eam_cls": eam_cls,
            "mean": self.mean_loss_weight * prompt_mean_loss(text.handcrafted, text.learnable),
        }
        if self.cls_prompts is not None:
            losses["mean_cls"] = self.mean_loss_weight * prompt_mean_loss(cls_text.handcrafted, cls_text.learnable)
        losses["total"] = sum(losses.values())
        return losses

    def forward(self, features: BackboneOutput, backbone: ClipBackbone) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid maps [B,rows,cols] and image scores [B] from one backbone pass."""
        if self.text is None:
            self.cache_text(backbone)
        t = self.temperature(backbone)
        if self.scoring_dtype == torch.float32:
            visual = self.memory(features.taps)
            textual = two_way_probability(
                F.normalize(features.vv_tokens, dim=-1), self.text.normal_prototype, self.text.abnormal_prototype, t
            )
            image_text = two_way_probability(
                F.normalize(features.cls, dim=-1), self.cls_text.normal_prototype, self.cls_text.abnormal_prototype, t
            )
        else:
            textual, visual, image_text = self.low_precision_parts(features, t)
        grid = harmonic_fusion(textual, visual).reshape(visual.shape[0], *features.grid)
        if self.variant == "code":
            visual_max = upsampled_max(visual.reshape(visual.shape[0], *features.grid), self.image_max_size)
        else:
            visual_max = visual.amax(dim=1)
        if self.record_image_parts:  # the paper protocol's max fusion
            self.last_image_parts = torch.stack([visual_max, image_text.float()], dim=1)
        return grid, harmonic_fusion(visual_max, image_text)

    def low_precision_parts(self, features: BackboneOutput, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(T [B,N], M_v [B,N], CLS score [B]) as the authors' fp16 forward computes them: the tower outputs
        normalised, ``softmax((t·f) @ [p̄ⁿ; p̄ᵃ]ᵀ)`` and the memory bank's distances in ``scoring_dtype``. T and M_v
        return to fp32 (their maps are fp32 from there on); the CLS score stays low-precision, so the image-score
        fusion's ``1/s`` is taken in it, as their numpy metric does on the fp16 scores."""
        dtype = self.scoring_dtype

        def probability(tokens: torch.Tensor, text: GroupFeatures) -> torch.Tensor:
            unit = F.normalize(tokens.to(dtype), dim=-1)
            prototypes = torch.stack([text.normal_prototype, text.abnormal_prototype]).to(dtype)
            return ((t * unit) @ prototypes.T).softmax(dim=-1)[..., 1]

        textual = probability(features.vv_tokens, self.text).float()
        visual = self.memory(features.taps, dtype).float()
        return textual, visual, probability(features.cls, self.cls_text)
