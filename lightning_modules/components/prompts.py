"""Learnable prompts shared by PromptAD and FineGrainedAD (methods.md §1 "Prompts", §2 "MLLP").

Every prompt is ``[SOS] N₁…N_c <body> [EOT]`` (normal and abnormal-handcrafted prompts, NHP/AHP) or
``[SOS] N₁…N_c A₁…A_a <body> [EOT]`` (abnormal-learnable prompts, ALP), where the ``N`` vectors are shared by all
prompts of all groups and each of the ``n_pro_ab`` ALP sets has its own ``A`` vectors. Bodies are plain text.
All groups are encoded in one text-tower call truncated to the longest prompt (exact under the causal mask, P2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class GroupFeatures:
    """Encoded prompts of one group, each row L2-normalised.

    normal: [Pn,D] NHP features; handcrafted: [Ph,D] AHP features; learnable: [Pl,D] ALP features.
    """

    normal: torch.Tensor
    handcrafted: torch.Tensor
    learnable: torch.Tensor

    @property
    def abnormal(self) -> torch.Tensor:
        """All abnormal prompt features (AHP then ALP), the set 𝒫ᵃ of the losses."""
        return torch.cat([self.handcrafted, self.learnable])

    @property
    def normal_prototype(self) -> torch.Tensor:
        """p̄ⁿ: the normalised mean of the normal features."""
        return F.normalize(self.normal.mean(dim=0), dim=-1)

    @property
    def abnormal_prototype(self) -> torch.Tensor:
        """p̄ᵃ: the normalised mean of all abnormal features (Eq. 5)."""
        return F.normalize(self.abnormal.mean(dim=0), dim=-1)


class PromptLearner(nn.Module):
    """Shared learnable contexts, spliced in front of fixed prompt bodies, for any number of prompt groups."""

    def __init__(self, width: int, n_ctx: int = 4, n_ctx_ab: int = 1, n_pro_ab: int = 4, init_std: float = 0.02):
        super().__init__()
        self.n_ctx, self.n_ctx_ab, self.n_pro_ab = n_ctx, n_ctx_ab, n_pro_ab
        self.normal_context = nn.Parameter(torch.randn(n_ctx, width) * init_std)
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

    def _splice(self, words: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``[SOS] context <body> ...`` for every row of ``words`` [n,L,W], cut back to length L."""
        length = words.shape[1]
        expanded = context.to(words.dtype).expand(words.shape[0], -1, -1)
        return torch.cat([words[:, :1], expanded, words[:, 1:]], dim=1)[:, :length]

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [P,L,W] of every prompt (each ALP body once per abnormal context set) and EOT indices."""
        if not self.is_built:
            raise RuntimeError("PromptLearner.build must run before encoding")
        rows, eots = [], []
        for _, _, words, eot, is_alp in self._segments:
            if words.numel() == 0:
                continue
            if not is_alp:
                rows.append(self._splice(words, self.normal_context))
                eots.append(eot + self.n_ctx)
                continue
            per_set = [self._splice(words, torch.cat([self.normal_context, a])) for a in self.abnormal_context]
            rows.append(torch.stack(per_set, dim=1).flatten(0, 1))  # body-major: body i, sets 0..n_pro_ab-1
            eots.append((eot + self.n_ctx + self.n_ctx_ab).repeat_interleave(self.n_pro_ab))
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
        features = F.normalize(features, dim=-1)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        start = 0
        for name, kind, words, _, is_alp in self._segments:
            count = len(words) * (self.n_pro_ab if is_alp else 1) if words.numel() else 0
            parts.setdefault(name, {})[kind] = features[start : start + count]
            start += count
        return {name: GroupFeatures(**kinds) for name, kinds in parts.items()}
