"""WinCLIP (zero-shot) and WinCLIP+ (few-shot): window-level CLIP scoring, pure torch.

Notation of the WinCLIP paper (Jeong et al., CVPR 2023):

* Eq. 1, class score: ``s(x) = softmax(⟨f(x), [t_n, t_a]⟩ / τ)[anomalous]`` with cosine similarity, τ = 0.07, and
  ``t_n``/``t_a`` the means of the text embeddings of the compositional prompt ensemble (states × templates).
* Window embeddings: for each window of ``s×s`` patches (s = 2, 3, stride 1), the window's input tokens and the
  class token go through the whole transformer again; the class token's output, ``ln_post`` then ``proj``, is the
  window's embedding.
* Harmonic aggregation: a patch's score at one scale is the harmonic mean of the scores of the windows covering it;
  the zero-shot map is the harmonic mean over {image score, 2×2 map, 3×3 map}.
* Eq. 4, WinCLIP+: ``min_{r∈R} (1 − cos(f, r)) / 2`` against the k shots' embeddings at the same scale (patch tokens
  for the 1×1 scale, window embeddings for the others); the few-shot map is the mean over scales. Pixel map =
  (zero-shot + few-shot) / 2, image score = (class score + max of the few-shot map) / 2.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput, ClipBackbone
from fsad.lightning_modules.components.memory_bank import MemoryBank

Variant = Literal["paper", "code"]
VARIANTS: tuple[str, ...] = ("paper", "code")
PATCH_SCALE = 1
"""Memory-bank key of the full-image patch tokens (the 1×1 "window")."""

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)  # fmt: skip
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.", "a bright photo of a {}.",
    "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.",
    "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.",
    "a photo of the large {}.", "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)  # fmt: skip
"""The 21 templates of anomalib's WinCLIP, one of them ("jpeg corrupted ... the") listed twice, as there."""


def prompt_ensemble(object_name: str) -> tuple[list[str], list[str]]:
    """Every (state, template) sentence for the normal and the anomalous class, states outermost."""
    normal = [template.format(state.format(object_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(object_name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous


def window_indices(grid: tuple[int, int], scale: int) -> torch.Tensor:
    """Row-major patch indices of every ``scale×scale`` window at stride 1: [windows, scale²], windows row-major."""
    rows, cols = grid
    if scale > min(rows, cols):
        raise ValueError(f"window scale {scale} does not fit the {rows}×{cols} patch grid")
    index = torch.arange(rows * cols).reshape(rows, cols)
    windows = index.unfold(0, scale, 1).unfold(1, scale, 1)  # [rows-s+1, cols-s+1, s, s]
    return windows.reshape(-1, scale * scale)


def covering_windows(indices: torch.Tensor, patches: int) -> torch.Tensor:
    """[patches, most windows per patch]: for each patch, the windows covering it in ascending order, padded with the
    index ``windows`` (a column of zeros is appended there at aggregation time)."""
    windows = indices.shape[0]
    lists = [[] for _ in range(patches)]
    for window, members in enumerate(indices.tolist()):
        for patch in members:
            lists[patch].append(window)
    width = max(len(covering) for covering in lists)
    return torch.tensor([covering + [windows] * (width - len(covering)) for covering in lists])


def harmonic_aggregation(window_scores: torch.Tensor, covering: torch.Tensor) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it: [B,W] → [B,N].

    ``n_p / Σ_{w∋p} 1/s_w``, the sum gathered per patch (a product with a 0/1 coverage matrix would turn one zero
    score's ``inf`` into ``0·inf = nan`` for every patch); a zero window score makes the patch score 0.
    """
    padded = torch.cat([1.0 / window_scores, window_scores.new_zeros(window_scores.shape[0], 1)], dim=1)
    counts = (covering < window_scores.shape[1]).sum(dim=1).to(window_scores.dtype)
    return (counts / padded[:, covering].sum(dim=-1)).nan_to_num(nan=0.0, posinf=0.0)


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1: probability of the anomalous class, softmax over cosine similarities / τ: [..., D] → [...]."""
    similarity = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
    return (similarity / temperature).softmax(dim=-1)[..., 1]


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"model.variant: {variant!r} is not one of {list(VARIANTS)}")


class WinClipModel(nn.Module):
    """Text embeddings, window masks and (for k > 0) the support set's embeddings at every scale.

    Args:
        grid: the backbone's patch grid (rows, cols).
        scales: window sides in patches (2 and 3 in the paper).
        temperature: τ of Eq. 1 (0.07).
        variant: ``paper`` runs the transformer over each window's own tokens; ``code`` reproduces anomalib's
            computation on open_clip 3.3.0, whose transformer is batch-first while anomalib transposes the window
            tokens to sequence-first: each token position then attends across all windows of all images in the batch.
    """

    def __init__(
        self, grid: tuple[int, int], scales: tuple[int, ...] = (2, 3), temperature: float = 0.07,
        variant: Variant = "paper",
    ) -> None:  # fmt: skip
        super().__init__()
        check_variant(variant)
        self.grid = tuple(grid)
        self.scales = tuple(int(s) for s in scales)
        if not self.scales:
            raise ValueError("model.scales: at least one window scale is needed")
        self.temperature = temperature
        self.variant = variant
        patches = self.grid[0] * self.grid[1]
        for scale in self.scales:
            self.register_buffer(f"windows_{scale}", window_indices(self.grid, scale), persistent=False)
            covering = covering_windows(window_indices(self.grid, scale), patches)
            self.register_buffer(f"cover_{scale}", covering, persistent=False)
        self.register_buffer("text_embeddings", torch.empty(0))
        self.memory = MemoryBank()

    # ----------------------------------------------------------------- set-up
    @torch.no_grad()
    def build_text(self, backbone: ClipBackbone, object_name: str) -> None:
        """Mean text embedding of each class over its prompt ensemble: [2, D] (normal, anomalous)."""
        normal, anomalous = prompt_ensemble(object_name)
        device = backbone.logit_scale.device
        means = []
        for prompts in (normal, anomalous):
            tokens = backbone.tokenize(prompts).to(device)
            # only up to the longest prompt's end-of-text token (the highest token id): exact under the causal mask
            encoded = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens.argmax(dim=-1))
            means.append(encoded.mean(dim=0))
        self.text_embeddings = torch.stack(means)

    def fit_support(self, support: BackboneOutput, backbone: ClipBackbone) -> None:
        """WinCLIP+: keep the k shots' patch tokens and window embeddings, one memory bank per scale."""
        windows = self.window_embeddings(support, backbone)
        banks = {PATCH_SCALE: self.patch_embeddings(support, backbone)}
        banks.update(zip(self.scales, windows, strict=True))
        self.memory.fit(banks)

    def clear_support(self) -> None:
        """Zero-shot WinCLIP: forget any support set."""
        self.memory.clear()

    @property
    def few_shot(self) -> bool:
        return self.memory.is_fitted

    # ----------------------------------------------------------------- embeddings
    @staticmethod
    def patch_embeddings(features: BackboneOutput, backbone: ClipBackbone) -> torch.Tensor:
        """Full-image patch tokens after the last block and ``ln_post`` (no projection): [B,N,width]."""
        last = len(backbone.clip.visual.transformer.resblocks)
        return backbone.clip.visual.ln_post(features.taps[last].to(backbone.dtype)).float()

    def window_embeddings(self, features: BackboneOutput, backbone: ClipBackbone) -> list[torch.Tensor]:
        """One [B, windows, D] tensor per scale: each window's tokens with the class token, through the transformer."""
        return [self.window_embedding(features.taps[0], backbone, scale) for scale in self.scales]

    def window_embedding(self, input_tokens: torch.Tensor, backbone: ClipBackbone, scale: int) -> torch.Tensor:
        """[B, windows, D] at one scale from the transformer's input tokens [B,N,width] (tap 0, after ``ln_pre``).

        All windows of all images go through the transformer as one batch (a gather, then one pass). In the paper
        variant a window's embedding depends only on its image and the backbone; in the code variant on the whole
        batch.
        """
        visual = backbone.clip.visual
        tokens = input_tokens.to(backbone.dtype)
        batch, _, width = tokens.shape
        cls_input = visual.ln_pre(visual.class_embedding + visual.positional_embedding[0]).to(backbone.dtype)
        indices = getattr(self, f"windows_{scale}")  # [W, s²]
        count = indices.shape[0]
        gathered = tokens[:, indices]  # [B, W, s², width]
        cls = cls_input.expand(batch, count, 1, width)
        sequences = torch.cat([cls, gathered], dim=2).reshape(batch * count, -1, width)
        if self.variant == "code":  # window-major order and sequence axis first, as anomalib builds them
            sequences = sequences.reshape(batch, count, -1, width).transpose(0, 1).reshape(count * batch, -1, width)
            out = visual.transformer(sequences.transpose(0, 1)).transpose(0, 1)
            pooled = visual.ln_post(out[:, 0]) @ visual.proj
            pooled = pooled.reshape(count, batch, -1).transpose(0, 1)
        else:
            out = visual.transformer(sequences)
            pooled = (visual.ln_post(out[:, 0]) @ visual.proj).reshape(batch, count, -1)
        return pooled.float()

    # ----------------------------------------------------------------- scoring
    def zero_shot_map(self, image_scores: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        """Harmonic mean over {image score, each scale's harmonically aggregated window scores}: [B,N]."""
        patches = self.grid[0] * self.grid[1]
        maps = [image_scores[:, None].expand(-1, patches)]
        for scale, embedding in zip(self.scales, windows, strict=True):
            scores = class_scores(embedding, self.text_embeddings, self.temperature)
            maps.append(harmonic_aggregation(scores, getattr(self, f"cover_{scale}")))
        return len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)

    def few_shot_map(self, patches: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 4 at every scale, window scores aggregated harmonically, then the mean over scales: [B,N]."""
        maps = [self.memory.min_distance(PATCH_SCALE, patches)]
        for scale, embedding in zip(self.scales, windows, strict=True):
            distances = self.memory.min_distance(scale, embedding)
            maps.append(harmonic_aggregation(distances, getattr(self, f"cover_{scale}")))
        return torch.stack(maps).mean(dim=0)

    def stages(
        self, features: BackboneOutput, backbone: ClipBackbone, windows: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every intermediate result of one batch (for the parity tests), ending in ``grid_map`` and ``image_score``;
        ``windows`` are the batch's window embeddings when already known (read from the feature cache)."""
        if self.text_embeddings.numel() == 0:
            raise RuntimeError("WinClipModel.build_text must run (with the category name) before scoring")
        if windows is None:
            windows = self.window_embeddings(features, backbone)
        image_scores = class_scores(features.cls, self.text_embeddings, self.temperature)
        zero_shot = self.zero_shot_map(image_scores, windows)
        out = {f"window_embeddings_{s}": w for s, w in zip(self.scales, windows, strict=True)}
        out.update(class_score=image_scores, zero_shot_map=zero_shot, grid_map=zero_shot, image_score=image_scores)
        if self.few_shot:
            few_shot = self.few_shot_map(self.patch_embeddings(features, backbone), windows)
            out.update(
                few_shot_map=few_shot, grid_map=(zero_shot + few_shot) / 2,
                image_score=(image_scores + few_shot.amax(dim=1)) / 2,
            )  # fmt: skip
        return out

    def forward(
        self, features: BackboneOutput, backbone: ClipBackbone, windows: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid maps [B,rows,cols] and image scores [B], in [0,1]."""
        out = self.stages(features, backbone, windows)
        return out["grid_map"].reshape(-1, *self.grid), out["image_score"]
