"""Prediction outputs: overlay PNGs, raw anomaly maps, predicted masks and ``scores.csv`` under
``<run_dir>/predictions/``. A mask PNG (``<name>_mask.png``, 0/255) is written when the model carries a pixel
threshold (fitted by ``fsad export``'s calibration, :mod:`fsad.calibration`).

Thresholds: a fixed ``threshold: <float>``, or ``threshold: f1`` fitted on the datamodule's labelled validation
folders and saved into ``<run_dir>/checkpoints/threshold.ckpt``; a later ``fsad predict --ckpt_path`` of that file
reuses it. A validation set without anomalies gives a warning and no threshold, never a silent minimum
(anomalib issues #2433, #3357).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from fsad.batch import Batch
from fsad.callbacks.heatmaps import render_heatmap
from fsad.callbacks.metrics import f1_max_threshold
from fsad.callbacks.results import write_text_atomically
from fsad.datamodules.transforms import load_rgb


class PredictionWriter(Callback):
    """Writes every predicted image's overlay and raw map, and one ``scores.csv`` row per input file.

    Args:
        threshold: a number, ``f1`` (fitted on the validation folders, or taken from the checkpoint), or ``None``
            (the checkpoint's threshold if it has one, else no labels).
        map_format: raw maps as ``npy`` (float32) or ``png16`` (16-bit PNG, 0..65535 for 0..1).
        overlays: also write image | heatmap-overlay PNGs.
    """

    def __init__(
        self,
        threshold: float | Literal["f1"] | None = None,
        map_format: Literal["npy", "png16"] = "npy",
        overlays: bool = True,
    ) -> None:
        if map_format not in ("npy", "png16"):
            raise ValueError(f"PredictionWriter.map_format must be 'npy' or 'png16', got {map_format!r}")
        if isinstance(threshold, str) and threshold != "f1":
            raise ValueError(f"PredictionWriter.threshold must be a number, 'f1' or null, got {threshold!r}")
        self.threshold, self.map_format, self.overlays = threshold, map_format, overlays
        self.rows: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = [
            {"path": path, "score": "", "label": "", "error": error}
            for path, error in getattr(trainer.datamodule, "bad_files", [])
        ]

    def active_threshold(self, pl_module: LightningModule) -> float:
        if isinstance(self.threshold, float | int) and not isinstance(self.threshold, bool):
            return float(self.threshold)
        return float(pl_module.image_threshold)

    def fit_threshold(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """F1-optimal image threshold on the labelled validation folders, saved with the model."""
        samples = trainer.datamodule.validation_samples()
        labels = np.array([s.label for s in samples])
        if not len(samples) or labels.sum() == 0:
            warnings.warn(
                "threshold: f1 needs labelled anomalies in data.validation_abnormal_dir; none found, so predictions "
                "get no labels (no threshold was guessed)",
                UserWarning,
                stacklevel=2,
            )
            return
        scores = []
        for batch in trainer.datamodule.validation_loader():
            batch.image = batch.image.to(pl_module.device)
            scores.append(pl_module.predict_batch(batch).pred_score.cpu())
        _, threshold = f1_max_threshold(torch.cat(scores).numpy(), labels)
        pl_module.image_threshold.fill_(threshold)
        path = Path(trainer.default_root_dir) / "checkpoints" / "threshold.ckpt"
        trainer.save_checkpoint(path)
        print(f"fitted F1 threshold {threshold:.6f} on {len(samples)} validation images; saved in {path}")

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and self.threshold == "f1" and math.isnan(float(pl_module.image_threshold)):
            self.fit_threshold(trainer, pl_module)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        result = outputs if isinstance(outputs, Batch) else batch
        out_dir = Path(trainer.default_root_dir) / "predictions"
        out_dir.mkdir(parents=True, exist_ok=True)
        threshold = self.active_threshold(pl_module)
        for row, path in enumerate(result.image_path):
            anomaly_map = result.anomaly_map[row].float().cpu().numpy()
            score = float(result.pred_score[row])
            name = f"{int(result.index[row]):05d}_{Path(path).stem}"
            if self.map_format == "npy":
                buffer = io.BytesIO()
                np.save(buffer, anomaly_map.astype(np.float32))
                (out_dir / f"{name}_map.npy").write_bytes(buffer.getvalue())
            else:
                cv2.imwrite(str(out_dir / f"{name}_map.png"), (np.clip(anomaly_map, 0, 1) * 65535).astype(np.uint16))
            if pl_module.thresholds.has_pixel:  # the predicted defect mask, 0/255, at the map's size
                mask = pl_module.thresholds.pixel_mask(result.anomaly_map[row]).cpu().numpy()
                cv2.imwrite(str(out_dir / f"{name}_mask.png"), mask * 255)
            if self.overlays:
                panel = render_heatmap(load_rgb(path), anomaly_map, np.zeros_like(anomaly_map, dtype=np.uint8))
                height, width = anomaly_map.shape
                keep = np.r_[0:width, 2 * width + 8 : 3 * width + 8]  # image | overlay (drop the contour panel)
                cv2.imwrite(str(out_dir / f"{name}.png"), cv2.cvtColor(panel[:, keep], cv2.COLOR_RGB2BGR))
            label = "" if math.isnan(threshold) else int(score >= threshold)
            self.rows.append({"path": path, "score": repr(score), "label": label, "error": ""})

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "score", "label", "error"])
        writer.writeheader()
        writer.writerows(sorted(self.rows, key=lambda r: r["path"]))
        target = Path(trainer.default_root_dir) / "predictions" / "scores.csv"
        write_text_atomically(target, buffer.getvalue())
        threshold = self.active_threshold(pl_module)
        print(f"wrote {len(self.rows)} rows to {target}" + ("" if math.isnan(threshold) else f" (threshold {threshold:.6f})"))
