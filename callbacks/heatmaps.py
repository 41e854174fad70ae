"""Heatmaps of a fixed, seeded watchlist of test images: PNGs in the run directory and images in W&B.

Each PNG is ``image | image with ground-truth contour | heatmap overlay``. Under DDP the watchlist items held by other
ranks are gathered to rank 0 first (Lightning's W&B logger is rank-0 only and would drop them).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from fsad.batch import Batch
from fsad.callbacks.metrics import gather_to_rank_zero
from fsad.callbacks.results import fresh_directory, replace_directory
from fsad.datamodules.transforms import DataError, load_rgb

CONTOUR_RGB = (255, 255, 0)


def choose_watchlist(labels: list[int], size: int, seed: int) -> list[int]:
    """A seeded spread of good and defect indices: half of each where possible, sorted."""
    rng = np.random.default_rng(seed)
    good = [i for i, label in enumerate(labels) if label == 0]
    defect = [i for i, label in enumerate(labels) if label != 0]
    n_defect = min(len(defect), max(size - len(good), size // 2))
    n_good = min(len(good), size - n_defect)
    picks = list(rng.choice(good, n_good, replace=False)) + list(rng.choice(defect, n_defect, replace=False))
    return sorted(int(i) for i in picks)


def render_heatmap(
    image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0),
    alpha: float = 0.5,
) -> np.ndarray:
    """Three panels side by side at the map's size: the image, its ground-truth contour, the colour-mapped map.

    ``value_range`` maps to the ends of the JET colour scale (blue = low, red = high).
    """
    height, width = anomaly_map.shape
    picture = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    contour = picture.copy()
    outlines, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(contour, outlines, -1, CONTOUR_RGB, thickness=1)
    low, high = value_range
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(picture, 1 - alpha, cv2.cvtColor(colours, cv2.COLOR_BGR2RGB), alpha, 0)
    gap = np.full((height, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([picture, gap, contour, gap, overlay], axis=1)


class HeatmapLogger(Callback):
    """Renders the watchlist at the end of each test epoch.

    Args:
        num_images: watchlist size (a spread of good and defect images).
        seed: seed of the watchlist draw.
        wandb_key: the W&B media key.
        color_scale: ``watchlist`` spans the colours over the min..max of all watchlist maps (comparable across
            images, with contrast); ``fixed`` uses the absolute [0,1] score range.
    """

    def __init__(
        self, num_images: int = 16, seed: int = 0, wandb_key: str = "heatmaps",
        color_scale: Literal["watchlist", "fixed"] = "watchlist",
    ) -> None:  # fmt: skip
        if color_scale not in ("watchlist", "fixed"):
            raise ValueError(f"HeatmapLogger.color_scale must be 'watchlist' or 'fixed', got {color_scale!r}")
        self.color_scale = color_scale
        self.num_images = num_images
        self.seed = seed
        self.wandb_key = wandb_key
        self.watchlist: list[int] = []
        self._items: dict[int, dict[str, Any]] = {}
        self.written: list[Path] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._items = {}
        samples = getattr(trainer.datamodule, "test_samples", None) if trainer.datamodule is not None else None
        if samples:
            self.watchlist = choose_watchlist([s.label for s in samples], self.num_images, self.seed)
        else:
            self.watchlist = list(range(self.num_images))

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        result = outputs if isinstance(outputs, Batch) else batch
        wanted = set(self.watchlist)
        for row, index in enumerate(result.index.tolist()):
            if index in wanted and index not in self._items:
                self._items[index] = {
                    "path": result.image_path[row],
                    "map": result.anomaly_map[row].detach().float().cpu().numpy(),
                    "mask": result.gt_mask[row].detach().cpu().numpy(),
                    "score": float(result.pred_score[row]),
                    "label": int(result.gt_label[row]),
                }

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shards = gather_to_rank_zero(self._items)
        if shards is None:
            return
        items: dict[int, dict[str, Any]] = {}
        for shard in shards:
            items.update(shard)
        target_dir = Path(trainer.default_root_dir) / "heatmaps"
        out_dir = fresh_directory(target_dir.with_name("heatmaps.partial"))  # this run's maps only
        panels, captions = [], []
        self.written = []
        value_range = (0.0, 1.0)
        if self.color_scale == "watchlist" and items:
            value_range = (min(float(i["map"].min()) for i in items.values()),
                           max(float(i["map"].max()) for i in items.values()))
        for index in sorted(items):
            item = items[index]
            try:
                image = load_rgb(item["path"])
            except DataError as err:
                warnings.warn(f"heatmap skipped: {err}", UserWarning, stacklevel=2)
                continue
            panel = render_heatmap(image, item["map"], item["mask"], value_range)
            name = f"{index:05d}_{Path(item['path']).stem}.png"
            cv2.imwrite(str(out_dir / name), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
            self.written.append(target_dir / name)
            panels.append(panel)
            captions.append(f"{Path(item['path']).name} label={item['label']} score={item['score']:.4f}")
        replace_directory(out_dir, target_dir)
        self._log_to_wandb(trainer, panels, captions)

    def _log_to_wandb(self, trainer: Trainer, panels: list[np.ndarray], captions: list[str]) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger) or not panels:
                continue
            try:
                logger.log_image(key=self.wandb_key, images=panels, caption=captions)
            except Exception as err:  # W&B offline, disabled or unreachable must never end the run
                warnings.warn(f"could not log heatmaps to W&B ({type(err).__name__}: {err})", UserWarning, stacklevel=2)
