"""KAG-prompt (kernel-aware hierarchical graph prompts) on OpenCLIP, in pure torch (methods.md §3; paper Eq. 1–16).

Four tapped backbone layers are projected into the joint space, refined by multi-kernel convolutions (Eq. 1) and a
hierarchical graph over the layers (Eq. 3–11, T rounds of gated messages and ConvGRU updates). Each layer's output
is compared with the normal/abnormal text features (M_p, Eq. 12) and with the k-shot memory (M_v, Eq. 13); the maps
are fused with γ (Eq. 14) and the image score mixes the adapted CLS score with the top-k mean of the map (Eq. 15–16).

``variant="code"`` reproduces the released code where it departs from the paper: no self-loop edge, per-pixel gates,
concatenated messages mixed by a 3×3 convolution, a BN-ReLU-conv output averaged over 8 maps, and a memory bank on
the raw backbone tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.components.memory_bank import MemoryBank

Variant = Literal["paper", "code"]


class MultiKernelConv(nn.Module):
    """Eq. 1: parallel (1×4), (4×1), 2×2 and 3×3 convolutions without padding, resized back to the grid.

    Paper: summed then normalised. Code: averaged (/4), no normalisation.
    """

    KERNELS = ((1, 4), (4, 1), (2, 2), (3, 3))

    def __init__(self, dim: int, variant: Variant) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k) for k in self.KERNELS)
        self.norm = nn.GroupNorm(1, dim) if variant == "paper" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False) for conv in self.convs]
        if self.norm is None:
            return torch.stack(outs).mean(0)
        return self.norm(torch.stack(outs).sum(0))


class ConvGRUCell(nn.Module):
    """Eq. 10 with 1×1 convolutions: z = σ(W_z[x;h]), r = σ(W_r[x;h]), h̃ = tanh(W_h[x; r⊙h]), h' = (1−z)h + z h̃."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.update = nn.Conv2d(2 * dim, dim, 1)
        self.reset = nn.Conv2d(2 * dim, dim, 1)
        self.candidate = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xh = torch.cat([x, h], dim=1)
        z = torch.sigmoid(self.update(xh))
        r = torch.sigmoid(self.reset(xh))
        candidate = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return (1 - z) * h + z * candidate


class KernelAwareGraph(nn.Module):
    """Eq. 3–11 over L layer nodes [B,L,D,H,W], batched over samples and layers (no per-sample loops)."""

    def __init__(self, dim: int, layers: int, rounds: int, variant: Variant) -> None:
        super().__init__()
        self.variant, self.rounds, self.layers = variant, rounds, layers
        self.inter = nn.Parameter(torch.eye(dim) + 0.01 * torch.randn(dim, dim))  # Eq. 4: A_ij = softmax(N_i W N_jᵀ)
        self.intra = nn.Parameter(torch.eye(dim) + 0.01 * torch.randn(dim, dim)) if variant == "paper" else None
        if variant == "paper":
            self.gate = nn.Linear(dim, 1)  # Eq. 8: g = σ(FC(GAP(m)))
        else:
            self.gate = nn.Conv2d(dim, 1, 1)  # per-pixel gate
            self.mix = nn.Conv2d((layers - 1) * dim, dim, 3, padding=1)  # concatenated messages → C
            self.output = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.gru = ConvGRUCell(dim)

    @staticmethod
    def attend(projected_query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Eq. 4–7: message to node i from node j: softmax_rows((N_i W) N_jᵀ) N_j, given ``N_i W`` [B,L,N,D]."""
        scale = projected_query.shape[-1] ** -0.5
        attention = torch.softmax(projected_query @ keys.transpose(-1, -2) * scale, dim=-1)
        return attention @ keys

    def gated(self, message: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Eq. 8: scale a message [B,L,N,D] by its gate (GAP → FC → σ in the paper; per pixel in the code)."""
        if self.variant == "paper":
            return message * torch.sigmoid(self.gate(message.mean(dim=2, keepdim=True)))
        b, layers, n, d = message.shape
        maps = message.reshape(b * layers, *grid, d).permute(0, 3, 1, 2)
        gates = torch.sigmoid(self.gate(maps)).permute(0, 2, 3, 1).reshape(b, layers, n, 1)
        return message * gates

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        """[B,L,D,H,W] → the graph outputs O_i [B,L,D,H,W] (Eq. 11)."""
        b, layers, d, h, w = nodes.shape
        start = nodes.flatten(3).transpose(-1, -2)  # [B,L,N,D]
        state = start
        others = [[j for j in range(layers) if j != i] for i in range(layers)]
        for _ in range(self.rounds):
            query = state @ self.inter  # N_i W, shared by the messages from every other layer
            messages = [
                self.gated(self.attend(query, state[:, [o[k] for o in others]]), (h, w)) for k in range(layers - 1)
            ]  # message k of node i comes from its k-th other layer
            if self.variant == "paper":
                aggregate = torch.stack(messages).sum(0)  # Eq. 9: gated sum
                aggregate = aggregate + self.gated(self.attend(state @ self.intra, state), (h, w))  # Eq. 3 self-loop
            else:
                stacked = torch.cat(messages, dim=-1).reshape(b * layers, h, w, -1).permute(0, 3, 1, 2)
                aggregate = self.mix(stacked).permute(0, 2, 3, 1).reshape(b, layers, h * w, d)
            to_map = lambda t: t.reshape(b * layers, h, w, d).permute(0, 3, 1, 2)  # noqa: E731
            updated = self.gru(to_map(aggregate), to_map(state))  # Eq. 10
            state = updated.permute(0, 2, 3, 1).reshape(b, layers, h * w, d)
        final, initial = to_map(state), to_map(start)
        if self.variant == "paper":
            out = final + initial  # Eq. 11: O = N^T + V
        else:
            out = self.output(torch.cat([final, initial], dim=1))
        return out.reshape(b, layers, d, h, w)


class KAGPromptModel(nn.Module):
    """The trainable adapter of KAG-prompt plus its cached text features and memory bank.

    Args:
        width: raw token width of the tapped backbone blocks.
        dim: joint image-text dimension (the backbone's embed dim).
        graph_dim: width of the multi-kernel convolutions and the graph; a linear map returns to ``dim`` before the
            text comparison. ``None`` runs them at ``dim`` (the paper's width, about twice the backbone's cost).
        taps: backbone blocks used as graph layers (1-based, 4 of them).
        variant: ``paper`` or ``code`` (see the module docstring).
        rounds: graph update rounds T (5).
        gamma: fusion weight γ of Eq. 14 and Eq. 16 (0.1).
        top_k: pixels averaged for the image score (30, as the released code).
        score_size: side of the bilinearly upsampled map the top-k is taken from (224, the code's resolution).
        text_scale: logit scale of the text comparisons (100, as CLIP's trained temperature).
    """

    def __init__(
        self, width: int, dim: int, taps: list[int], variant: Variant = "paper", rounds: int = 5,
        gamma: float = 0.1, top_k: int = 30, text_scale: float = 100.0,
        graph_dim: int | None = 256, score_size: int = 224,
    ) -> None:  # fmt: skip
        super().__init__()
        if variant not in ("paper", "code"):
            raise ValueError(f"model.variant must be 'paper' or 'code', got {variant!r}")
        self.variant, self.taps, self.gamma = variant, list(taps), gamma
        self.top_k, self.text_scale, self.score_size = top_k, text_scale, score_size
        relu = variant == "code"
        inner = graph_dim or dim
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(width, inner), nn.ReLU()) if relu else nn.Linear(width, inner) for _ in taps
        )
        self.multi_kernel = MultiKernelConv(inner, variant)
        self.graph = KernelAwareGraph(inner, len(taps), rounds, variant)
        self.to_joint = nn.Identity() if inner == dim else nn.Linear(inner, dim)
        self.image_head = nn.Linear(dim, dim)  # Eq. 15: adapted CLS
        self.memory = MemoryBank()

    def adapt(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer outputs for the maps: (O [B,L,D,H,W], V [B,L,D,H,W]) (graph outputs and multi-kernel features)."""
        h, w = features.grid
        projected = torch.stack([proj(features.taps[t]) for proj, t in zip(self.projections, self.taps, strict=True)], 1)
        b, layers, n, d = projected.shape
        maps = projected.transpose(-1, -2).reshape(b * layers, d, h, w)
        kernels = self.multi_kernel(maps).reshape(b, layers, d, h, w)
        joint = lambda t: self.to_joint(t.movedim(2, -1)).movedim(-1, 2)  # noqa: E731
        return joint(self.graph(kernels)), joint(kernels)

    def text_maps(self, map_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 12 per map: softmax(s·[cos(O,F_n), cos(O,F_a)])₁ → [B,M,H,W]; text: [B,2,D] (normal, abnormal)."""
        normalised = F.normalize(map_features, dim=2)
        logits = self.text_scale * torch.einsum("bmdhw,btd->bmthw", normalised, F.normalize(text, dim=-1))
        return logits.softmax(dim=2)[:, :, 1]

    def fit(self, support: BackboneOutput) -> None:
        """Memory bank (Eq. 13): post-graph outputs O_i (paper) or raw backbone tokens (code)."""
        if self.variant == "code":
            self.memory.fit({t: support.taps[t] for t in self.taps})
            return
        with torch.no_grad():
            graph_out, _ = self.adapt(support)
        self.memory.fit({i: graph_out[:, i].flatten(2).transpose(1, 2) for i in range(len(self.taps))})

    def visual_map(self, features: BackboneOutput, graph_out: torch.Tensor) -> torch.Tensor:
        """Eq. 13: M_v = softmax([sim, 1−sim])₁ = σ(1 − 2·sim), sim = mean over layers of the max cosine to the memory."""
        if self.variant == "code":
            distance = self.memory({t: features.taps[t] for t in self.taps})
        else:
            distance = self.memory({i: graph_out[:, i].flatten(2).transpose(1, 2) for i in range(len(self.taps))})
        similarity = 1.0 - 2.0 * distance  # the bank stores (1 − cos)/2
        return torch.sigmoid(1.0 - 2.0 * similarity).reshape(-1, *features.grid)

    def image_probability(self, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 15: s₁ = softmax(s·[cos(FC(cls),F_n), cos(FC(cls),F_a)])₁; text: [B,2,D]."""
        adapted = F.normalize(self.image_head(cls), dim=-1)
        logits = self.text_scale * torch.einsum("bd,btd->bt", adapted, F.normalize(text, dim=-1))
        return logits.softmax(dim=-1)[:, 1]

    def forward(self, features: BackboneOutput, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-map text maps and image probabilities; with a fitted memory also the fused map and image scores.

        text: [B,2,D] normal and abnormal text features of each sample's category.
        """
        graph_out, kernels = self.adapt(features)
        mapped = graph_out if self.variant == "paper" else torch.cat([graph_out, kernels], dim=1)
        layer_maps = self.text_maps(mapped, text)  # [B,M,H,W]
        outputs = {"layer_maps": layer_maps, "image_probability": self.image_probability(features.cls, text)}
        if self.memory.is_fitted:
            textual = layer_maps.mean(dim=1)
            fused = self.gamma * textual + (1 - self.gamma) * self.visual_map(features, graph_out)  # Eq. 14
            outputs["anomaly_map"] = fused
            upsampled = F.interpolate(fused.unsqueeze(1), size=self.score_size, mode="bilinear", align_corners=False)
            outputs["score"] = image_score(
                outputs["image_probability"], upsampled.squeeze(1), self.gamma, self.top_k
            )
        return outputs


def image_score(image_probability: torch.Tensor, maps: torch.Tensor, gamma: float, top_k: int) -> torch.Tensor:
    """Eq. 16: s = γ·s₁ + (1−γ)·mean(top-k pixels of M)."""
    top = maps.flatten(1).topk(min(top_k, maps[0].numel()), dim=1).values
    return gamma * image_probability + (1 - gamma) * top.mean(dim=1)
