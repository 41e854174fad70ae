"""Image and pixel decisions for an inspection line: thresholds, min-max normalisation and a sensitivity knob.

The state is kept as buffers so checkpoints and exported graphs carry it:

* ``image_threshold`` / ``pixel_threshold``: raw-score thresholds (F1-optimal on a calibration set, see
  :mod:`fsad.calibration`); NaN when not fitted.
* ``image_min``/``image_max`` and ``pixel_min``/``pixel_max``: the calibration set's score range.
* ``sensitivity`` in [0,1]: how eagerly the line flags anomalies (0.5 = the fitted threshold).

Normalisation is anomalib's min-max rule centred on the threshold: ``n(x) = clip((x − t)/(max − min) + ½, 0, 1)``,
so the fitted threshold maps to ½. The decision is ``n(x) ≥ 1 − sensitivity``; it is evaluated on the raw score,
``x ≥ t + (½ − sensitivity)·(max − min)``, which is the same rule without the rounding of ``n`` near the threshold.
``source`` records what the thresholds were fitted on: ``labelled`` anomalies or ``nsa``-synthesised ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

THRESHOLD_SOURCES = ("", "labelled", "nsa")
_FIELDS = ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")


class DecisionThresholds(nn.Module):
    """Fitted thresholds and normalisation statistics, applied to raw maps and scores."""

    def __init__(self, sensitivity: float = 0.5) -> None:
        super().__init__()
        for name in _FIELDS:
            self.register_buffer(name, torch.tensor(float("nan")))
        self.register_buffer("sensitivity", torch.tensor(0.5))
        self.set_sensitivity(sensitivity)
        self.source = ""

    # ----------------------------------------------------------------- state
    def set_sensitivity(self, sensitivity: float) -> None:
        if not 0.0 <= float(sensitivity) <= 1.0:
            raise ValueError(f"sensitivity must lie in [0,1], got {sensitivity}")
        self.sensitivity.fill_(float(sensitivity))

    def set(self, source: str, **values: float) -> None:
        """Store fitted values (any of ``image_threshold`` ... ``pixel_max``) and what they were fitted on."""
        if source not in THRESHOLD_SOURCES:
            raise ValueError(f"threshold source must be one of {THRESHOLD_SOURCES}, got {source!r}")
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise KeyError(f"unknown threshold fields {sorted(unknown)}; known: {list(_FIELDS)}")
        for name, value in values.items():
            getattr(self, name).fill_(float(value))
        self.source = source

    def as_dict(self) -> dict[str, Any]:
        """Plain values for metadata files (NaN becomes ``None``)."""
        values: dict[str, Any] = {}
        for name in (*_FIELDS, "sensitivity"):
            value = float(getattr(self, name))
            values[name] = None if math.isnan(value) else value
        values["source"] = self.source or None
        return values

    @property
    def has_image(self) -> bool:
        return not math.isnan(float(self.image_threshold))

    @property
    def has_pixel(self) -> bool:
        return not math.isnan(float(self.pixel_threshold))

    def get_extra_state(self) -> dict[str, str]:
        return {"source": self.source}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.source = str(state.get("source", ""))

    # ----------------------------------------------------------------- application
    def effective_threshold(self, threshold: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The raw value whose normalised value is ``1 − sensitivity``: ``t + (½ − s)·(max − min)``.

        Without a fitted range (a threshold set alone) the shift is 0 and the threshold applies as it is.
        """
        return threshold + torch.nan_to_num((0.5 - self.sensitivity) * (high - low), nan=0.0)

    @staticmethod
    def normalise(values: torch.Tensor, threshold: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``clip((x − t)/(max − min) + ½, 0, 1)`` (anomalib's min-max normalisation)."""
        span = (high - low).clamp_min(torch.finfo(values.dtype).eps)
        return ((values - threshold) / span + 0.5).clamp(0.0, 1.0)

    def image_label(self, scores: torch.Tensor) -> torch.Tensor:
        """1 where the image score reaches the effective image threshold (uint8 [B])."""
        limit = self.effective_threshold(self.image_threshold, self.image_min, self.image_max)
        return (scores >= limit).to(torch.uint8)

    def pixel_mask(self, maps: torch.Tensor) -> torch.Tensor:
        """1 where the map reaches the effective pixel threshold (uint8, the map's shape)."""
        limit = self.effective_threshold(self.pixel_threshold, self.pixel_min, self.pixel_max)
        return (maps >= limit).to(torch.uint8)

    def normalised_score(self, scores: torch.Tensor) -> torch.Tensor:
        return self.normalise(scores, self.image_threshold, self.image_min, self.image_max)

    def normalised_map(self, maps: torch.Tensor) -> torch.Tensor:
        return self.normalise(maps, self.pixel_threshold, self.pixel_min, self.pixel_max)
