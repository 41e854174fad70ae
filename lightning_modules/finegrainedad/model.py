"""FineGrainedAD (Pattern Recognition 2026) in pure torch: multi-level prompts, region-weighted alignment, Query
Former and token-wise inference (methods.md §2; equation numbers as reconstructed there).

Levels are the N_c components, the image and the background. The frozen backbone is passed in, never owned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput, ClipBackbone
from fsad.lightning_modules.components.losses import (
    explicit_anomaly_margin_loss,
    level_regulariser,
    prompt_contrastive_loss,
    prompt_mean_loss,
)
from fsad.lightning_modules.components.memory_bank import MemoryBank
from fsad.lightning_modules.components.postprocess import harmonic_fusion
from fsad.lightning_modules.components.prompts import GroupFeatures, PromptLearner
from fsad.lightning_modules.finegrainedad.mfsc import PromptTexts
from fsad.lightning_modules.promptad.model import two_way_probability


class QueryFormer(nn.Module):
    """One query per level from that level's normal and abnormal prototypes (the authors' cross-attention reduces
    to this per-level linear map, since each query attends to a single key): ``q_l = W[p̄ⁿ_l; p̄ᵃ_l] + b``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(2 * dim, dim)

    def forward(self, normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
        """[L,D] and [L,D] prototypes → [L,D] L2-normalised queries."""
        return F.normalize(self.project(torch.cat([normal, abnormal], dim=-1)), dim=-1)


def query_former_loss(queries: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """The paper's Query Former objective: maximise cos(q_l, p̄ⁿ_l) + cos(q_l, p̄ᵃ_l) → minimise 2 − both, mean."""
    return (2 - (queries * normal).sum(-1) - (queries * abnormal).sum(-1)).mean()


def token_wise_scores(
    tokens: torch.Tensor, queries: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, temperature
) -> torch.Tensor:
    """Eq. 4: each token takes the level l* = argmax_l cos(v_j, q_l) and scores softmax(t·[⟨v,p̄ⁿ_l*⟩,⟨v,p̄ᵃ_l*⟩])₁.

    tokens: [..., D] normalised; queries, normal, abnormal: [L,D] normalised. Returns [...] in [0,1].
    """
    level = (tokens @ queries.T).argmax(dim=-1)
    logits = temperature * torch.stack([(tokens * normal[level]).sum(-1), (tokens * abnormal[level]).sum(-1)], -1)
    return logits.softmax(dim=-1)[..., 1]


class FineGrainedADModel(nn.Module):
    """Prompt learner over all MFSC levels, Attr-MoE gates, Query Former and the memory bank."""

    def __init__(
        self, text_width: int, embed_dim: int, n_ctx: int = 4, n_ctx_ab: int = 1, n_pro_ab: int = 4,
        eam_margin: float = 1.0, mean_loss_weight: float = 0.001, reg_weight: float = 1.0,
        temperature_quirk: bool = False, image_reweighting: bool = False, train_query_former: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.prompts = PromptLearner(text_width, n_ctx, n_ctx_ab, n_pro_ab)
        self.query_former = QueryFormer(embed_dim)
        self.attribute_gates = nn.Parameter(torch.randn(2, 4))  # [normal/abnormal, relation/color/texture/shape]
        self.memory = MemoryBank()
        self.eam_margin, self.mean_loss_weight, self.reg_weight = eam_margin, mean_loss_weight, reg_weight
        self.temperature_quirk = temperature_quirk
        self.last_image_parts: torch.Tensor | None = None  # [B,2] (max M_v, text score) of the last forward
        self.image_reweighting = image_reweighting
        self.train_query_former = train_query_former
        self.components: list[str] = []
        self.attributes: list[str] = []
        self.levels: dict[str, torch.Tensor] | None = None

    ATTRIBUTE_ORDER = ("relation", "color", "texture", "shape")

    def build(self, backbone: ClipBackbone, texts: PromptTexts) -> None:
        """Tokenise every level's prompt bodies (from :func:`mllp_texts`)."""
        self.components = list(texts.components)
        self.attributes = [a for a in self.ATTRIBUTE_ORDER if a in texts.attributes]
        self.prompts.build(backbone, texts.groups())
        self.levels = None

    def temperature(self, backbone: ClipBackbone) -> torch.Tensor:
        scale = backbone.logit_scale.detach()
        return scale if self.temperature_quirk else scale.exp()

    def fit_support(self, support: BackboneOutput) -> None:
        self.memory.fit(support.taps)

    # ------------------------------------------------------------------ text side
    def encode_levels(self, backbone: ClipBackbone) -> tuple[dict[str, GroupFeatures], dict[str, torch.Tensor]]:
        """Encode all prompts; return the raw groups and stacked per-level prototypes.

        Level order: components…, image, background. The image prototypes mix in the attribute prototypes through
        the Attr-MoE gates: ``p̄_img ← norm(p̄_img + Σ_a σ(w_a)·p̄_a)`` (separately for normal and abnormal).
        """
        groups = self.prompts.encode(backbone)
        image = groups["image"]
        image_normal, image_abnormal = image.normal_prototype, image.abnormal_prototype
        for slot, name in enumerate(self.ATTRIBUTE_ORDER):
            if name in self.attributes:
                attribute = groups[f"attribute:{name}"]
                image_normal = image_normal + torch.sigmoid(self.attribute_gates[0, slot]) * attribute.normal_prototype
                image_abnormal = (
                    image_abnormal + torch.sigmoid(self.attribute_gates[1, slot]) * attribute.abnormal_prototype
                )
        ordered = [groups[f"component:{c}"] for c in self.components] + [None, groups["background"]]
        normal = [g.normal_prototype if g is not None else F.normalize(image_normal, dim=-1) for g in ordered]
        abnormal = [g.abnormal_prototype if g is not None else F.normalize(image_abnormal, dim=-1) for g in ordered]
        return groups, {"normal": torch.stack(normal), "abnormal": torch.stack(abnormal)}

    def cache_text(self, backbone: ClipBackbone) -> None:
        """Level prototypes and queries, computed once per evaluation run."""
        with torch.no_grad():
            _, levels = self.encode_levels(backbone)
            levels["queries"] = self.query_former(levels["normal"], levels["abnormal"])
        self.levels = levels

    @property
    def image_level(self) -> int:
        return len(self.components)

    # ------------------------------------------------------------------ training
    def losses(
        self, features: BackboneOutput, backbone: ClipBackbone, region_weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Eq. 2–3 at every level plus the Query Former objective.

        region_weights: [B, N_c+1, rows, cols] weights w_i of each component region and of the background (last).
        """
        groups, levels = self.encode_levels(backbone)
        t = self.temperature(backbone)
        tokens = F.normalize(features.vv_tokens, dim=-1)  # [B,N,D]
        cls = F.normalize(features.cls, dim=-1)
        weights = region_weights.flatten(2)  # [B,R,N]
        losses: dict[str, torch.Tensor] = {}
        names = [f"component:{c}" for c in self.components] + ["image", "background"]
        for level, name in enumerate(names):
            group = groups[name]
            normal, abnormal_mean = levels["normal"][level], levels["abnormal"][level]
            if name == "image":
                w = None
                losses["clip_cls"] = prompt_contrastive_loss(cls, normal, group.abnormal, t)
                losses["eam_cls"] = explicit_anomaly_margin_loss(cls, normal, abnormal_mean, self.eam_margin)
            else:
                w = weights[:, level if level < self.image_level else -1]
            losses[f"clip/{name}"] = prompt_contrastive_loss(tokens, normal, group.abnormal, t, w)
            losses[f"eam/{name}"] = explicit_anomaly_margin_loss(tokens, normal, abnormal_mean, self.eam_margin, w)
            if name != "background":
                losses[f"mean/{name}"] = self.mean_loss_weight * prompt_mean_loss(group.handcrafted, group.learnable)
        component_abnormal = levels["abnormal"][: self.image_level]
        losses["reg"] = level_regulariser(
            levels["abnormal"][self.image_level], component_abnormal, levels["normal"][-1], 1.0
        ) * self.reg_weight
        if self.train_query_former:
            normal, abnormal = levels["normal"].detach(), levels["abnormal"].detach()
            losses["query_former"] = query_former_loss(self.query_former(normal, abnormal), normal, abnormal)
        losses["total"] = sum(losses.values())
        return losses

    # ------------------------------------------------------------------ inference
    def forward(self, features: BackboneOutput, backbone: ClipBackbone) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-wise textual map (Eq. 4, optionally re-weighted by Eq. 6), fused with M_v (Eq. 7); score Eq. 8."""
        if self.levels is None:
            self.cache_text(backbone)
        levels, t = self.levels, self.temperature(backbone)
        tokens = F.normalize(features.vv_tokens, dim=-1)
        textual = token_wise_scores(tokens, levels["queries"], levels["normal"], levels["abnormal"], t)
        if self.image_reweighting:  # Eq. 6 (inferred): re-weight by the image-level map, geometric mean keeps [0,1]
            image_map = two_way_probability(
                tokens, levels["normal"][self.image_level], levels["abnormal"][self.image_level], t
            )
            textual = (textual * image_map).sqrt()
        visual = self.memory(features.taps)
        grid = harmonic_fusion(textual, visual).reshape(visual.shape[0], *features.grid)
        cls = F.normalize(features.cls, dim=-1)
        image_text = token_wise_scores(cls, levels["queries"], levels["normal"], levels["abnormal"], t)
        self.last_image_parts = torch.stack([visual.amax(dim=1), image_text], dim=1)  # for the paper's fusion quirk
        return grid, harmonic_fusion(visual.amax(dim=1), image_text)
