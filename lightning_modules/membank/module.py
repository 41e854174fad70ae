"""Lightning wrapper of the training-free memory-bank method (the thin end-to-end slice)."""

from __future__ import annotations

import torch

from fsad.lightning_modules.base import FewShotAnomalyModule
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec
from fsad.lightning_modules.membank.model import MemoryBankModel


class MemoryBankAD(FewShotAnomalyModule):
    """k-shot nearest-neighbour scoring on raw CLIP tokens; nothing to train, ``fsad test`` runs it directly."""

    method_name = "membank"
    protocol_stage = "training_free"
    #: the support bank's features depend on these; ``eval_size`` and ``gaussian_sigma`` are evaluation settings
    trained_structure = frozenset({"backbone", "image_size"})

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 256,
        gaussian_sigma: float = 4.0,
    ) -> None:
        super().__init__(backbone=backbone, image_size=image_size, eval_size=eval_size, gaussian_sigma=gaussian_sigma)
        self.model = MemoryBankModel()

    def fit_support(self, support: BackboneOutput) -> None:
        self.model.fit(support)

    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(features)

    def configure_optimizers(self) -> None:
        """Training-free: no optimiser."""
        return None
