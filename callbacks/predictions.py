"""Prediction outputs: overlay PNGs, raw anomaly maps, predicted masks and ``scores.csv`` under
``<run_dir>/predictions/``. A mask PNG (``<name>_mask.png``, 0/255) is written when the model carries a pixel
threshold (fitted by ``fsad export``'s calibration, :mod:`fsad.calibration`).

Outputs mirror the input tree: an image at ``<path>/a/b/x.jpg`` gives ``predictions/a/b/x_map.npy`` and
``predictions/a/b/x.png``, and its ``scores.csv`` row names ``a/b/x.jpg`` (relative to ``data.path``). Maps are
saved at each image's own size (``map_size: eval`` keeps the evaluation size). Everything is written into
``predictions.partial/`` and swapped into place at the end, so ``predictions/`` holds exactly one run's files and
a failed run leaves the previous run's intact. Under DDP every rank writes its own images' maps, rank 0 gathers
the rows (dropping the sampler's padding duplicates) and alone writes ``scores.csv``.

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
from PIL import Image

from fsad.batch import Batch
from fsad.callbacks.metrics import f1_max_threshold, gather_to_rank_zero
from fsad.callbacks.visualiser import (
    ColourScale,
    ReviewCaption,
    fitted_threshold,
    render_review,
    run_scale,
    thresholds_scale,
    write_png,
)
from fsad.datamodules.transforms import load_rgb
from fsad.lightning_modules.components.thresholds import DecisionThresholds
from fsad.run_folder import (
    fresh_directory,
    output_path,
    replace_directory,
    write_bytes_atomically,
    write_image,
    write_text_atomically,
)


def overlay_scale(thresholds: DecisionThresholds, maps: torch.Tensor) -> ColourScale:
    """The overlays' colour scale: the calibrated normalisation when the model carries fitted pixel thresholds and
    their range, otherwise the min–max of this batch's raw maps (so the heat is never a uniform blue)."""
    calibrated = thresholds_scale(thresholds)
    if calibrated is not None:
        return calibrated
    return run_scale(float(maps.min()), float(maps.max()), fitted_threshold(thresholds, "pixel"), source="batch")


class PredictionWriter(Callback):
    """Writes every predicted image's overlay and raw map, and one ``scores.csv`` row per input file.

    Args:
        threshold: a number, ``f1`` (fitted on the validation folders, or taken from the checkpoint), or ``None``
            (the checkpoint's threshold if it has one, else no labels).
        map_format: raw maps as ``npy`` (float32) or ``png16`` (16-bit PNG, 0..65535 for 0..1).
        overlays: also write review pictures (image | heat overlay with the predicted-mask outline | colour bar,
            with the score and predicted label written under them); the scale is the calibrated normalisation when
            the model carries fitted pixel thresholds, otherwise the batch's min–max of raw maps.
        map_size: ``image`` (each image's own size, bilinear) or ``eval`` (the model's evaluation size).
    """

    def __init__(
        self,
        threshold: float | Literal["f1"] | None = None,
        map_format: Literal["npy", "png16"] = "npy",
        overlays: bool = True,
        map_size: Literal["image", "eval"] = "image",
    ) -> None:
        if map_format not in ("npy", "png16"):
            raise ValueError(f"PredictionWriter.map_format must be 'npy' or 'png16', got {map_format!r}")
        if map_size not in ("image", "eval"):
            raise ValueError(f"PredictionWriter.map_size must be 'image' or 'eval', got {map_size!r}")
        self.map_size = map_size
        if isinstance(threshold, str) and threshold != "f1":
            raise ValueError(f"PredictionWriter.threshold must be a number, 'f1' or null, got {threshold!r}")
        self.threshold, self.map_format, self.overlays = threshold, map_format, overlays
        self.rows: dict[int, dict[str, Any]] = {}

    @staticmethod
    def _relative(trainer: Trainer, path: str) -> Path:
        """``path`` relative to the datamodule's ``path`` folder (its name alone when a single file was given)."""
        root = Path(getattr(trainer.datamodule, "path", Path(path).parent))
        return Path(path).relative_to(root) if root.is_dir() else Path(Path(path).name)

    def _staging(self, trainer: Trainer) -> Path:
        return output_path(trainer.default_root_dir, "predictions.partial")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = {}
        if trainer.is_global_zero:
            fresh_directory(self._staging(trainer))
        trainer.strategy.barrier("PredictionWriter.staging")

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
        threshold = self.active_threshold(pl_module)
        scale = overlay_scale(pl_module.thresholds, result.anomaly_map)
        decided_by = "" if math.isnan(threshold) else f"image threshold {threshold:.4g}"
        for row, path in enumerate(result.image_path):
            index = int(result.index[row])
            if index % trainer.world_size != trainer.global_rank:  # a DDP padding copy of another rank's image
                continue
            anomaly_map = result.anomaly_map[row].float().cpu().numpy()
            if self.map_size == "image":
                with Image.open(path) as image:
                    anomaly_map = cv2.resize(anomaly_map, image.size, interpolation=cv2.INTER_LINEAR)
            score = float(result.pred_score[row])
            relative = self._relative(trainer, path)
            out_dir = self._staging(trainer) / relative.parent
            name = relative.stem
            if self.map_format == "npy":
                buffer = io.BytesIO()
                np.save(buffer, anomaly_map.astype(np.float32))
                write_bytes_atomically(out_dir / f"{name}_map.npy", buffer.getvalue())
            else:
                write_image(out_dir / f"{name}_map.png", (np.clip(anomaly_map, 0, 1) * 65535).astype(np.uint16))
            predicted_mask = None
            if pl_module.thresholds.has_pixel:  # the predicted defect mask, 0/255, at the map's size
                predicted_mask = pl_module.thresholds.pixel_mask(result.anomaly_map[row]).cpu().numpy()
                write_image(out_dir / f"{name}_mask.png", predicted_mask * 255)
            label = "" if math.isnan(threshold) else int(score >= threshold)
            if self.overlays:
                caption = ReviewCaption(score, predicted=None if label == "" else label, decided_by=decided_by)
                picture = render_review(load_rgb(path), anomaly_map, scale, caption, predicted=predicted_mask)
                write_png(out_dir / f"{name}.png", picture)
            self.rows[index] = {"path": relative.as_posix(), "score": repr(score), "label": label, "error": ""}

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shards = gather_to_rank_zero(self.rows)  # also the barrier after which every rank's maps are on disk
        if shards is None:
            return
        rows = {index: row for shard in shards for index, row in shard.items()}
        bad = [
            {"path": self._relative(trainer, path).as_posix(), "score": "", "label": "", "error": error}
            for path, error in getattr(trainer.datamodule, "bad_files", [])
        ]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "score", "label", "error"])
        writer.writeheader()
        writer.writerows(sorted([*rows.values(), *bad], key=lambda r: r["path"]))
        staging = self._staging(trainer)
        write_text_atomically(staging / "scores.csv", buffer.getvalue())
        replace_directory(staging, output_path(trainer.default_root_dir, "predictions"))
        target = Path(trainer.default_root_dir) / "predictions"  # where the fsad command publishes it
        threshold = self.active_threshold(pl_module)
        count = len(rows) + len(bad)
        print(
            f"wrote {count} rows to {target / 'scores.csv'}"
            + ("" if math.isnan(threshold) else f" (threshold {threshold:.6f})")
        )
