"""KAG-prompt (kernel-aware hierarchical graph prompts) on OpenCLIP, in pure torch (methods.md §3; paper Eq. 1–17).

Four tapped backbone layers are projected to the text width, refined by multi-kernel convolutions (Eq. 1) and a
hierarchical graph over the layers (Eq. 2–11, T rounds of gated messages and ConvGRU updates). Each layer's output is
compared with the normal/abnormal text features (M_p, Eq. 12) and with the k-shot memory (M_v, Eq. 13); the maps are
fused with γ (Eq. 14) and the image score mixes the adapted CLS score with the top-k mean of the map (Eq. 15–16).

``variant="code"`` is the authors' released head number for number (tests/parity): no self-loop edge, per-pixel
bias-free gates, concatenated messages mixed by a 3×3 convolution, a conv-BN-ReLU output block whose BN sees one
(sample, layer) node at a time in training, 8 maps (graph + multi-kernel) whose logits are upsampled before the
softmax, and a memory bank on the raw backbone tokens. The README's equation table lists every difference.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.components.memory_bank import MemoryBank

Variant = Literal["paper", "code"]
ReverseEdge = Literal["transpose", "same"]
VisualReduction = Literal["sum", "mean"]
PAPER_KERNELS = ((1, 4), (4, 1), (2, 2), (3, 3))


def authors_init(module: nn.Module) -> None:
    """The authors' graph initialisation: every Conv2d weight N(0, 0.01), BatchNorm weight 1 and bias 0.

    Conv biases keep PyTorch's default, except the ConvGRU's, which the authors set to 0 before this runs.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


class MultiKernelConv(nn.Module):
    """Eq. 1: parallel unpadded convolutions C_k (default (1×4), (4×1), 2×2, 3×3), each resized back to the grid
    (bilinear, ``align_corners=True`` as the authors, C1).

    Paper: V = Norm(Σ_k C_k(x)) with Norm = GroupNorm(1) (a layer norm over C,H,W). Code: mean over k, no norm.
    """

    def __init__(self, dim: int, variant: Variant, kernels: tuple[tuple[int, int], ...] = PAPER_KERNELS) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, tuple(k)) for k in kernels)
        self.norm = nn.GroupNorm(1, dim) if variant == "paper" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = torch.stack(
            [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=True) for conv in self.convs]
        )
        return outs.mean(0) if self.norm is None else self.norm(outs.sum(0))


class ConvGRUCell(nn.Module):
    """Eq. 10 with 1×1 convolutions: z = σ(W_z[x;h]), r = σ(W_r[x;h]), h̃ = tanh(W_h[x; r⊙h]), h' = (1−z)h + z h̃."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.update = nn.Conv2d(2 * dim, dim, 1)
        self.reset = nn.Conv2d(2 * dim, dim, 1)
        self.candidate = nn.Conv2d(2 * dim, dim, 1)
        for conv in (self.update, self.reset, self.candidate):
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xh = torch.cat([x, h], dim=1)
        z = torch.sigmoid(self.update(xh))
        r = torch.sigmoid(self.reset(xh))
        candidate = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return (1 - z) * h + z * candidate


def pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution applied to tokens [..., N, C] (the same map, without reshaping to an image)."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class KernelAwareGraph(nn.Module):
    """Eq. 2–11 over L layer nodes [B,L,D,H,W], batched over samples and layers.

    Args:
        use_gate: Eq. 8 gates (False: every message weight 1, the Table 2 "w/o gate" ablation).
        use_gru: Eq. 10 ConvGRU (False: the aggregate becomes the next state, "w/o ConvGRU").
        gate_channels: paper only. ``1``: one scalar a ∈ [0,1] per message (Eq. 8's range); ``dim``: one gate per
            channel (Eq. 9's "channel-by-element product").
        gate_self_loop: paper only. Gate the self-loop message h_ii too (Eq. 9 sums over all j ∈ 𝒩 "and itself
            through gating").
        reverse_edge: the edge a deeper layer's node sends to a shallower one. ``transpose`` (paper, Eq. 5): it is the
            transpose of the forward edge, e = N_i W_cᵀ N_jᵀ for i > j; ``same`` (the authors' code): N_i W_c N_jᵀ in
            both directions.
    """

    def __init__(
        self, dim: int, layers: int, rounds: int, variant: Variant, use_gate: bool = True, use_gru: bool = True,
        gate_channels: Literal[1, "dim"] = 1, gate_self_loop: bool = True, reverse_edge: ReverseEdge = "transpose",
    ) -> None:  # fmt: skip
        super().__init__()
        if reverse_edge not in ("transpose", "same"):
            raise ValueError(f"model.reverse_edge must be 'transpose' or 'same', got {reverse_edge!r}")
        self.variant, self.rounds, self.layers, self.reverse_edge = variant, rounds, layers, reverse_edge
        self.use_gate, self.use_gru, self.gate_self_loop = use_gate, use_gru, gate_self_loop
        self.inter = nn.Linear(dim, dim, bias=False)  # Eq. 4: W_c; the query is N_i W_cᵀ as nn.Linear computes it
        if variant == "paper":
            self.alpha = nn.Parameter(torch.zeros(()))  # Eq. 3: learnable α, 0 at the start (position attention)
            self.intra_query, self.intra_key, self.intra_value = (nn.Conv2d(dim, dim, 1) for _ in range(3))
            self.gate = nn.Conv2d(dim, dim if gate_channels == "dim" else 1, 1)  # Eq. 8: W_GAP, b
        else:
            self.gate = nn.Conv2d(dim, 1, 1, bias=False)  # per-pixel gate without bias (C10)
            self.mix = nn.Conv2d((layers - 1) * dim, dim, 3, padding=1)  # conv over the concatenated messages
            self.output_conv = nn.Conv2d(2 * dim, dim, 3, padding=1)
            self.output_norm = nn.BatchNorm2d(dim)
        self.gru = ConvGRUCell(dim) if use_gru else None
        others = [[j for j in range(layers) if j != i] for i in range(layers)]
        self.register_buffer("others", torch.tensor(others), persistent=False)
        reverse = [[j < i for j in row] for i, row in enumerate(others)]  # the edge runs from a deeper layer j > i?
        self.register_buffer("reverse", torch.tensor(reverse), persistent=False)
        authors_init(self)

    def inter_messages(self, state: torch.Tensor) -> torch.Tensor:
        """Eq. 4–7: h_ji = softmax_rows(e) N_j for every j ≠ i: [B,L,N,C] → [B,L,L−1,N,C].

        e = N_i W_c N_jᵀ (Eq. 4) for j > i; for j < i, e = N_i W_cᵀ N_jᵀ (Eq. 5, ``reverse_edge: transpose``) or
        again N_i W_c N_jᵀ (``same``, the authors). W_c is ``inter.weight``ᵀ, so N W_c = ``inter(N)``. No 1/√d scale
        (neither the paper nor the authors have one, C2); j runs over the other layers in order.
        """
        forward_query = self.inter(state)
        keys = state[:, self.others]  # [B,L,L−1,N,C]
        if self.reverse_edge == "same":
            logits = torch.einsum("binc,bijmc->bijnm", forward_query, keys)
        else:
            reverse_query = state @ self.inter.weight  # N_i W_cᵀ
            reverse = self.reverse[None, :, :, None, None]  # [1,L,L−1,1,1]
            query = torch.where(reverse, reverse_query[:, :, None], forward_query[:, :, None])
            logits = torch.einsum("bijnc,bijmc->bijnm", query, keys)
        return torch.softmax(logits, dim=-1) @ keys

    def intra_message(self, state: torch.Tensor) -> torch.Tensor:
        """Eq. 3 (= h_ii, Eq. 6): α·softmax((W_c1 N)(W_c2 N)ᵀ)(W_c3 N) + N on [B,L,N,C]."""
        query, key = pointwise(self.intra_query, state), pointwise(self.intra_key, state)
        attention = torch.softmax(query @ key.transpose(-1, -2), dim=-1)
        return self.alpha * (attention @ pointwise(self.intra_value, state)) + state

    def gated(self, message: torch.Tensor) -> torch.Tensor:
        """Eq. 8: a·h with a = σ(GAP(W_GAP * h + b)) (paper) or a per-pixel σ(w·h) (code); h is [..., N, C]."""
        if not self.use_gate:
            return message
        logits = pointwise(self.gate, message)
        if self.variant == "paper":
            logits = logits.mean(dim=-2, keepdim=True)  # GAP over the positions
        return message * torch.sigmoid(logits)

    def output_block(self, maps: torch.Tensor) -> torch.Tensor:
        """Code output: ReLU(BN(conv3×3([N^T; V]))). In training the authors call it once per (sample, layer) node,
        so BN normalises each node over its own pixels and updates the running statistics once per node (C3)."""
        out = self.output_conv(maps)
        norm = self.output_norm
        if norm.training:
            out = torch.cat([
                F.batch_norm(node, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, norm.momentum,
                             norm.eps)
                for node in out.split(1)
            ])  # fmt: skip
        else:
            out = norm(out)
        return F.relu(out)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        """[B,L,D,H,W] → the graph outputs O_i [B,L,D,H,W] (Eq. 11)."""
        b, layers, d, h, w = nodes.shape
        to_tokens = lambda t: t.reshape(b, layers, d, h * w).transpose(-1, -2)  # noqa: E731
        to_maps = lambda t: t.transpose(-1, -2).reshape(b * layers, d, h, w)  # noqa: E731
        start = to_tokens(nodes)  # N⁰ = V (Eq. 2), [B,L,N,C]
        state = start
        for _ in range(self.rounds):
            messages = self.gated(self.inter_messages(state))  # [B,L,L−1,N,C]
            if self.variant == "paper":
                self_loop = self.intra_message(state)
                self_loop = self.gated(self_loop) if self.gate_self_loop else self_loop
                aggregate = messages.sum(2) + self_loop  # Eq. 9
            else:
                stacked = messages.permute(0, 1, 2, 4, 3).reshape(b * layers, (layers - 1) * d, h, w)
                aggregate = to_tokens(self.mix(stacked))
            if self.gru is None:
                state = aggregate
            else:  # Eq. 10
                state = to_tokens(self.gru(to_maps(aggregate), to_maps(state)))
        if self.variant == "paper":
            return nodes + to_maps(state).reshape(b, layers, d, h, w)  # Eq. 11: O = N^T + V
        out = self.output_block(torch.cat([to_maps(state), to_maps(start)], dim=1))
        return out.reshape(b, layers, d, h, w)


class KAGPromptModel(nn.Module):
    """The trainable adapter of KAG-prompt plus its k-shot memory bank.

    Args:
        width: raw token width of the tapped backbone blocks.
        dim: joint image-text dimension (the backbone's embed dim).
        taps: backbone blocks used as graph layers (1-based, 4 of them).
        variant: ``paper`` or ``code`` (see the module docstring).
        rounds: graph update rounds T (5).
        gamma: γ of the map fusion, Eq. 14 (0.1). score_gamma: γ of the image score, Eq. 16 (0.1).
        top_k: pixels of the score-size map averaged for the image score (30).
        text_scale: logit scale of the text comparisons (100, as the authors).
        graph_dim: width of the multi-kernel convolutions and the graph, a Linear returning to ``dim`` before the text
            comparison; ``None`` = ``dim`` (the paper's "same dimension as the text").
        score_size: side of the maps the fusion and top-k run at (the authors' 224).
        kernels: the multi-kernel shapes of Eq. 1 (one kernel = the "single-kernel" ablation).
        use_graph: False = the "w/o graph" ablation, O_i = V_i.
        use_gate, use_gru, gate_channels, gate_self_loop: see :class:`KernelAwareGraph`.
        use_memory: False = the "w/o memory bank" ablation, M = M_p.
        reverse_edge: Eq. 5 reading, see :class:`KernelAwareGraph`; ``None`` = ``transpose`` (paper) / ``same`` (code).
        visual_reduction: how Eq. 13 combines the 4 layers: ``sum`` as printed (paper: Σ (1 − max cos), range
            [0, 8]) or ``mean`` (the authors' code: the mean of the max cosines before their softmax); ``None`` =
            ``sum`` (paper) / ``mean`` (code).
    """

    def __init__(
        self, width: int, dim: int, taps: list[int], variant: Variant = "paper", rounds: int = 5,
        gamma: float = 0.1, score_gamma: float = 0.1, top_k: int = 30, text_scale: float = 100.0,
        graph_dim: int | None = None, score_size: int = 224, kernels: tuple[tuple[int, int], ...] = PAPER_KERNELS,
        use_graph: bool = True, use_gate: bool = True, use_gru: bool = True, gate_channels: Literal[1, "dim"] = 1,
        gate_self_loop: bool = True, use_memory: bool = True, visual_reduction: VisualReduction | None = None,
        reverse_edge: ReverseEdge | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if variant not in ("paper", "code"):
            raise ValueError(f"model.variant must be 'paper' or 'code', got {variant!r}")
        visual_reduction = visual_reduction or ("sum" if variant == "paper" else "mean")
        reverse_edge = reverse_edge or ("transpose" if variant == "paper" else "same")
        if visual_reduction not in ("sum", "mean"):
            raise ValueError(f"model.visual_reduction must be 'sum' or 'mean', got {visual_reduction!r}")
        self.variant, self.taps, self.gamma, self.score_gamma = variant, list(taps), gamma, score_gamma
        self.top_k, self.text_scale, self.score_size = top_k, text_scale, score_size
        self.use_memory, self.visual_reduction = use_memory, visual_reduction
        inner = graph_dim or dim
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(width, inner), nn.ReLU()) if variant == "code" else nn.Linear(width, inner)
            for _ in taps
        )
        self.multi_kernel = MultiKernelConv(inner, variant, tuple(tuple(k) for k in kernels))
        self.graph = (
            KernelAwareGraph(
                inner, len(taps), rounds, variant, use_gate, use_gru, gate_channels, gate_self_loop, reverse_edge
            )
            if use_graph else None
        )  # fmt: skip
        self.to_joint = nn.Identity() if inner == dim else nn.Linear(inner, dim)
        self.image_head = nn.Linear(dim, dim)  # Eq. 15: FC (the authors' Adapter)
        self.memory = MemoryBank()

    def adapt(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(O [B,L,D,H,W], V [B,L,D,H,W]): graph outputs (Eq. 11) and multi-kernel features (Eq. 1), joint width."""
        h, w = features.grid
        projected = torch.stack(
            [proj(features.taps[t]) for proj, t in zip(self.projections, self.taps, strict=True)], 1
        )
        b, layers, n, d = projected.shape
        maps = projected.transpose(-1, -2).reshape(b * layers, d, h, w)
        kernels = self.multi_kernel(maps).reshape(b, layers, d, h, w)
        graph_out = kernels if self.graph is None else self.graph(kernels)
        joint = lambda t: self.to_joint(t.movedim(2, -1)).movedim(-1, 2)  # noqa: E731
        return joint(graph_out), joint(kernels)

    def upsample(self, maps: torch.Tensor) -> torch.Tensor:
        """Up(·): bilinear to the score size, ``align_corners=True`` as the authors (C4/C5); [B,C,h,w]."""
        return F.interpolate(maps, size=self.score_size, mode="bilinear", align_corners=True)

    def text_maps(self, map_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-map [normal, abnormal] probabilities at the score size [B,M,2,S,S]; map_features [B,M,D,h,w], text
        [B,2,D].

        Paper (Eq. 12, M_pi): softmax(s·cos(O_i, [F_n, F_a])) on the grid, then Up. Code: Up of the two logits,
        then the softmax (C4).
        """
        normalised = F.normalize(map_features, dim=2)
        logits = self.text_scale * torch.einsum("bmdhw,btd->bmthw", normalised, F.normalize(text, dim=-1))
        b, m = logits.shape[:2]
        if self.variant == "paper":
            probabilities = self.upsample(logits.softmax(dim=2).flatten(1, 2))
        else:
            probabilities = self.upsample(logits.flatten(0, 1)).softmax(dim=1)
        return probabilities.reshape(b, m, 2, self.score_size, self.score_size)

    def memory_tokens(self, features: BackboneOutput, graph_out: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """The tokens the memory bank holds: raw backbone tokens (code) or the graph outputs O_i (paper, Eq. 13)."""
        if self.variant == "code":
            return {t: features.taps[t] for t in self.taps}
        if graph_out is None:
            graph_out, _ = self.adapt(features)
        return {i: graph_out[:, i].flatten(2).transpose(1, 2) for i in range(len(self.taps))}

    @torch.no_grad()
    def fit(self, support: BackboneOutput) -> None:
        """Store the support tokens of every layer (Eq. 13's R); nothing without the memory bank."""
        if self.use_memory:
            self.memory.fit(self.memory_tokens(support))

    def visual_map(self, features: BackboneOutput, graph_out: torch.Tensor) -> torch.Tensor:
        """M_v at the score size [B,S,S].

        Paper (Eq. 13): Up(Σ_i (1 − max_r cos(O_i, r_i))). Code: sim = mean_i max cos on raw tokens, Up, then
        softmax([sim, 1 − sim])₁ (C5). ``visual_reduction`` swaps Σ_i and mean_i in either.
        """
        distance = self.memory(self.memory_tokens(features, graph_out))  # mean_i (1 − max cos)/2, [B,N]
        grid = distance.reshape(-1, 1, *features.grid)
        layers = len(self.taps) if self.visual_reduction == "sum" else 1
        if self.variant == "paper":
            return self.upsample(2.0 * layers * grid)[:, 0]
        similarity = self.upsample(layers * (1.0 - 2.0 * grid))
        return torch.cat([similarity, 1.0 - similarity], dim=1).softmax(dim=1)[:, 1]

    def image_logits(self, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 15: [cos(FC(cls), F_n), cos(FC(cls), F_a)] [B,2]; s₁ is the second column (raw cosine)."""
        adapted = F.normalize(self.image_head(cls), dim=-1)
        return torch.einsum("bd,btd->bt", adapted, F.normalize(text, dim=-1))

    def forward(self, features: BackboneOutput, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-map text maps and image logits; when ready to score (memory fitted, or no memory) also M and s.

        text: [B,2,D] normal and abnormal text features of each sample's category.
        """
        graph_out, kernels = self.adapt(features)
        mapped = graph_out if self.variant == "paper" else torch.cat([graph_out, kernels], dim=1)
        probabilities = self.text_maps(mapped, text)  # [B,M,2,S,S]
        layer_maps = probabilities[:, :, 1]
        outputs = {
            "layer_maps": layer_maps, "normal_maps": probabilities[:, :, 0],
            "image_logits": self.image_logits(features.cls, text),
        }  # fmt: skip
        if self.use_memory and not self.memory.is_fitted:
            return outputs
        textual = layer_maps.mean(dim=1)  # Eq. 12's Norm Σ (paper) / the mean of the 8 maps (code)
        outputs["textual_map"] = textual
        if self.use_memory:
            visual = self.visual_map(features, graph_out)
            outputs["visual_map"] = visual
            outputs["anomaly_map"] = self.gamma * textual + (1 - self.gamma) * visual  # Eq. 14
        else:
            outputs["anomaly_map"] = textual
        outputs["score"] = image_score(
            outputs["image_logits"][:, 1], outputs["anomaly_map"], self.score_gamma, self.top_k
        )
        return outputs


def image_score(image_similarity: torch.Tensor, maps: torch.Tensor, gamma: float, top_k: int) -> torch.Tensor:
    """Eq. 16: s = γ·s₁ + (1−γ)·mean(top-k pixels of M)."""
    top = maps.flatten(1).topk(min(top_k, maps[0].numel()), dim=1).values
    return gamma * image_similarity + (1 - gamma) * top.mean(dim=1)


def authors_focal_loss(
    abnormal: torch.Tensor, normal: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """The authors' focal loss on [normal, abnormal] (C9): both one-hot columns [1 − G, G] clamped to
    [smooth, 1−smooth], p_t = Σ onehot·p + smooth, mean of −(1−p_t)^γ log p_t."""
    normal_weight = (1 - target).clamp(smooth, 1 - smooth)
    abnormal_weight = target.clamp(smooth, 1 - smooth)
    p_true = normal_weight * normal + abnormal_weight * abnormal + smooth
    return (-(1 - p_true).pow(gamma) * p_true.log()).mean()


def focal_loss(
    abnormal: torch.Tensor, normal: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6
) -> torch.Tensor:
    """Focal loss (Lin et al.) on [normal, abnormal] against {0,1} targets: mean of −(1−p_t)^γ log p_t, p_t ≥ ε."""
    p_true = torch.where(target > 0.5, abnormal, normal).clamp(eps, 1.0)
    return (-(1 - p_true).pow(gamma) * p_true.log()).mean()


def dice_loss(probabilities: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice per sample, averaged: 1 − mean_b (2Σpg + 1) / (Σp + Σg + 1) (the authors' BinaryDiceLoss)."""
    p, g = probabilities.flatten(1), target.flatten(1)
    return 1 - ((2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)).mean()


def kag_loss(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, labels: torch.Tensor, variant: Variant,
    focal_weight: float = 1.0, dice_weight: float | None = None, image_weight: float = 1.0, focal_gamma: float = 2.0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Eq. 17 summed over the maps: image term + λ₁ Σ_m Focal([1−M_m, M_m], G) + λ₂ Σ_m (Dice(M_m, G) + Dice(1−M_m, 1−G)).

    target: [B,S,S] {0,1} masks at the score size; labels: [B] image labels c.
    Paper: image term = CE(s₁, c) = BCE(σ(s₁), c), focal with ε = 1e-6, λ₂ = 1. Code (C6–C9): BCE(σ([s_n, s₁]),
    one-hot(c)) over both columns, the authors' focal floor, λ₂ = 0.3, the sum running over all 8 maps.
    "1 − M" is the softmax's normal channel (``normal_maps``), equal to 1 − M up to rounding, as the authors use it.
    """
    maps, normal = outputs["layer_maps"], outputs["normal_maps"]
    target = target.float()
    dice_weight = (1.0 if variant == "paper" else 0.3) if dice_weight is None else dice_weight
    if variant == "paper":
        image = F.binary_cross_entropy_with_logits(outputs["image_logits"][:, 1], labels.float())
        focal_fn = focal_loss
    else:
        one_hot = F.one_hot(labels.long(), 2).float()
        image = F.binary_cross_entropy(torch.sigmoid(outputs["image_logits"]), one_hot)
        focal_fn = authors_focal_loss
    focal = sum(focal_fn(maps[:, m], normal[:, m], target, focal_gamma) for m in range(maps.shape[1]))
    dice = sum(dice_loss(maps[:, m], target) + dice_loss(normal[:, m], 1 - target) for m in range(maps.shape[1]))
    loss = image_weight * image + focal_weight * focal + dice_weight * dice
    return {"loss": loss, "image": image, "focal": focal, "dice": dice}
