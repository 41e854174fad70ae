"""The vision branch shared by all three methods: nearest-neighbour distance to the k-shot tokens.

FineGrainedAD Eq. 1 / PromptAD ``calculate_visual_anomaly_score``:
``M_v = ½ Σ_{l∈taps} min_{m∈𝓜_l} (1 − cos(f_l, m)) / 2`` (methods.md §1), here averaged over any number of taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """Per-tap banks of L2-normalised support tokens, queried by minimum cosine distance."""

    def __init__(self, query_chunk: int = 4096) -> None:
        super().__init__()
        self.query_chunk = query_chunk
        self.banks: dict[int, torch.Tensor] = {}

    def fit(self, tokens: dict[int, torch.Tensor]) -> None:
        """Store the support tokens of each tap; each value is [K,N,C] or [M,C]."""
        if not tokens:
            raise ValueError("memory bank needs at least one tap")
        self.banks = {tap: F.normalize(t.reshape(-1, t.shape[-1]).float(), dim=-1) for tap, t in tokens.items()}

    @property
    def is_fitted(self) -> bool:
        return bool(self.banks)

    def min_distance(self, tap: int, query: torch.Tensor) -> torch.Tensor:
        """``min_m (1 − cos(q, m)) / 2`` for every query token: [B,N,C] → [B,N] in [0,1]."""
        bank = self.banks[tap].to(query.device)
        flat = F.normalize(query.reshape(-1, query.shape[-1]).float(), dim=-1)
        best = torch.cat([(chunk @ bank.T).amax(dim=1) for chunk in flat.split(self.query_chunk)])
        return ((1.0 - best) / 2.0).clamp_(0.0, 1.0).reshape(query.shape[:-1])

    def forward(self, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
        """Mean over taps of the per-token minimum distances: {tap: [B,N,C]} → [B,N]."""
        if not self.is_fitted:
            raise RuntimeError("MemoryBank.fit must run on the support set before scoring")
        missing = set(self.banks) - set(tokens)
        if missing:
            raise KeyError(f"query lacks taps {sorted(missing)} that the memory bank was fitted on")
        return torch.stack([self.min_distance(tap, tokens[tap]) for tap in self.banks]).mean(dim=0)
