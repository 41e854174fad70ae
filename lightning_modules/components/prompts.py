"""Learnable prompts shared by PromptAD and FineGrainedAD (methods.md §1 "Prompts", §2 "MLLP").

Every prompt is ``[SOS] N₁…N_c <body> [EOT]`` (normal and abnormal-handcrafted prompts, NHP/AHP) or
``[SOS] N₁…N_c A₁…A_a <body> [EOT]`` (abnormal-learnable prompts, ALP), where the ``N`` vectors are shared by all
prompts of all groups and each of the ``n_pro_ab`` ALP sets has its own ``A`` vectors. Bodies are plain text.
With ``n_pro`` > 1 (the authors' classification model uses 3) every NHP/AHP body is encoded once per normal context
set, and ALP row r of a body pairs normal set ``r mod n_pro`` with abnormal set ``r mod n_pro_ab`` (the authors'
expand order; with coprime counts, as 3 and 4, every pair occurs once).
All groups are encoded in one text-tower call truncated to the longest prompt (exact under the causal mask, P2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import ClipBackbone


@dataclass
class PromptGroupTexts:
    """The prompt bodies of one level (image, a component, background, ...).

    normal: NHP bodies; abnormal: AHP bodies; learnable_abnormal: ALP bodies (each gets every abnormal context set).
    """

    normal: list[str]
    abnormal: list[str] = field(default_factory=list)
    learnable_abnormal: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.normal:
            raise ValueError("a prompt group needs at least one normal prompt body")
        if not self.abnormal and not self.learnable_abnormal:
            raise ValueError("a prompt group needs abnormal or learnable-abnormal prompt bodies")


PrototypeRule = Literal["normalised_mean", "raw_mean"]


@dataclass
class GroupFeatures:
    """Encoded prompts of one group, as the text tower returns them (unnormalised).

    raw_normal: [Pn,D] NHP features; raw_handcrafted: [Ph,D] AHP features; raw_learnable: [Pl,D] ALP features.
    ``prototype_rule`` says how a prototype averages them: ``normalised_mean`` normalises each prompt first (our
    reading of the papers), ``raw_mean`` averages the raw features and normalises the mean, as the authors' code
    does for its test-time text features and training anchors (PromptAD ``build_text_feature_gallery``).
    """

    raw_normal: torch.Tensor
    raw_handcrafted: torch.Tensor
    raw_learnable: torch.Tensor
    prototype_rule: PrototypeRule = "normalised_mean"

    @cached_property
    def normal(self) -> torch.Tensor:
        """[Pn,D] L2-normalised NHP features."""
        return F.normalize(self.raw_normal, dim=-1)

    @cached_property
    def handcrafted(self) -> torch.Tensor:
        """[Ph,D] L2-normalised AHP features."""
        return F.normalize(self.raw_handcrafted, dim=-1)

    @cached_property
    def learnable(self) -> torch.Tensor:
        """[Pl,D] L2-normalised ALP features."""
        return F.normalize(self.raw_learnable, dim=-1)

    @property
    def abnormal(self) -> torch.Tensor:
        """All abnormal prompt features (AHP then ALP), normalised: the set 𝒫ᵃ of the losses."""
        return torch.cat([self.handcrafted, self.learnable])

    def _prototype(self, raw: torch.Tensor, normalised: torch.Tensor) -> torch.Tensor:
        source = raw if self.prototype_rule == "raw_mean" else normalised
        return F.normalize(source.mean(dim=0), dim=-1)

    @cached_property
    def normal_prototype(self) -> torch.Tensor:
        """p̄ⁿ: the normalised mean of the normal features."""
        return self._prototype(self.raw_normal, self.normal)

    @cached_property
    def abnormal_prototype(self) -> torch.Tensor:
        """p̄ᵃ: the normalised mean of all abnormal features (Eq. 5)."""
        return self._prototype(torch.cat([self.raw_handcrafted, self.raw_learnable]), self.abnormal)


class PromptLearner(nn.Module):
    """Shared learnable contexts, spliced in front of fixed prompt bodies, for any number of prompt groups."""

    def __init__(
        self,
        width: int,
        n_ctx: int = 4,
        n_ctx_ab: int = 1,
        n_pro_ab: int = 4,
        init_std: float = 0.02,
        n_pro: int = 1,
        prototype_rule: PrototypeRule = "normalised_mean",
    ) -> None:
        super().__init__()
        self.n_ctx, self.n_ctx_ab, self.n_pro_ab, self.n_pro = n_ctx, n_ctx_ab, n_pro_ab, n_pro
        self.prototype_rule = prototype_rule
        self.normal_context = nn.Parameter(torch.randn(n_pro, n_ctx, width) * init_std)
        self.abnormal_context = nn.Parameter(torch.randn(n_pro_ab, n_ctx_ab, width) * init_std)
        # one segment per (group, kind) in encoding order: (group, kind, body embeddings [n,L,W], eot [n], is_alp)
        self._segments: list[tuple[str, str, torch.Tensor, torch.Tensor, bool]] = []

    def build(self, backbone: ClipBackbone, groups: dict[str, PromptGroupTexts]) -> None:
        """Tokenise every body once and keep its frozen word embeddings; call again when the texts change."""
        device = self.normal_context.device
        segments = []
        for name, texts in groups.items():
            for kind, bodies, is_alp in (
                ("normal", texts.normal, False),
                ("handcrafted", texts.abnormal, False),
                ("learnable", texts.learnable_abnormal, True),
            ):
                if not bodies:
                    segments.append((name, kind, torch.empty(0, device=device), torch.empty(0, dtype=torch.long), is_alp))
                    continue
                tokens = backbone.tokenize(bodies)
                eot = tokens.argmax(dim=-1)
                extra = self.n_ctx + (self.n_ctx_ab if is_alp else 0)
                if int(eot.max()) + 1 + extra > tokens.shape[1]:
                    worst = bodies[int(eot.argmax())]
                    raise ValueError(f"prompt too long for CLIP's {tokens.shape[1]} tokens with contexts: {worst!r}")
                with torch.no_grad():
                    words = backbone.token_embedding(tokens.to(backbone.clip.token_embedding.weight.device)).float()
                segments.append((name, kind, words.to(device), eot.to(device), is_alp))
        self._segments = segments

    @property
    def is_built(self) -> bool:
        return bool(self._segments)

    @staticmethod
    def _splice(words: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """``[SOS] context <body> ...`` row by row for ``words`` [n,L,W] and ``contexts`` [n,c,W], cut to length L."""
        length = words.shape[1]
        return torch.cat([words[:, :1], contexts.to(words.dtype), words[:, 1:]], dim=1)[:, :length]

    def rows_per_body(self, is_alp: bool) -> int:
        """How many prompts one body yields: ``n_pro`` for NHP/AHP, ``n_pro·n_pro_ab`` for ALP."""
        return self.n_pro * self.n_pro_ab if is_alp else self.n_pro

    def _contexts(self, is_alp: bool) -> torch.Tensor:
        """The context vectors of each prompt row of one body: [rows_per_body, n_ctx(+n_ctx_ab), W]."""
        if not is_alp:
            return self.normal_context
        rows = torch.arange(self.n_pro * self.n_pro_ab)
        return torch.cat([self.normal_context[rows % self.n_pro], self.abnormal_context[rows % self.n_pro_ab]], dim=1)

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [P,L,W] of every prompt, body-major (each body's context rows together), and EOT indices."""
        if not self.is_built:
            raise RuntimeError("PromptLearner.build must run before encoding")
        rows, eots = [], []
        for _, _, words, eot, is_alp in self._segments:
            if words.numel() == 0:
                continue
            contexts = self._contexts(is_alp)
            per_body = len(contexts)
            rows.append(self._splice(words.repeat_interleave(per_body, dim=0), contexts.repeat(len(words), 1, 1)))
            eots.append((eot + contexts.shape[1]).repeat_interleave(per_body))
        return torch.cat(rows), torch.cat(eots)

    def encode(self, backbone: ClipBackbone, truncate: bool = True, bucket: int = 8) -> dict[str, GroupFeatures]:
        """Encode every group through the text tower (with gradients to the contexts).

        With ``truncate`` the prompts are grouped by length into buckets of ``bucket`` tokens and each bucket is
        encoded only up to its own longest prompt, which is exact under CLIP's causal mask (P2).
        """
        embeddings, eot = self.prompt_embeddings()
        if truncate:
            features = torch.empty(len(eot), backbone.embed_dim, device=embeddings.device)
            lengths = torch.div(eot, bucket, rounding_mode="floor")
            for value in lengths.unique():
                rows = (lengths == value).nonzero().squeeze(1)
                features[rows] = backbone.encode_text_embeddings(embeddings[rows], eot[rows], truncate=True)
        else:
            features = backbone.encode_text_embeddings(embeddings, eot, truncate=False)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        start = 0
        for name, kind, words, _, is_alp in self._segments:
            count = len(words) * self.rows_per_body(is_alp) if words.numel() else 0
            parts.setdefault(name, {})[f"raw_{kind}"] = features[start : start + count]
            start += count
        return {name: GroupFeatures(**kinds, prototype_rule=self.prototype_rule) for name, kinds in parts.items()}
