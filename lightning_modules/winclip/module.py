"""Lightning wrapper of WinCLIP (k = 0) and WinCLIP+ (k > 0): training-free, one test pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fsad.batch import Batch
from fsad.lightning_modules.base import FewShotAnomalyModule
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec
from fsad.lightning_modules.winclip.model import Variant, WinClipModel, check_variant


@dataclass
class WindowedOutput(BackboneOutput):
    """A backbone pass together with its window embeddings (one [B, windows, D] per scale), read from or stored in
    the feature cache."""

    windows: list[torch.Tensor] = field(default_factory=list)


def window_part(scale: int) -> str:
    """The feature-cache part name of the window embeddings at one scale."""
    return f"winclip-windows-{scale}x{scale}"


class WinCLIP(FewShotAnomalyModule):
    """WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023): compositional prompt ensemble and multi-scale window scores;
    with k > 0 support shots, the few-shot visual memory at every scale. Nothing to train: ``fsad test`` runs it.

    Args:
        backbone: the OpenCLIP model (ViT-B-16-plus-240 in the paper); ``taps`` must hold 0 and the last block.
        image_size, eval_size, gaussian_sigma: as for every method.
        scales: window sides in patches (2, 3).
        temperature: τ of the class score (0.07).
        variant: ``paper`` (each window attends only to its own tokens) or ``code`` (anomalib's computation on
            current open_clip, see ``model.py`` and the README).
    """

    method_name = "winclip"
    protocol_stage = "training_free"
    zero_shot_capable = True
    #: the support memory and the text embeddings depend on these; ``temperature``, ``eval_size`` and
    #: ``gaussian_sigma`` are evaluation settings
    trained_structure = frozenset({"backbone", "image_size", "scales", "variant"})

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 256,
        gaussian_sigma: float = 4.0,
        scales: tuple[int, ...] = (2, 3),
        temperature: float = 0.07,
        variant: Variant = "paper",
    ) -> None:
        check_variant(variant)
        super().__init__(backbone=backbone, image_size=image_size, eval_size=eval_size, gaussian_sigma=gaussian_sigma)
        blocks = len(self.backbone.clip.visual.transformer.resblocks)
        missing = sorted({0, blocks} - set(self.backbone.spec.taps))
        if missing:
            raise ValueError(
                f"model.backbone.taps: WinCLIP needs taps 0 (the transformer's input) and {blocks} (the last block); "
                f"missing {missing}"
            )
        self.variant = variant
        self.model = WinClipModel(self.backbone.grid, tuple(scales), temperature, variant)

    def prepare_for_data(self, data: Any) -> None:
        """Build the prompt ensemble of the data's category."""
        category = getattr(data, "category", None)
        if category is None:
            raise RuntimeError("WinCLIP needs a datamodule with a `category` to build its prompts")
        self.model.build_text(self.backbone, str(category).replace("_", " "))

    def clear_support(self) -> None:
        """Zero-shot WinCLIP (``k_shot: 0``): no support memory; with shots, WinCLIP+."""
        self.model.clear_support()

    def fit_support(self, support: BackboneOutput) -> None:
        self.model.fit_support(support, self.backbone)

    def encode_images(self, batch: Batch) -> BackboneOutput:
        """The backbone pass, and with a feature cache (paper variant) also the window embeddings, the expensive part
        of the test step: they depend only on the image and the backbone, so every cell of a sweep over k and seeds
        (WinCLIP and WinCLIP+ alike) computes them once per test image. The code variant's windows attend across the
        batch, so they are not cached."""
        features = super().encode_images(batch)
        if self.feature_cache is None or self.variant == "code":
            return features
        windows = []
        for scale in self.model.scales:
            entries = self.feature_cache.rows(
                self.backbone, batch.image_path, self.feature_variant(), window_part(scale),
                lambda missing, scale=scale: [
                    {"windows": row}
                    for row in self.model.window_embedding(features.taps[0][missing], self.backbone, scale)
                ],
            )  # fmt: skip
            windows.append(torch.stack([e["windows"] for e in entries]).to(features.cls.device, torch.float32))
        return WindowedOutput(features.cls, features.vv_tokens, features.taps, features.grid, windows)

    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        windows = features.windows if isinstance(features, WindowedOutput) else None
        return self.model(features, self.backbone, windows)

    def configure_optimizers(self) -> None:
        """Training-free: no optimiser."""
        return None
