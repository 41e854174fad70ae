"""The authors' evaluation protocol, for comparing with their tables only: it selects with test labels.

PromptAD and FineGrainedAD evaluate the test set after every training epoch and report the best epoch per category
(methods.md §4, "Reporting hazards"). :class:`BestEpochOnTest` reproduces that during ``fit`` and writes every
epoch's numbers plus the best to ``<run_dir>/paper_best_epoch.json``; :class:`PaperMaxFusion` logs their
``max(AUROC(harmonic), AUROC(mean))`` image score; :class:`PaperTestSetMinMax` logs APRIL-GAN's few-shot image score,
normalised over the whole test set. Honest results come from ``fsad test``.
:func:`paper_protocol_callbacks` gives the callbacks a module's ``protocol`` asks for; the fsad CLI adds them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from fsad.batch import Batch
from fsad.callbacks.metrics import broadcast_from_rank_zero, exact_auroc, gather_to_rank_zero


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


class PaperMaxFusion(Callback):
    """The authors' image AUROC: ``max(AUROC(harmonic), AUROC(mean))`` over the two fusions of the visual and
    textual image scores, which picks the fusion with test labels; logged as ``image_AUROC_paper_max_fusion``.

    Reads ``pl_module.model.last_image_parts`` ([B,2]: max M_v, textual score) after each test batch, which the model
    keeps while this callback sets its ``record_image_parts`` (the test loop only); exact under DDP (every rank's
    samples are gathered by dataset index, padding duplicates dropped).
    """

    metric = "image_AUROC_paper_max_fusion"

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.parts: dict[int, tuple[int, float, float]] = {}
        pl_module.model.record_image_parts = True

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.model.record_image_parts = False

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        parts = pl_module.model.last_image_parts
        if parts is None:  # nothing to fuse in this mode (APRIL-GAN zero-shot)
            return
        parts = parts.cpu()
        for row, index in enumerate(outputs.index.tolist()):
            self.parts[index] = (int(outputs.gt_label[row]), float(parts[row, 0]), float(parts[row, 1]))

    @staticmethod
    def paper_auroc(labels: np.ndarray, visual: np.ndarray, text: np.ndarray) -> float:
        harmonic = 1.0 / (1.0 / np.clip(visual, 1e-12, None) + 1.0 / np.clip(text, 1e-12, None))
        return max(exact_auroc(harmonic, labels), exact_auroc((visual + text) / 2, labels))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.parts:  # no batch gave parts (APRIL-GAN zero-shot), on every rank alike
            return
        shards = gather_to_rank_zero(self.parts)
        value = None
        if shards is not None:
            merged = {k: v for shard in shards for k, v in shard.items()}
            labels, visual, text = (np.array(column, dtype=np.float64) for column in zip(*merged.values(), strict=True))
            value = self.paper_auroc(labels, visual, text)
        pl_module.log(self.metric, broadcast_from_rank_zero(value), sync_dist=False)


class PaperTestSetMinMax(PaperMaxFusion):
    """APRIL-GAN's few-shot image AUROC as the authors compute it: ``½(s + norm(max M))``, the map maxima min-max
    normalised over the whole test set of the category (a score no single image has); logged as
    ``image_AUROC_paper_test_minmax``. Reads ``last_image_parts`` ([B,2]: max M, text probability s) as its parent.
    """

    metric = "image_AUROC_paper_test_minmax"

    @staticmethod
    def paper_auroc(labels: np.ndarray, visual: np.ndarray, text: np.ndarray) -> float:
        spread = visual.max() - visual.min()
        normalised = (visual - visual.min()) / spread if spread > 0 else np.zeros_like(visual)
        return exact_auroc(0.5 * (text + normalised), labels)


def paper_protocol_callbacks(module: LightningModule) -> list[Callback]:
    """The callbacks ``protocol: paper`` (or its two switches) asks of a PromptAD/FineGrainedAD module, and
    APRIL-GAN's ``paper_image_score``; none for other modules. Add them to a Trainer built by hand; ``fsad fit|test`` adds them itself."""
    callbacks: list[Callback] = []
    if getattr(module, "best_epoch_on_test", False):
        callbacks.append(BestEpochOnTest())
    if getattr(module, "max_fusion_quirk", False):
        callbacks.append(PaperMaxFusion())
    if getattr(module, "paper_image_score", False):
        callbacks.append(PaperTestSetMinMax())
    return callbacks
