"""The authors' evaluation protocol, for comparing with their tables only: it selects with test labels.

PromptAD and FineGrainedAD evaluate the test set after every training epoch and report the best epoch per category
(methods.md §4, "Reporting hazards"). :class:`BestEpochOnTest` reproduces that during ``fit`` and writes every
epoch's numbers plus the best to ``<run_dir>/paper_best_epoch.json``. Honest results come from ``fsad test``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from fsad.callbacks.metrics import exact_auroc


class BestEpochOnTest(Callback):
    """After each training epoch, image and pixel AUROC on the test set; the best epoch is picked by their sum."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        warnings.warn(
            "paper protocol: picking the best epoch on the test set uses test labels for model selection; "
            "report `fsad test` numbers as the honest result",
            UserWarning,
            stacklevel=2,
        )
        self.history = []

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        pl_module.model.cache_text(pl_module.backbone)
        pl_module.prepare_support()
        scores, labels, maps, masks = [], [], [], []
        for batch in trainer.datamodule.test_dataloader():
            batch.image = batch.image.to(pl_module.device)
            result = pl_module.predict_batch(batch)
            scores.append(result.pred_score.cpu())
            labels.append(result.gt_label)
            maps.append(result.anomaly_map.cpu())
            masks.append(result.gt_mask)
        self.history.append({
            "epoch": trainer.current_epoch,
            "image_AUROC": exact_auroc(torch.cat(scores).numpy(), torch.cat(labels).numpy()),
            "pixel_AUROC": exact_auroc(torch.cat(maps).numpy(), torch.cat(masks).numpy()),
        })  # fmt: skip
        pl_module.train(was_training)

    @property
    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda h: np.nansum([h["image_AUROC"], h["pixel_AUROC"]]))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "paper_best_epoch.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"best": self.best, "epochs": self.history}, indent=1))
        print(f"paper protocol: best epoch on the test set {self.best} (all epochs in {path})")
