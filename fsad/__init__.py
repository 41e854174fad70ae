"""fsad: few-shot anomaly detection on OpenCLIP with Lightning.

``fsad.Inferencer`` (see :mod:`fsad.inference`) is imported on first use, so ``import fsad`` stays light.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("Inferencer", "Prediction"):
        from fsad import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'fsad' has no attribute {name!r}")
