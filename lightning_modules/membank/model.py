"""Training-free memory-bank anomaly model: the vision branch of PromptAD, FineGrainedAD and KAG-prompt.

Pixel map = FineGrainedAD Eq. 1, ``M_v = mean_{l∈taps} min_{m∈𝓜_l} (1 − cos(f_l, m)) / 2`` on the patch grid.
Image score = ``max`` of that map, the visual term PromptAD/FineGrainedAD feed into Eq. 8.
"""

from __future__ import annotations

import torch
from torch import nn

from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.components.memory_bank import MemoryBank


class MemoryBankModel(nn.Module):
    """Scores each patch by its distance to the nearest k-shot patch at the backbone's tapped blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = MemoryBank()

    def fit(self, support: BackboneOutput) -> None:
        """Build one bank per tap from the support images' raw tokens."""
        self.memory.fit(support.taps)

    def forward(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Return grid maps [B,rows,cols] and image scores [B], both in [0,1]."""
        distances = self.memory(features.taps)
        grid_maps = distances.reshape(distances.shape[0], *features.grid)
        return grid_maps, grid_maps.flatten(1).amax(dim=1)
