"""Shared fixtures: the real data beside the checkout, and quiet offline defaults for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# huggingface_hub reads this at import time, so it must be set before any test module imports open_clip.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
#: real test images: $FSAD_TEST_DATA, or a ``shared/data`` folder beside the checkout
SHARED_DATA = Path(os.environ.get("FSAD_TEST_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test may reach the network or write W&B files outside its temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # a WandbLogger reuses an open run: one test's run per test
        wandb.finish()


@pytest.fixture
def shared_data() -> Path:
    """The real test images (:data:`SHARED_DATA`); the test skips when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def mvtec_root(shared_data: Path) -> Path:
    """Root of the real MVTec-AD subset (category ``bottle``)."""
    root = shared_data / "mvtec_ad"
    if not (root / "bottle").is_dir():
        pytest.skip("mvtec_ad/bottle not in the shared data")
    return root
