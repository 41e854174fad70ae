"""Learnable prompts shared by PromptAD and FineGrainedAD (methods.md §1 "Prompts", §2 "MLLP").

Every prompt is ``[SOS] N₁…N_c <body> [EOT]`` (normal and abnormal-handcrafted prompts, NHP/AHP) or
``[SOS] N₁…N_c A₁…A_a <body> [EOT]`` (abnormal-learnable prompts, ALP), where the ``N`` vectors are shared by all
prompts of all groups and each of the ``n_pro_ab`` ALP sets has its own ``A`` vectors. Bodies are plain text.
With ``n_pro`` > 1 (the authors' classification model uses 3) every NHP/AHP body is encoded once per normal context
set, and ALP row r of a body pairs normal set ``r mod n_pro`` with abnormal set ``r mod n_pro_ab`` (the authors'
expand order; with coprime counts, as 3 and 4, every pair occurs once).
All groups are encoded in one text-tower call truncated to the longest prompt (exact under the causal mask, P2).

Bodies may hold learnable placeholders, ``{slot:<kind>}`` (FineGrainedAD MLLP): one token position whose embedding
is ``g·u`` — ``u`` a learnable vector per placeholder kind (one set for normal prompts, one per abnormal context set
for ALPs) and ``g`` = 1, or in a ``gated`` group a learnable weight in [0,1] per (group, kind, side): Attr-MoE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import ClipBackbone

SLOT_KINDS = ("color", "texture", "shape", "direction", "number", "location")
SLOT_PATTERN = re.compile(r"\{slot:(\w+)\}")
SLOT_SENTINEL = "*"
"""The word a placeholder is tokenised as: one token whatever its neighbours, since it is cut out by spaces."""


def slot(kind: str) -> str:
    """The placeholder marker of one attribute ``kind`` inside a prompt body."""
    if kind not in SLOT_KINDS:
        raise ValueError(f"placeholder kind {kind!r} is not one of {SLOT_KINDS}")
    return f"{{slot:{kind}}}"


def render_slots(body: str, template: str = "<{}>") -> str:
    """A body with every placeholder written as ``template`` filled with its kind (for display and lint)."""
    return SLOT_PATTERN.sub(lambda match: template.format(match.group(1)), body)


@dataclass
class PromptGroupTexts:
    """The prompt bodies of one level (image, a component, background, ...).

    normal: NHP bodies; abnormal: AHP bodies (plain text); learnable_abnormal: ALP bodies (each gets every abnormal
    context set). NHP and ALP bodies may hold ``{slot:<kind>}`` placeholders; ``gated`` gives this group's
    placeholders learnable weights in [0,1] (FineGrainedAD Attr-MoE, component level).
    """

    normal: list[str]
    abnormal: list[str] = field(default_factory=list)
    learnable_abnormal: list[str] = field(default_factory=list)
    gated: bool = False

    def __post_init__(self) -> None:
        if not self.normal:
            raise ValueError("a prompt group needs at least one normal prompt body")
        if not self.abnormal and not self.learnable_abnormal:
            raise ValueError("a prompt group needs abnormal or learnable-abnormal prompt bodies")
        if any(SLOT_PATTERN.search(body) for body in self.abnormal):
            raise ValueError("handcrafted abnormal prompt bodies are plain text; placeholders go in NHPs and ALPs")


PrototypeRule = Literal["normalised_mean", "raw_mean"]

EmbeddingMixes = dict[str, tuple[str, torch.Tensor, torch.Tensor]]
"""source group → (target group, normal weight, abnormal weight): the FineGrainedAD code's Attr-MoE. Row r of each
target NHP (ALP) gets ``weight ·`` row r of the source's NHPs (ALPs), contexts, start and end tokens included; the
target AHP rows get the source AHP rows with the largest mean embedding value, in descending order (their top-k)."""


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

    @cached_property
    def learnable_prototype(self) -> torch.Tensor:
        """The normalised mean of the ALP features alone (FineGrainedAD Eq. 6 reads the image level's)."""
        return self._prototype(self.raw_learnable, self.learnable)


@dataclass
class Segment:
    """One (group, kind) block of prompt bodies, tokenised: frozen word embeddings and where placeholders sit.

    words: [n,L,W]; eot: [n]; slot_body, slot_position, slot_kind: [S] body index, token position (before contexts
    are spliced in) and kind index of every placeholder; gate_row: the group's row in the Attr-MoE weights or -1.
    """

    group: str
    kind: str
    words: torch.Tensor
    eot: torch.Tensor
    is_alp: bool
    slot_body: torch.Tensor
    slot_position: torch.Tensor
    slot_kind: torch.Tensor
    gate_row: int


def tokenize_with_slots(backbone: ClipBackbone, bodies: list[str]) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """Token ids [n,L] of ``bodies`` and, per body, the (position, kind index) of each ``{slot:<kind>}``.

    Each placeholder is tokenised as :data:`SLOT_SENTINEL` between spaces, so it takes exactly one position and leaves
    its neighbours' tokens as they are (CLIP's tokenizer splits words from punctuation and ignores spaces).
    """
    sentinel = backbone.tokenize([SLOT_SENTINEL])[0]
    if int(sentinel.argmax()) != 2:
        raise ValueError(f"the tokenizer does not keep {SLOT_SENTINEL!r} as one token; placeholders need it")
    plain, kinds = [], []
    for body in bodies:
        if SLOT_SENTINEL in body:
            raise ValueError(f"prompt body contains {SLOT_SENTINEL!r}, reserved for placeholders: {body!r}")
        names = SLOT_PATTERN.findall(body)
        unknown = [n for n in names if n not in SLOT_KINDS]
        if unknown:
            raise ValueError(f"unknown placeholder kind(s) {unknown} in {body!r}; known: {SLOT_KINDS}")
        kinds.append([SLOT_KINDS.index(n) for n in names])
        plain.append(SLOT_PATTERN.sub(f" {SLOT_SENTINEL} ", body))
    tokens = backbone.tokenize(plain)
    slots = []
    for body, row, body_kinds in zip(bodies, tokens, kinds, strict=True):
        positions = (row == sentinel[1]).nonzero().squeeze(1).tolist()
        if len(positions) != len(body_kinds):
            raise ValueError(f"placeholders of {body!r} did not tokenise one position each")
        slots.append(list(zip(positions, body_kinds, strict=True)))
    return tokens, slots


class PromptLearner(nn.Module):
    """Shared learnable contexts, spliced in front of fixed prompt bodies, for any number of prompt groups; and the
    learnable placeholders (with their Attr-MoE weights) inside the bodies that hold them."""

    BUILD_SIZED = ("normal_placeholders", "abnormal_placeholders", "slot_gate_logits")
    """Parameters whose shape depends on the prompt texts: created by :meth:`build`, or by a checkpoint load."""

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
        self.width, self.init_std = width, init_std
        self.n_ctx, self.n_ctx_ab, self.n_pro_ab, self.n_pro = n_ctx, n_ctx_ab, n_pro_ab, n_pro
        self.prototype_rule = prototype_rule
        self.normal_context = nn.Parameter(torch.randn(n_pro, n_ctx, width) * init_std)
        self.abnormal_context = nn.Parameter(torch.randn(n_pro_ab, n_ctx_ab, width) * init_std)
        self.normal_placeholders: nn.Parameter | None = None  # [kinds, W]: u of NHP placeholders
        self.abnormal_placeholders: nn.Parameter | None = None  # [n_pro_ab, kinds, W]: u of ALP placeholders
        self.slot_gate_logits: nn.Parameter | None = None  # [2 (normal, abnormal), gated groups, kinds]: Attr-MoE
        self.gated_groups: list[str] = []
        self._segments: list[Segment] = []

    def _sized_parameter(self, name: str, shape: tuple[int, ...], scale: float) -> None:
        """Create ``name`` as ``randn(shape)·scale`` unless it already has that shape (e.g. loaded from a checkpoint)."""
        current = getattr(self, name)
        if current is None or tuple(current.shape) != shape:
            device = self.normal_context.device
            setattr(self, name, nn.Parameter(torch.randn(shape, device=device) * scale))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint fixes the placeholder and Attr-MoE shapes: take them before loading (even before ``build``)."""
        for name in self.BUILD_SIZED:
            stored = state_dict.get(prefix + name)
            if stored is not None:
                self._sized_parameter(name, tuple(stored.shape), 0.0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def build(self, backbone: ClipBackbone, groups: dict[str, PromptGroupTexts]) -> None:
        """Tokenise every body once and keep its frozen word embeddings; call again when the texts change.

        Placeholders start as ``randn·init_std`` like the contexts; Attr-MoE logits start at 0 (every weight ½).
        """
        device = self.normal_context.device
        self.gated_groups = [name for name, texts in groups.items() if texts.gated]
        segments = []
        for name, texts in groups.items():
            for kind, bodies, is_alp in (
                ("normal", texts.normal, False),
                ("handcrafted", texts.abnormal, False),
                ("learnable", texts.learnable_abnormal, True),
            ):
                gate_row = self.gated_groups.index(name) if texts.gated else -1
                if not bodies:
                    empty = torch.empty(0, dtype=torch.long, device=device)
                    segments.append(
                        Segment(name, kind, torch.empty(0, device=device), empty, is_alp, empty, empty, empty, gate_row)
                    )
                    continue
                tokens, slots = tokenize_with_slots(backbone, bodies)
                eot = tokens.argmax(dim=-1)
                extra = self.n_ctx + (self.n_ctx_ab if is_alp else 0)
                if int(eot.max()) + 1 + extra > tokens.shape[1]:
                    worst = bodies[int(eot.argmax())]
                    raise ValueError(f"prompt too long for CLIP's {tokens.shape[1]} tokens with contexts: {worst!r}")
                with torch.no_grad():
                    words = backbone.token_embedding(tokens.to(backbone.clip.token_embedding.weight.device)).float()
                # one row per placeholder: (body, token position, kind index)
                placed = [
                    (body, position, slot_kind) for body, found in enumerate(slots) for position, slot_kind in found
                ]
                table = torch.tensor(placed, dtype=torch.long, device=device).reshape(-1, 3)
                body_index, position, kind_index = table.unbind(dim=1)
                segments.append(
                    Segment(
                        name, kind, words.to(device), eot.to(device), is_alp, body_index, position, kind_index, gate_row
                    )
                )
        self._segments = segments
        if any(len(s.slot_body) for s in segments):
            kinds = len(SLOT_KINDS)
            self._sized_parameter("normal_placeholders", (kinds, self.width), self.init_std)
            self._sized_parameter("abnormal_placeholders", (self.n_pro_ab, kinds, self.width), self.init_std)
        if self.gated_groups:
            self._sized_parameter("slot_gate_logits", (2, len(self.gated_groups), len(SLOT_KINDS)), 0.0)

    @property
    def is_built(self) -> bool:
        return bool(self._segments)

    def attr_moe_weights(self) -> dict[str, torch.Tensor]:
        """Attr-MoE weights in [0,1] of each gated group: [2 (normal, abnormal), kinds], kinds in SLOT_KINDS order."""
        if self.slot_gate_logits is None:
            return {}
        return {name: torch.sigmoid(self.slot_gate_logits[:, row]) for row, name in enumerate(self.gated_groups)}

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

    def _fill_slots(self, rows: torch.Tensor, segment: Segment, per_body: int, shift: int) -> torch.Tensor:
        """Write ``g·u`` at every placeholder of the segment's prompt rows [n·per_body, L, W] (contexts spliced in,
        so positions move by ``shift``). Row ``r`` of a body uses abnormal placeholder set ``r mod n_pro_ab``."""
        copies = torch.arange(per_body, device=rows.device)
        row = (segment.slot_body[:, None] * per_body + copies).flatten()
        position = (segment.slot_position + shift).repeat_interleave(per_body)
        kind = segment.slot_kind.repeat_interleave(per_body)
        if segment.is_alp:
            values = self.abnormal_placeholders[copies.repeat(len(segment.slot_body)) % self.n_pro_ab, kind]
        else:
            values = self.normal_placeholders[kind]
        if segment.gate_row >= 0:
            side = 1 if segment.is_alp else 0
            values = values * torch.sigmoid(self.slot_gate_logits[side, segment.gate_row, kind]).unsqueeze(-1)
        return rows.index_put((row, position), values.to(rows.dtype))

    def prompt_embeddings(self, mixes: EmbeddingMixes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [P,L,W] of every prompt, body-major (each body's context rows together), and EOT indices.

        ``mixes`` (FineGrainedAD ``variant: code``'s Attr-MoE) adds whole prompt sequences of source groups into a
        target group's rows before the text tower, see :data:`EmbeddingMixes`; source groups are then not encoded.
        """
        if not self.is_built:
            raise RuntimeError("PromptLearner.build must run before encoding")
        built: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for segment in self._segments:
            if segment.words.numel() == 0:
                continue
            contexts = self._contexts(segment.is_alp)
            per_body = len(contexts)
            words = segment.words
            spliced = self._splice(words.repeat_interleave(per_body, dim=0), contexts.repeat(len(words), 1, 1))
            if len(segment.slot_body):
                spliced = self._fill_slots(spliced, segment, per_body, contexts.shape[1])
            built[segment.group, segment.kind] = (
                spliced,
                (segment.eot + contexts.shape[1]).repeat_interleave(per_body),
            )
        for source, (target, normal_weight, abnormal_weight) in (mixes or {}).items():
            for kind in ("normal", "handcrafted", "learnable"):
                if (target, kind) not in built or (source, kind) not in built:
                    continue
                rows, eot = built[target, kind]
                added = built[source, kind][0]
                if kind == "handcrafted":  # the code keeps the rows with the largest mean embedding value, in order
                    if len(added) < len(rows):
                        raise ValueError(
                            f"{source}: {len(added)} handcrafted prompts to mix into {len(rows)} of {target}"
                        )
                    added = added[added.float().mean(dim=(1, 2)).topk(len(rows)).indices]
                weight = normal_weight if kind == "normal" else abnormal_weight
                built[target, kind] = (rows + weight * added, eot)
        kept = [key for key in built if key[0] not in (mixes or {})]
        return torch.cat([built[key][0] for key in kept]), torch.cat([built[key][1] for key in kept])

    def encode(
        self, backbone: ClipBackbone, truncate: bool = True, bucket: int = 8, mixes: EmbeddingMixes | None = None
    ) -> dict[str, GroupFeatures]:
        """Encode every group (but the sources of ``mixes``) through the text tower, with gradients to the contexts.

        With ``truncate`` the prompts are grouped by length into buckets of ``bucket`` tokens and each bucket is
        encoded only up to its own longest prompt, which is exact under CLIP's causal mask (P2); mixed-in sequences
        beyond a target's end-of-text are cut with it, as the causal mask ignores them.
        """
        embeddings, eot = self.prompt_embeddings(mixes)
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
        for segment in self._segments:
            if segment.group in (mixes or {}):
                continue
            count = len(segment.words) * self.rows_per_body(segment.is_alp) if segment.words.numel() else 0
            parts.setdefault(segment.group, {})[f"raw_{segment.kind}"] = features[start : start + count]
            start += count
        return {name: GroupFeatures(**kinds, prototype_rule=self.prototype_rule) for name, kinds in parts.items()}
