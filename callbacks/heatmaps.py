"""Review pictures of chosen test images: PNGs in the run directory and the same images in W&B, TensorBoard and
MLflow; the W&B ``predictions`` table; the image ROC and PR curves.

The chosen images are a fixed, seeded watchlist (a spread of good and defect images), plus optionally the
``worst`` highest-scoring normal images (the worst false positives) and lowest-scoring anomalous images (the
worst false negatives). Each is drawn by :func:`fsad.callbacks.visualiser.render_review` and written to
``heatmaps/<defect_type>/<stem>.png``; ``heatmaps/heatmaps.json`` lists them with score, labels and defect type
(the HTML report's gallery reads it), and ``curves.json`` holds the curves :class:`AnomalyMetrics` computed.

Colour scale: ``auto`` uses the calibrated normalisation when the model carries fitted pixel thresholds (the
threshold marked on the bar), otherwise the test set's min–max of the raw maps (every test image counts, not only
the chosen ones); ``run`` always uses the test set's range. Predicted labels and masks come from the model's fitted
thresholds; without them, from the F1-max thresholds of this test set that :class:`AnomalyMetrics` found (an
oracle choice that reads the test labels, named so in the caption). Under DDP everything is gathered to rank 0.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from fsad.batch import Batch
from fsad.callbacks.metrics import AnomalyMetrics, gather_to_rank_zero
from fsad.callbacks.visualiser import (
    ColourScale,
    ReviewCaption,
    colour_map,
    fitted_threshold,
    render_review,
    run_scale,
    send_to_loggers,
    thresholds_scale,
    write_png,
)
from fsad.datamodules.transforms import DataError, load_rgb
from fsad.run_folder import fresh_directory, output_path, replace_directory, write_text_atomically

TableChoice = Literal["watchlist", "all", "none"]


def choose_watchlist(labels: list[int], size: int, seed: int) -> list[int]:
    """A seeded spread of good and defect indices: half of each where possible, sorted."""
    rng = np.random.default_rng(seed)
    good = [i for i, label in enumerate(labels) if label == 0]
    defect = [i for i, label in enumerate(labels) if label != 0]
    n_defect = min(len(defect), max(size - len(good), size // 2))
    n_good = min(len(good), size - n_defect)
    picks = list(rng.choice(good, n_good, replace=False)) + list(rng.choice(defect, n_defect, replace=False))
    return sorted(int(i) for i in picks)


def worst_errors(scores: dict[int, float], labels: dict[int, int], count: int) -> dict[int, str]:
    """The ``count`` highest-scoring normal images (``false_positive``) and lowest-scoring anomalous images
    (``false_negative``), by index."""
    normal = sorted((i for i in scores if labels[i] == 0), key=lambda i: -scores[i])[:count]
    anomalous = sorted((i for i in scores if labels[i] != 0), key=lambda i: scores[i])[:count]
    return {**{i: "false_positive" for i in normal}, **{i: "false_negative" for i in anomalous}}


class HeatmapLogger(Callback):
    """Renders the chosen test images at the end of each test run.

    Args:
        num_images: watchlist size (a spread of good and defect images).
        seed: seed of the watchlist draw.
        worst: also render this many worst false positives and worst false negatives by score (0 = none).
        wandb_key: the media key of the pictures in W&B, TensorBoard and MLflow.
        color_scale: ``auto`` (calibrated when the model has fitted pixel thresholds, else the test set's
            min–max) or ``run`` (always the test set's min–max).
        table: rows of the W&B ``predictions`` table: the ``watchlist`` (with the worst errors), ``all`` test
            images (keeps every map until the end of the run), or ``none``.
    """

    def __init__(
        self, num_images: int = 16, seed: int = 0, worst: int = 0, wandb_key: str = "heatmaps",
        color_scale: Literal["auto", "run"] = "auto", table: TableChoice = "watchlist",
    ) -> None:  # fmt: skip
        if color_scale not in ("auto", "run"):
            raise ValueError(f"HeatmapLogger.color_scale must be 'auto' or 'run', got {color_scale!r}")
        if table not in ("watchlist", "all", "none"):
            raise ValueError(f"HeatmapLogger.table must be 'watchlist', 'all' or 'none', got {table!r}")
        if worst < 0:
            raise ValueError(f"HeatmapLogger.worst must be 0 or more, got {worst}")
        self.num_images, self.seed, self.worst = num_images, seed, worst
        self.wandb_key, self.color_scale, self.table = wandb_key, color_scale, table
        self.watchlist: list[int] = []
        self.written: list[Path] = []
        self._reset()

    def _reset(self) -> None:
        self._items: dict[int, dict[str, Any]] = {}  # index -> what a picture needs
        self._scores: dict[int, float] = {}
        self._labels: dict[int, int] = {}
        self._range = [math.inf, -math.inf]

    # ----------------------------------------------------------------- collection
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        samples = getattr(trainer.datamodule, "test_samples", None) if trainer.datamodule is not None else None
        if samples:
            self.watchlist = choose_watchlist([s.label for s in samples], self.num_images, self.seed)
        else:
            self.watchlist = list(range(self.num_images))

    def _keeps(self, index: int, score: float, label: int) -> bool:
        """Whether a sample's map must be held: watchlisted, every image for an ``all`` table, or still among the
        ``worst`` candidates of its class seen so far."""
        if index in self.watchlist or self.table == "all":
            return True
        if not self.worst:
            return False
        same = [self._scores[i] for i in self._items if self._labels[i] == label and i not in self.watchlist]
        if len(same) < self.worst:
            return True
        return score > min(same) if label == 0 else score < max(same)

    def _drop_surplus(self, label: int) -> None:
        """Forget the held candidates of ``label``'s class beyond the ``worst`` most extreme."""
        if self.table == "all":
            return
        candidates = [i for i in self._items if self._labels[i] == label and i not in self.watchlist]
        candidates.sort(key=lambda i: -self._scores[i] if label == 0 else self._scores[i])
        for index in candidates[self.worst :]:
            del self._items[index]

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        result = outputs if isinstance(outputs, Batch) else batch
        maps = result.anomaly_map.detach().float().cpu()
        self._range = [min(self._range[0], float(maps.min())), max(self._range[1], float(maps.max()))]
        for row, index in enumerate(result.index.tolist()):
            if index in self._scores:  # a DDP padding duplicate
                continue
            score, label = float(result.pred_score[row]), int(result.gt_label[row])
            self._scores[index], self._labels[index] = score, label
            if self._keeps(index, score, label):
                self._items[index] = {
                    "path": result.image_path[row],
                    "map": maps[row].numpy(),
                    "mask": result.gt_mask[row].detach().cpu().numpy(),
                    "score": score,
                    "label": label,
                }
                if self.worst and index not in self.watchlist:
                    self._drop_surplus(label)

    # ----------------------------------------------------------------- rendering
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shards = gather_to_rank_zero(
            {"items": self._items, "scores": self._scores, "labels": self._labels, "range": self._range}
        )
        if shards is None:
            return
        items, scores, labels = {}, {}, {}
        for shard in shards:
            items.update(shard["items"])
            scores.update(shard["scores"])
            labels.update(shard["labels"])
        low = min(shard["range"][0] for shard in shards)
        high = max(shard["range"][1] for shard in shards)
        chosen = {i: "watchlist" for i in self.watchlist if i in items}
        if self.worst:
            chosen |= {
                i: why for i, why in worst_errors(scores, labels, self.worst).items() if i not in chosen and i in items
            }
        metrics = next((cb for cb in trainer.callbacks if isinstance(cb, AnomalyMetrics)), None)
        scale, decisions = self._decisions(pl_module, metrics, low, high)
        run_dir = Path(trainer.default_root_dir)
        table_rows = self._write_pictures(trainer, items, chosen, scale, decisions, run_dir)
        curves = metrics.curves if metrics is not None else {}
        if curves:
            write_text_atomically(output_path(run_dir, "curves.json"), json.dumps({"image": curves}))
        self._log_to_wandb(trainer, table_rows, scale, curves)

    def _decisions(
        self, pl_module: LightningModule, metrics: AnomalyMetrics | None, low: float, high: float
    ) -> tuple[ColourScale, Decisions]:
        """The colour scale, and the thresholds that give predicted labels and masks with where they come from."""
        thresholds = getattr(pl_module, "thresholds", None)
        decisions = Decisions()
        if thresholds is not None and (thresholds.has_image or thresholds.has_pixel):
            decisions = Decisions(
                image=fitted_threshold(thresholds, "image"),
                pixel=fitted_threshold(thresholds, "pixel"),
                source=f"calibrated thresholds ({thresholds.source or 'set by hand'})",
            )
        elif metrics is not None and metrics.f1_thresholds:
            decisions = Decisions(
                image=finite_or_none(metrics.f1_thresholds.get("image")),
                pixel=finite_or_none(metrics.f1_thresholds.get("pixel")),
                source="F1-max thresholds of this test set (oracle)",
            )
        calibrated = thresholds_scale(thresholds) if thresholds is not None and self.color_scale == "auto" else None
        return calibrated or run_scale(low, high, decisions.pixel), decisions

    def _write_pictures(
        self, trainer: Trainer, items: dict[int, dict[str, Any]], chosen: dict[int, str], scale: ColourScale,
        decisions: Decisions, run_dir: Path,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """PNGs and ``heatmaps.json`` of the chosen images, the same pictures to every logger; returns the W&B
        table rows (the chosen images, or every image for ``table: all``)."""
        target_dir = output_path(run_dir, "heatmaps")  # staged while the fsad command runs
        out_dir = fresh_directory(target_dir.with_name("heatmaps.partial"))  # this run's pictures only
        samples = getattr(trainer.datamodule, "test_samples", None) or []
        names, pictures, captions, records, table_rows = [], [], [], [], []
        self.written = []
        rows = sorted(items) if self.table == "all" else sorted(chosen)
        for index in rows:
            item = items[index]
            try:
                image = load_rgb(item["path"])
            except DataError as err:
                warnings.warn(f"heatmap skipped: {err}", UserWarning, stacklevel=2)
                continue
            defect = samples[index].defect if index < len(samples) else Path(item["path"]).parent.name
            predicted_label = None if decisions.image is None else int(item["score"] >= decisions.image)
            predicted_mask = None if decisions.pixel is None else (item["map"] >= decisions.pixel).astype(np.uint8)
            caption = ReviewCaption(item["score"], item["label"], predicted_label, defect, decisions.source)
            table_rows.append({"image": image, "item": item, "caption": caption, "predicted_mask": predicted_mask})
            if index not in chosen:
                continue
            picture = render_review(image, item["map"], scale, caption, item["mask"], predicted_mask)
            name = f"{defect}/{Path(item['path']).stem}"
            if any(r["file"] == f"{name}.png" for r in records):  # two images of one defect type share a stem
                name = f"{name}_{index}"
            write_png(out_dir / f"{name}.png", picture)
            self.written.append(run_dir / "heatmaps" / f"{name}.png")
            names.append(name)
            pictures.append(picture)
            captions.append(caption.text())
            records.append({
                "file": f"{name}.png", "index": index, "image_path": str(item["path"]), "score": item["score"],
                "gt_label": item["label"], "pred_label": predicted_label, "defect_type": defect,
                "chosen_as": chosen[index],
            })  # fmt: skip
        index_file = {"scale": scale.describe(), "decisions": decisions.source, "images": records}
        write_text_atomically(out_dir / "heatmaps.json", json.dumps(index_file, indent=1))
        replace_directory(out_dir, target_dir)
        send_to_loggers(trainer, self.wandb_key, names, pictures, captions)
        return table_rows if self.table != "none" else []

    def _log_to_wandb(self, trainer: Trainer, table_rows: list[dict[str, Any]], scale: ColourScale,
                      curves: dict[str, list[float]]) -> None:  # fmt: skip
        """The ``predictions`` table and the ROC/PR curves, to every W&B logger."""
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                logger.experiment.log(wandb_payload(table_rows, scale, curves))
            except Exception as err:  # W&B offline, disabled or unreachable must never end the run
                warnings.warn(f"could not log the predictions table to W&B ({type(err).__name__}: {err})",
                              UserWarning, stacklevel=2)  # fmt: skip


@dataclass(frozen=True)
class Decisions:
    """Raw thresholds that decide the predicted label and mask (``None``: no decision) and their origin."""

    image: float | None = None
    pixel: float | None = None
    source: str = "no thresholds"


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def wandb_payload(
    table_rows: list[dict[str, Any]], scale: ColourScale, curves: dict[str, list[float]]
) -> dict[str, Any]:
    """The W&B objects: the ``predictions`` table (image with ground-truth and predicted masks to toggle, heatmap,
    score, labels, defect type) and line plots of the ROC and PR curves' exact points."""
    import wandb

    payload: dict[str, Any] = {}
    if table_rows:
        columns = ["image", "heatmap", "score", "gt_label", "defect_type", "pred_label"]
        table = wandb.Table(columns=columns)
        class_labels = {1: "defect"}
        for row in table_rows:
            item, caption = row["item"], row["caption"]
            height, width = item["map"].shape
            picture = cv2.resize(row["image"], (width, height), interpolation=cv2.INTER_AREA)
            masks = {"ground_truth": {"mask_data": item["mask"].astype(np.uint8), "class_labels": class_labels}}
            if row["predicted_mask"] is not None:
                masks["prediction"] = {"mask_data": row["predicted_mask"], "class_labels": class_labels}
            heat = colour_map(scale.scaled(item["map"]))
            table.add_data(
                wandb.Image(picture, masks=masks), wandb.Image(heat), caption.score, caption.ground_truth,
                caption.defect_type, caption.predicted,
            )  # fmt: skip
        payload["predictions"] = table
    if curves:
        roc = wandb.Table(
            columns=["fpr", "tpr"], data=[list(p) for p in zip(curves["fpr"], curves["tpr"], strict=True)]
        )
        pr = wandb.Table(
            columns=["recall", "precision"],
            data=[list(p) for p in zip(curves["recall"], curves["precision"], strict=True)],
        )
        payload["image_roc_curve"] = wandb.plot.line(roc, "fpr", "tpr", title="Image ROC (exact, as image_AUROC)")
        payload["image_pr_curve"] = wandb.plot.line(pr, "recall", "precision", title="Image PR (exact, as image_AP)")
    return payload
