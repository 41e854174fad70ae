"""The batch contract shared by every datamodule, module and callback (docs/architecture.md, "The batch contract").

Data flows one way: a DataModule yields a :class:`Batch`, a module fills ``anomaly_map`` and ``pred_score``
on it, and the callbacks read those fields. Lightning moves dataclasses between devices field by field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class Batch:
    """One batch of samples.

    Inputs:
        image: float [B,3,H,W], normalised for the backbone.
        gt_mask: uint8 [B,h,w] at evaluation size, all zero for good images.
        gt_label: int64 [B], 1 for anomalous.
        image_path: the source file of each image.
        mask_path: the source mask of each image, or ``None``.
        category: the category of each image.
        index: int64 [B], each sample's index in its dataset (used to drop DDP padding duplicates).

    Outputs written by the module:
        anomaly_map: float32 [B,h,w], raw: the method's own values, any real range.
        pred_score: float32 [B], raw, any real range; higher means more anomalous.

    Nothing between the method and the metrics clamps, squashes or rescales the outputs: AUROC, AP and F1 are rank
    metrics, and a clamp turns distinct scores into ties. Ranges are fixed only for display (heatmaps, overlays),
    thresholds and the exported min-max normalisation.
    """

    image: torch.Tensor
    gt_mask: torch.Tensor
    gt_label: torch.Tensor
    image_path: list[str]
    mask_path: list[str | None]
    category: list[str]
    index: torch.Tensor
    anomaly_map: torch.Tensor | None = None
    pred_score: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def update(self, **outputs: torch.Tensor) -> Batch:
        """Set output fields in place and return the batch (so a step can ``return batch.update(...)``)."""
        names = {f.name for f in fields(self)}
        for key, value in outputs.items():
            if key not in names:
                raise AttributeError(f"Batch has no field {key!r}; known fields: {sorted(names)}")
            setattr(self, key, value)
        return self


def collate_batch(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Collate dataset items (dicts with the input fields of :class:`Batch`) into one :class:`Batch`."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    return Batch(
        image=torch.stack([torch.as_tensor(s["image"], dtype=torch.float32) for s in samples]),
        gt_mask=torch.stack([torch.as_tensor(s["gt_mask"], dtype=torch.uint8) for s in samples]),
        gt_label=torch.as_tensor([int(s["gt_label"]) for s in samples], dtype=torch.int64),
        image_path=[str(s["image_path"]) for s in samples],
        mask_path=[None if s.get("mask_path") is None else str(s["mask_path"]) for s in samples],
        category=[str(s["category"]) for s in samples],
        index=torch.as_tensor([int(s["index"]) for s in samples], dtype=torch.int64),
    )
