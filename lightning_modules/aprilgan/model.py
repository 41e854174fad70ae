"""APRIL-GAN (the VAND 2023 challenge winner, arXiv 2305.17382) on OpenCLIP, in pure torch.

Zero-shot: one linear adapter per tapped block maps its raw patch tokens into the joint image-text space; each
layer's cosine logits against the (normal, anomalous) text features are upsampled to the map size and
soft-maxed per pixel, and the anomalous probabilities of all layers make the text map. The image score is the
anomalous probability of the CLS embedding. Few-shot adds the memory map of the k shots' tapped tokens,
``1 − max cos``, per layer, to the text map, and the map's maximum to the image score.

Maps and scores are the authors' raw values: sums over the L layers, so maps range over [0, L] zero-shot and
[0, 3L] few-shot (the batch contract passes any range to the rank metrics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.components.losses import dice_loss
from fsad.lightning_modules.components.memory_bank import MemoryBank


class AprilGanModel(nn.Module):
    """Linear adapters on tapped patch tokens, text maps, and an optional k-shot memory map.

    Args:
        width: token width of the backbone's blocks (the adapters' input).
        embed_dim: joint image-text width (the adapters' output).
        taps: the tapped blocks, one adapter each, in this order.
        text_scale: logit scale of the cosine comparisons (the authors' 100).
        score_size: side of the maps the logits are upsampled to before the softmax (the authors' image size).
    """

    def __init__(self, width: int, embed_dim: int, taps: list[int], text_scale: float, score_size: int) -> None:
        super().__init__()
        self.taps = list(taps)
        self.adapters = nn.ModuleList(nn.Linear(width, embed_dim) for _ in self.taps)
        self.text_scale = text_scale
        self.score_size = score_size
        self.memory = MemoryBank()
        #: [B,2] (max of the few-shot map, zero-shot score) of the last few-shot batch, ``None`` zero-shot: what the
        #: authors' test-set normalised image score needs (``callbacks/paper_protocol.py::PaperTestSetMinMax``)
        self.last_image_parts: torch.Tensor | None = None
        #: Whether forward keeps :attr:`last_image_parts`: only that callback asks, during the test loop, so an export
        #: records a forward that changes no attribute.
        self.record_image_parts = False

    def fit(self, support: BackboneOutput) -> None:
        """Few-shot: keep the support images' tapped tokens, one bank per tap."""
        self.memory.fit({tap: support.taps[tap] for tap in self.taps})

    def clear(self) -> None:
        """Zero-shot: forget any support set."""
        self.memory.clear()

    def upsample(self, grid: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] → [B,C,S,S], bilinear with ``align_corners=True`` as the authors."""
        return F.interpolate(grid, size=self.score_size, mode="bilinear", align_corners=True)

    def layer_probabilities(self, features: BackboneOutput, text: torch.Tensor) -> torch.Tensor:
        """Per-layer (normal, anomalous) probabilities [B,L,2,S,S]; ``text`` is [B,2,D] unit features.

        ``softmax(Up(text_scale · ⟨norm(W_l f_l + b_l), t⟩))`` over the two texts, per pixel.
        """
        rows, cols = features.grid
        layers = []
        for tap, adapter in zip(self.taps, self.adapters, strict=True):
            tokens = F.normalize(adapter(features.taps[tap]), dim=-1)  # [B,N,D]
            logits = self.text_scale * tokens @ text.transpose(1, 2)  # [B,N,2]
            grid = logits.transpose(1, 2).reshape(logits.shape[0], 2, rows, cols)
            layers.append(self.upsample(grid).softmax(dim=1))
        return torch.stack(layers, dim=1)

    def image_probability(self, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Zero-shot image score [B]: ``softmax(text_scale · ⟨norm(cls), t⟩)`` of the anomalous text."""
        logits = self.text_scale * torch.einsum("bd,bkd->bk", F.normalize(cls, dim=-1), text)
        return logits.softmax(dim=-1)[:, 1]

    def memory_map(self, features: BackboneOutput) -> torch.Tensor:
        """Few-shot map [B,S,S]: ``Σ_l Up(1 − max_m cos(f_l, m))`` over the taps (bilinear, align_corners).

        The shared bank gives the mean over taps of ``(1 − max cos) / 2``; × 2L is the authors' sum (Up is linear).
        """
        distances = self.memory({tap: features.taps[tap] for tap in self.taps}) * (2 * len(self.taps))
        return self.upsample(distances.reshape(distances.shape[0], 1, *features.grid))[:, 0]

    def forward(self, features: BackboneOutput, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage: ``layer_probabilities``, ``text_map``, ``image_probability``, then ``memory_map`` (few-shot
        only), ``anomaly_map`` [B,S,S] and ``score`` [B]."""
        probabilities = self.layer_probabilities(features, text)
        text_map = probabilities[:, :, 1].sum(dim=1)
        image_probability = self.image_probability(features.cls, text)
        outputs = {"layer_probabilities": probabilities, "text_map": text_map, "image_probability": image_probability}
        if not self.memory.is_fitted:
            if self.record_image_parts:
                self.last_image_parts = None
            return outputs | {"anomaly_map": text_map, "score": image_probability}
        memory_map = self.memory_map(features)
        anomaly_map = text_map + memory_map
        map_maximum = anomaly_map.flatten(1).amax(dim=1)
        if self.record_image_parts:
            self.last_image_parts = torch.stack([map_maximum, image_probability], dim=1).detach()
        # the authors min-max normalise the map maxima over the test set first; per image, fsad cannot (README)
        score = 0.5 * (image_probability + map_maximum)
        return outputs | {"memory_map": memory_map, "anomaly_map": anomaly_map, "score": score}


def smoothed_focal_loss(
    probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """The authors' focal loss on class probabilities [B,C,H,W] and integer targets [B,H,W], pixel mean.

    Focal loss (Lin et al.) with label smoothing as the authors' ``FocalLoss`` computes it: the one-hot target is
    clamped to ``[smooth/(C−1), 1−smooth]`` and ``p_t = Σ_c onehot_c p_c + smooth``; loss ``−(1−p_t)^γ log p_t``.
    """
    classes = probabilities.shape[1]
    one_hot = F.one_hot(target.long(), classes).movedim(-1, 1).to(probabilities.dtype)
    one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
    p_true = (one_hot * probabilities).sum(dim=1) + smooth
    return (-(1.0 - p_true).pow(gamma) * p_true.log()).mean()


def aprilgan_loss(
    probabilities: torch.Tensor, target: torch.Tensor, focal_gamma: float = 2.0
) -> dict[str, torch.Tensor]:
    """Training loss: ``Σ_l Focal(P_l, G) + Dice(P_l[anomalous], G)`` over the layers of [B,L,2,S,S]; G ∈ {0,1}."""
    focal = sum(
        smoothed_focal_loss(probabilities[:, layer], target, focal_gamma) for layer in range(probabilities.shape[1])
    )
    dice = sum(dice_loss(probabilities[:, layer, 1], target) for layer in range(probabilities.shape[1]))
    return {"loss": focal + dice, "focal": focal, "dice": dice}
