"""Memory-bank distances (FineGrainedAD Eq. 1) against a brute-force numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsad.lightning_modules.components.memory_bank import MemoryBank


def test_min_cosine_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    support = {3: rng.normal(size=(2, 9, 5)), 8: rng.normal(size=(2, 9, 5))}
    query = {3: rng.normal(size=(3, 9, 5)), 8: rng.normal(size=(3, 9, 5))}
    bank = MemoryBank(query_chunk=4)
    bank.fit({k: torch.tensor(v) for k, v in support.items()})
    ours = bank({k: torch.tensor(v) for k, v in query.items()}).numpy()

    def per_tap(tap: int) -> np.ndarray:
        s = support[tap].reshape(-1, 5)
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        out = np.empty((3, 9))
        for b in range(3):
            for j in range(9):
                q = query[tap][b, j] / np.linalg.norm(query[tap][b, j])
                out[b, j] = min((1 - q @ m) / 2 for m in s)
        return out

    np.testing.assert_allclose(ours, (per_tap(3) + per_tap(8)) / 2, atol=1e-6)


def test_support_token_has_zero_distance_and_unfitted_bank_fails() -> None:
    bank = MemoryBank()
    with pytest.raises(RuntimeError, match="fit"):
        bank({1: torch.ones(1, 1, 3)})
    tokens = torch.randn(1, 4, 3)
    bank.fit({1: tokens})
    assert bank({1: tokens}).abs().max() < 1e-6
