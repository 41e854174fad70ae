"""fsad: few-shot anomaly detection on OpenCLIP with Lightning.

``fsad.Inferencer`` (see :mod:`fsad.inference`), its ``Prediction`` and ``SupportReplacedWarning`` are imported on
first use, so ``import fsad`` stays light.
"""

from __future__ import annotations

import os
from typing import Any

# Offline means offline: albumentations asks the package registry for a newer version when it is imported, unless
# this is set. Every fsad import of it (fsad.datamodules, the CLI, the Inferencer) passes through this package first.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def __getattr__(name: str) -> Any:
    if name in ("Inferencer", "Prediction", "SupportReplacedWarning"):
        from fsad import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'fsad' has no attribute {name!r}")
