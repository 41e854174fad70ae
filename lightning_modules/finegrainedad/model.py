"""FineGrainedAD (Pattern Recognition 2026) in pure torch: multi-level prompts, region-weighted alignment, Query
Former and token-wise inference (methods.md §2; equation numbers as reconstructed there).

Levels are the N_c components, the foreground (``variant: paper``; the code has none), the image and the
background. The frozen backbone is passed in, never owned.
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
from fsad.lightning_modules.promptad.model import two_way_probability, upsampled_max


class LevelQueryFormer(nn.Module):
    """The released code's Query Former (``variant: code``): each level's query attends to a single key, its own
    level's prototype, so the attention weights are 1 and the layer is the per-level linear map
    ``q_l = W[p̄ⁿ_l; p̄ᵃ_l] + b`` (methods.md §2, "Query Former")."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(2 * dim, dim)

    def forward(self, normal: torch.Tensor, abnormal: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        """[L,D] and [L,D] prototypes → [L,D] L2-normalised queries."""
        return F.normalize(self.project(torch.cat([normal, abnormal], dim=-1)), dim=-1)


class CosineCrossAttention(nn.Module):
    """One cross-attention layer of the paper's Query Former: single-head attention whose scores are
    ``scale · cos(query, key)`` and whose values are the keys (the prompt features) themselves.

    Why not the usual ``(qW_q)(kW_k)ᵀ/√D`` head: with unit-norm CLIP features at D = 640 its scores start within
    ~0.04 of each other, every query attends uniformly, all intrinsic representations are equal and no objective
    has a gradient that tells them apart (measured: still collapsed after 100 SGD steps at lr 2e-3). Cosine scores at
    ``scale`` 50 (CLIP-like sharpness) differ from the first step, so each query can move its attention towards its
    own level.
    """

    def __init__(self, scale: float = 50.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [L,D], features [P,D] → (attended features [L,D], attention weights [L,P])."""
        weights = (self.scale * F.normalize(queries, dim=-1) @ F.normalize(features, dim=-1).T).softmax(dim=-1)
        return weights @ features, weights


class CrossAttentionQueryFormer(nn.Module):
    """The paper's Query Former (PAD branch): randomly initialised learnable multi-level intrinsic representations
    are the queries; two parallel cross-attention layers read, as keys and values, every level's normal prompt
    features and every level's abnormal prompt features respectively; one projection fuses the two outputs.

    Attention decides which level's evidence each intrinsic representation draws on; :func:`query_former_loss`
    trains query l to represent level l. The projection starts as the mean of the two attended features (weights
    [I/2, I/2], bias 0): a random start rotates the objective's gradient away from the prompt-feature geometry the
    queries must move in, and whether they separate within the paper's 100 SGD steps then depends on the draw.
    ``resize(levels)`` creates one query per level once the caption record (and so the number of levels) is known.
    """

    def __init__(self, dim: int, attention_scale: float = 50.0) -> None:
        super().__init__()
        self.dim = dim
        self.queries = nn.Parameter(torch.empty(0, dim))
        self.normal_attention = CosineCrossAttention(attention_scale)
        self.abnormal_attention = CosineCrossAttention(attention_scale)
        self.project = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.project.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], dim=1) / 2)
            self.project.bias.zero_()

    def resize(self, levels: int) -> None:
        """(Re)create ``levels`` intrinsic queries, N(0, 1/D) like CLIP's embeddings, if their number changed."""
        if self.queries.shape[0] != levels:
            self.queries = nn.Parameter(torch.randn(levels, self.dim, device=self.queries.device) * self.dim**-0.5)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint fixes the number of levels: take its query count before loading (even before ``build``)."""
        stored = state_dict.get(prefix + "queries")
        if stored is not None:
            self.resize(stored.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        normal: torch.Tensor,
        abnormal: torch.Tensor,
        normal_features: torch.Tensor,
        abnormal_features: torch.Tensor,
    ) -> torch.Tensor:
        """Intrinsic representations [L,D] (normalised) from all normal [Pn,D] and all abnormal [Pa,D] prompt features.

        ``normal``/``abnormal`` (the per-level prototypes) only fix L here; the objective compares against them.
        """
        if self.queries.shape[0] != normal.shape[0]:
            raise RuntimeError(f"Query Former has {self.queries.shape[0]} queries for {normal.shape[0]} levels")
        from_normal = self.normal_attention(self.queries, normal_features)[0]
        from_abnormal = self.abnormal_attention(self.queries, abnormal_features)[0]
        return F.normalize(self.project(torch.cat([from_normal, from_abnormal], dim=-1)), dim=-1)


QUERY_CONTRAST_TEMPERATURE = 20.0
"""τ of :func:`query_former_loss`: level prototypes of CLIP text features sit at cosines of 0.8–0.9 from each other,
so a cosine gap of 0.1 must already count (τ·0.1 = 2 logits)."""


def query_former_loss(
    queries: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, temperature: float = QUERY_CONTRAST_TEMPERATURE
) -> torch.Tensor:
    """The Query Former objective, our reading of "maximise the cosine similarity between the intrinsic features and
    the corresponding normal/abnormal prompt features": a contrast over levels. Intrinsic representation l [L,D]
    must be nearer level l's prototypes p̄ⁿ_l and p̄ᵃ_l [L,D] than any other level's:
    ``½·(CE(τ·q p̄ⁿᵀ, l) + CE(τ·q p̄ᵃᵀ, l))``, mean over l.

    Maximising the cosines alone has one optimum for every query (the direction shared by all levels), so the
    queries collapse and Eq. 4 routes by float noise; the other levels as negatives keep query l on what sets level
    l apart.
    """
    target = torch.arange(len(queries), device=queries.device)
    return 0.5 * (
        F.cross_entropy(temperature * queries @ normal.T, target)
        + F.cross_entropy(temperature * queries @ abnormal.T, target)
    )


def max_pairwise_cosine(queries: torch.Tensor) -> float:
    """Largest cosine between two different rows of ``queries`` [L,D] (1.0 = two queries coincide); −1 for L < 2."""
    if len(queries) < 2:
        return -1.0
    unit = F.normalize(queries, dim=-1)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(-1.0)
    return float(cosines.max())


def token_wise_scores(
    tokens: torch.Tensor,
    queries: torch.Tensor,
    normal: torch.Tensor,
    abnormal: torch.Tensor,
    temperature,
    route: bool = True,
) -> torch.Tensor:
    """Eq. 4: each token takes the level l* = argmax_l cos(v_j, q_l) and scores softmax(t·[⟨v,p̄ⁿ_l*⟩,⟨v,p̄ᵃ_l*⟩])₁.

    ``route=False`` is Tab. 5's "without dynamic token-wise inference": the mean of that score over all levels.
    tokens: [..., D] normalised; queries, normal, abnormal: [L,D] normalised. Returns [...] in [0,1].
    """
    if not route:
        logits = temperature * torch.stack([tokens @ normal.T, tokens @ abnormal.T], dim=-1)  # [..., L, 2]
        return logits.softmax(dim=-1)[..., 1].mean(dim=-1)
    level = (tokens @ queries.T).argmax(dim=-1)
    logits = temperature * torch.stack([(tokens * normal[level]).sum(-1), (tokens * abnormal[level]).sum(-1)], -1)
    return logits.softmax(dim=-1)[..., 1]


class FineGrainedADModel(nn.Module):
    """Prompt learner over all MFSC levels, Attr-MoE gates, Query Former and the memory bank.

    ``variant: code`` also holds ``classifier``: the released code's separate classification model, the same levels
    with ``n_pro_cls`` normal context sets, its own Attr-MoE weights and Query Former, trained on CLS losses alone;
    it gives the image score's text part. Its parameters are disjoint from the segmentation prompts', so training
    both on the sum of their losses with one SGD equals the code's two trainings.
    """

    def __init__(
        self, text_width: int, embed_dim: int, n_ctx: int = 4, n_ctx_ab: int = 1, n_pro_ab: int = 4,
        eam_margin: float = 1.0, mean_loss_weight: float = 0.001, reg_weight: float = 1.0,
        temperature_quirk: bool = False, image_reweighting: bool = False, train_query_former: bool = True,
        variant: str = "paper", reg_lambda: float = 1.0, image_max_size: int | None = None, n_pro: int = 1,
        n_pro_cls: int | None = None, token_wise: bool = True, image_level_only: bool = False, attr_moe: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.variant = variant
        self.image_max_size = image_max_size  # code: max M_v of Eq. 8 over the map upsampled to this size
        code = variant == "code"
        self.prompts = PromptLearner(
            text_width, n_ctx, n_ctx_ab, n_pro_ab, n_pro=n_pro, prototype_rule="raw_mean" if code else "normalised_mean"
        )
        self.query_former = LevelQueryFormer(embed_dim) if code else CrossAttentionQueryFormer(embed_dim)
        self.reg_lambda = reg_lambda
        # the code's Attr-MoE: gated attribute prompt sequences added to the image prompts, [normal/abnormal,
        # relation/color/texture/shape]. The paper's weighs the component placeholders (PromptLearner.slot_gate_logits).
        self.attribute_gates = nn.Parameter(torch.randn(2, 4)) if code and attr_moe else None
        self.token_wise = token_wise  # Tab. 5: False averages every level's score per token instead of Eq. 4's choice
        self.image_level_only = image_level_only  # Tab. 5: the image-level prompts alone
        self.memory = MemoryBank()
        self.eam_margin, self.mean_loss_weight, self.reg_weight = eam_margin, mean_loss_weight, reg_weight
        self.temperature_quirk = temperature_quirk
        #: Whether forward keeps :attr:`last_image_parts`: only the paper protocol's max-fusion callback asks, during
        #: the test loop, so an export records a forward that changes no attribute.
        self.record_image_parts = False
        self.last_image_parts: torch.Tensor | None = None  # [B,2] (max M_v, text score) of the last forward
        self.image_reweighting = image_reweighting
        self.train_query_former = train_query_former
        self.components: list[str] = []
        self.attributes: list[str] = []
        self.level_names: list[str] = []
        self.levels: dict[str, torch.Tensor] | None = None
        self.classifier = None
        if n_pro_cls is not None:
            self.classifier = FineGrainedADModel(
                text_width, embed_dim, n_ctx, n_ctx_ab, n_pro_ab, eam_margin, mean_loss_weight,
                temperature_quirk=temperature_quirk, train_query_former=False, variant=variant, n_pro=n_pro_cls,
                token_wise=token_wise, image_level_only=image_level_only, attr_moe=attr_moe,
            )  # fmt: skip

    ATTRIBUTE_ORDER = ("relation", "color", "texture", "shape")

    def build(self, backbone: ClipBackbone, texts: PromptTexts) -> None:
        """Tokenise every level's prompt bodies (from :func:`mllp_texts`); fix the level order
        components…, foreground (if the texts have one), image, background — or the image level alone
        (``image_level_only``, with the attribute groups the code's Attr-MoE mixes into it)."""
        groups = texts.groups()
        if self.image_level_only:
            groups = {name: g for name, g in groups.items() if name == "image" or name.startswith("attribute:")}
        self.components = [] if self.image_level_only else list(texts.components)
        self.attributes = [a for a in self.ATTRIBUTE_ORDER if f"attribute:{a}" in groups]
        if self.attributes and self.attribute_gates is None:
            raise ValueError(
                "attribute groups are the code's Attr-MoE; build variant: paper from placeholder texts, and drop them "
                "without Attr-MoE"
            )
        foreground = ["foreground"] if texts.foreground is not None else []
        self.level_names = (
            ["image"]
            if self.image_level_only
            else [f"component:{c}" for c in self.components] + foreground + ["image", "background"]
        )
        self.prompts.build(backbone, groups)
        if isinstance(self.query_former, CrossAttentionQueryFormer):
            self.query_former.resize(len(self.level_names))
        self.levels = None
        if self.classifier is not None:
            self.classifier.build(backbone, texts)

    def region_channel(self, level: str) -> int | None:
        """Which channel of the region weights (components…, foreground, background) weighs a level's tokens;
        None for the image level, which weighs every token alike."""
        if level == "image":
            return None
        if level == "foreground":
            return len(self.components)
        if level == "background":
            return len(self.components) + 1
        return self.components.index(level.removeprefix("component:"))

    def temperature(self, backbone: ClipBackbone) -> torch.Tensor:
        scale = backbone.logit_scale.detach()
        return scale if self.temperature_quirk else scale.exp()

    def fit_support(self, support: BackboneOutput) -> None:
        self.memory.fit(support.taps)

    # ------------------------------------------------------------------ text side
    def encode_levels(self, backbone: ClipBackbone) -> tuple[dict[str, GroupFeatures], dict[str, torch.Tensor]]:
        """Encode all prompts; return the groups and the per-level prototypes stacked in ``level_names`` order.

        ``variant: code``'s Attr-MoE adds each attribute prompt's token sequence, weighted by σ(w_a), into the image
        prompts before the text tower (normal weights into the NHPs, abnormal weights into the AHPs and ALPs).
        ``image_learnable`` is the image level's ALP prototype (Eq. 6).
        """
        mixes = {
            f"attribute:{name}": ("image", torch.sigmoid(self.attribute_gates[0, slot]),
                                  torch.sigmoid(self.attribute_gates[1, slot]))
            for slot, name in enumerate(self.ATTRIBUTE_ORDER) if name in self.attributes
        }  # fmt: skip
        groups = self.prompts.encode(backbone, mixes=mixes)
        level_groups = [groups[name] for name in self.level_names]
        return groups, {
            "normal": torch.stack([g.normal_prototype for g in level_groups]),
            "abnormal": torch.stack([g.abnormal_prototype for g in level_groups]),
            "normal_features": torch.cat([g.normal for g in level_groups]),
            "abnormal_features": torch.cat([g.abnormal for g in level_groups]),
            "image_learnable": groups["image"].learnable_prototype,
        }

    def queries(self, levels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Query Former's multi-level intrinsic representations [L,D] for the encoded levels."""
        return self.query_former(
            levels["normal"], levels["abnormal"],
            normal_features=levels["normal_features"], abnormal_features=levels["abnormal_features"],
        )  # fmt: skip

    def cache_text(self, backbone: ClipBackbone) -> None:
        """Level prototypes and queries (the classifier's too), computed once per evaluation run."""
        with torch.no_grad():
            _, levels = self.encode_levels(backbone)
            levels["queries"] = self.queries(levels)
        self.levels = levels
        if self.classifier is not None:
            self.classifier.cache_text(backbone)

    def query_separation(self, backbone: ClipBackbone) -> float:
        """Max pairwise cosine of the current intrinsic representations (1.0: two queries coincide, so Eq. 4 cannot
        tell their levels apart); a diagnostic, computed without gradients."""
        with torch.no_grad():
            return max_pairwise_cosine(self.queries(self.encode_levels(backbone)[1]))

    @property
    def image_level(self) -> int:
        """Index of the image level in ``level_names``."""
        return self.level_names.index("image")

    # ------------------------------------------------------------------ training
    def losses(
        self, features: BackboneOutput, backbone: ClipBackbone, region_weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Eq. 2–3 at every level plus the Query Former objective.

        region_weights: [B, N_c+2, rows, cols] weights w_i of each component region, the foreground and the
        background (:meth:`region_channel`). ``variant: code`` computes the released segmentation loss
        (``train_seg_finegrained_patch.py``): no CLS terms, L_EAM summed over the token axis, and L_reg over the raw
        sum of the component ALP features.
        """
        code = self.variant == "code"
        groups, levels = self.encode_levels(backbone)
        t = self.temperature(backbone)
        tokens = F.normalize(features.vv_tokens, dim=-1)  # [B,N,D]
        cls = F.normalize(features.cls, dim=-1)
        weights = region_weights.flatten(2)  # [B,R,N]
        losses: dict[str, torch.Tensor] = {}
        for level, name in enumerate(self.level_names):
            group = groups[name]
            normal, abnormal_mean = levels["normal"][level], levels["abnormal"][level]
            channel = self.region_channel(name)
            w = None if channel is None else weights[:, channel]
            if name == "image" and not code:
                losses["clip_cls"] = prompt_contrastive_loss(cls, normal, group.abnormal, t)
                losses["eam_cls"] = explicit_anomaly_margin_loss(cls, normal, abnormal_mean, self.eam_margin)
            losses[f"clip/{name}"] = prompt_contrastive_loss(tokens, normal, group.abnormal, t, w)
            losses[f"eam/{name}"] = explicit_anomaly_margin_loss(
                tokens, normal, abnormal_mean, self.eam_margin, w, sum_over_tokens_quirk=code
            )
            if name != "background":
                losses[f"mean/{name}"] = self.mean_loss_weight * prompt_mean_loss(group.handcrafted, group.learnable)
        if self.components:  # Eq. 3 on the learnable abnormal prompts (a record without components has no L_reg)
            learnables = [groups[f"component:{c}"] for c in self.components]
            component_learnables = torch.stack([g.raw_learnable if code else g.learnable for g in learnables])
            losses["reg"] = self.reg_weight * level_regulariser(
                groups["image"].learnable, component_learnables, groups["background"].normal, self.reg_lambda
            )
        if self.train_query_former:
            detached = {key: value.detach() for key, value in levels.items()}
            losses["query_former"] = query_former_loss(self.queries(detached), detached["normal"], detached["abnormal"])
        if self.classifier is not None:
            losses.update({f"cls/{k}": v for k, v in self.classifier.classification_losses(cls, backbone).items()})
        losses["total"] = sum(losses.values())
        return losses

    def classification_losses(self, cls: torch.Tensor, backbone: ClipBackbone) -> dict[str, torch.Tensor]:
        """The released classification model's loss (``train_cls_finegrained_patch.py``) on normalised CLS
        embeddings [B,D]: L_clip and L_EAM at every level, unweighted, and L_mean at every level but the
        background; no L_reg."""
        groups, levels = self.encode_levels(backbone)
        t = self.temperature(backbone)
        losses: dict[str, torch.Tensor] = {}
        for level, name in enumerate(self.level_names):
            group, normal = groups[name], levels["normal"][level]
            losses[f"clip/{name}"] = prompt_contrastive_loss(cls, normal, group.abnormal, t)
            losses[f"eam/{name}"] = explicit_anomaly_margin_loss(
                cls, normal, levels["abnormal"][level], self.eam_margin
            )
            if name != "background":
                losses[f"mean/{name}"] = self.mean_loss_weight * prompt_mean_loss(group.handcrafted, group.learnable)
        return losses

    # ------------------------------------------------------------------ inference
    def textual_map(self, features: BackboneOutput, backbone: ClipBackbone) -> torch.Tensor:
        """The prompt-guided token map [B,N] alone: Eq. 4, re-weighted by Eq. 6 when ``image_reweighting``."""
        if self.levels is None:
            self.cache_text(backbone)
        levels, t = self.levels, self.temperature(backbone)
        tokens = F.normalize(features.vv_tokens, dim=-1)
        textual = token_wise_scores(
            tokens, levels["queries"], levels["normal"], levels["abnormal"], t, route=self.token_wise
        )
        if self.image_reweighting:  # Eq. 6 (our reading): image-level ALP map, geometric mean keeps [0,1]
            image_map = two_way_probability(tokens, levels["normal"][self.image_level], levels["image_learnable"], t)
            textual = (textual * image_map).sqrt()
        return textual

    def forward(self, features: BackboneOutput, backbone: ClipBackbone) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-wise textual map (:meth:`textual_map`) fused with M_v (Eq. 7); image score Eq. 8."""
        textual = self.textual_map(features, backbone)
        t = self.temperature(backbone)
        visual = self.memory(features.taps)
        grid = harmonic_fusion(textual, visual).reshape(visual.shape[0], *features.grid)
        cls = F.normalize(features.cls, dim=-1)
        scorer = self.levels if self.classifier is None else self.classifier.levels
        image_text = token_wise_scores(
            cls, scorer["queries"], scorer["normal"], scorer["abnormal"], t, route=self.token_wise
        )
        if self.image_max_size is None:
            visual_max = visual.amax(dim=1)
        else:  # the authors' cls forward: max of the bilinearly upsampled visual map
            visual_max = upsampled_max(visual.reshape(visual.shape[0], *features.grid), self.image_max_size)
        if self.record_image_parts:  # the paper protocol's max fusion
            self.last_image_parts = torch.stack([visual_max, image_text], dim=1)
        return grid, harmonic_fusion(visual_max, image_text)
