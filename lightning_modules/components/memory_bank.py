"""The vision branch shared by all three methods: nearest-neighbour distance to the k-shot tokens.

FineGrainedAD Eq. 1 / PromptAD ``calculate_visual_anomaly_score``:
``M_v = ½ Σ_{l∈taps} min_{m∈𝓜_l} (1 − cos(f_l, m)) / 2`` (methods.md §1), here averaged over any number of taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BANK_PREFIX = "bank_"


class MemoryBank(nn.Module):
    """Per-tap banks of L2-normalised support tokens, queried by minimum cosine distance.

    Each bank is a buffer ``bank_<tap>`` [M,C], so the support set travels in checkpoints and exported models; a
    state dict with banks refits this module to them, one without banks leaves it unfitted.
    """

    def __init__(self, query_chunk: int = 4096) -> None:
        super().__init__()
        self.query_chunk = query_chunk
        self.taps: list[int] = []

    def clear(self) -> None:
        for tap in self.taps:
            delattr(self, f"{BANK_PREFIX}{tap}")
        self.taps = []

    def _store(self, banks: dict[int, torch.Tensor]) -> None:
        self.clear()
        for tap in sorted(banks):
            self.register_buffer(f"{BANK_PREFIX}{tap}", banks[tap])
        self.taps = sorted(banks)

    def fit(self, tokens: dict[int, torch.Tensor]) -> None:
        """Store the support tokens of each tap; each value is [K,N,C] or [M,C]."""
        if not tokens:
            raise ValueError("memory bank needs at least one tap")
        self._store({tap: F.normalize(t.reshape(-1, t.shape[-1]).float(), dim=-1) for tap, t in tokens.items()})

    @property
    def banks(self) -> dict[int, torch.Tensor]:
        return {tap: getattr(self, f"{BANK_PREFIX}{tap}") for tap in self.taps}

    @property
    def is_fitted(self) -> bool:
        return bool(self.taps)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Take the banks' taps and sizes from the state dict being loaded (they depend on the support set)."""
        start = prefix + BANK_PREFIX
        saved = {int(key[len(start) :]): value for key, value in state_dict.items() if key.startswith(start)}
        self._store({tap: torch.empty_like(value, device=self._device()) for tap, value in saved.items()})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _device(self) -> torch.device:
        return next(iter(self.banks.values())).device if self.taps else torch.device("cpu")

    def min_distance(self, tap: int, query: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``min_m (1 − cos(q, m)) / 2`` for every query token: [B,N,C] → [B,N], in [0,1] up to rounding (not clamped:
        a clamp would tie the tokens that rounding pushes past an end)."""
        bank = self.banks[tap].to(query.device, dtype)
        flat = F.normalize(query.reshape(-1, query.shape[-1]).to(dtype), dim=-1)
        if torch.compiler.is_exporting():  # one product: a recorded graph must serve every batch size
            best = (flat @ bank.T).amax(dim=1)
        else:
            best = torch.cat([(chunk @ bank.T).amax(dim=1) for chunk in flat.split(self.query_chunk)])
        return ((1.0 - best) / 2.0).reshape(query.shape[:-1])

    def forward(self, tokens: dict[int, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Mean over taps of the per-token minimum distances: {tap: [B,N,C]} → [B,N], computed in ``dtype`` (the
        queries normalised, the products, minima and mean all in it: PromptAD's fp16 scoring passes float16)."""
        if not self.is_fitted:
            raise RuntimeError("MemoryBank.fit must run on the support set before scoring")
        missing = set(self.taps) - set(tokens)
        if missing:
            raise KeyError(f"query lacks taps {sorted(missing)} that the memory bank was fitted on")
        return torch.stack([self.min_distance(tap, tokens[tap], dtype) for tap in self.taps]).mean(dim=0)
