"""Raw scores reach the metrics unchanged: a method whose maps and scores run below 0 and above 1 gets the AUROC that
scikit-learn computes on its raw values, through the real test loop and the real metrics callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from sklearn.metrics import roc_auc_score

from fsad.callbacks.heatmaps import HeatmapLogger
from fsad.callbacks.metrics import AnomalyMetrics
from fsad.callbacks.predictions import PredictionWriter
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec
from fsad.lightning_modules.membank.module import MemoryBankAD

pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
EVAL_SIZE = 32


class WideRangeMemoryBank(MemoryBankAD):
    """The memory bank with its maps stretched to about [−2, 3] and its image scores made noisy and wide (so that
    the image AUROC is below 1 and a clamp would tie scores of both classes); records what :meth:`score` returned."""

    def __init__(self) -> None:
        super().__init__(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), 96, EVAL_SIZE, 0.0)
        self.raw: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = super().score(features)
        maps = (maps - maps.mean()) / maps.std() * 1.5 + 0.5
        noise = torch.randn(scores.shape, generator=torch.Generator().manual_seed(0))  # the same on every call
        scores = (scores - scores.mean()) / scores.std().clamp_min(1e-12) * 1.5 + 0.5 + 2.0 * noise
        return maps, scores

    def test_step(self, batch, batch_idx: int):  # noqa: ANN001, ANN201
        features = self.encode_images(batch)
        maps, scores = self.score(features)
        self.raw.append((maps.detach(), scores.detach(), batch.gt_mask.clone(), batch.gt_label.clone()))
        return super().test_step(batch, batch_idx)


def test_negative_and_above_one_scores_reach_the_metrics_raw(tmp_path: Path) -> None:
    seed_everything(0)
    data = SyntheticDataModule(
        root=str(tmp_path / "syn"), category="disc", image_size=96, eval_size=EVAL_SIZE, batch_size=64
    )
    module = WideRangeMemoryBank()
    metrics = AnomalyMetrics(f1=False)
    binned = AnomalyMetrics(pixel_mode="histogram", f1=False, histogram_range=(-20.0, 20.0))
    heatmaps = HeatmapLogger(num_images=2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[metrics, binned, heatmaps])  # fmt: skip
    trainer.test(module, datamodule=data, verbose=False)
    grid_maps = torch.cat([r[0] for r in module.raw])
    scores = torch.cat([r[1] for r in module.raw]).numpy()
    masks = torch.cat([r[2] for r in module.raw]).numpy()
    labels = torch.cat([r[3] for r in module.raw]).numpy()
    # the reference: bilinear upsampling (align_corners=False) of the raw grid maps, σ = 0, nothing else
    maps = F.interpolate(grid_maps[:, None].float(), size=EVAL_SIZE, mode="bilinear", align_corners=False)[:, 0]
    maps = maps.numpy()
    assert scores.min() < 0 < 1 < scores.max() and maps.min() < 0 < 1 < maps.max()  # the case this test is about
    assert (maps < 0).mean() > 0.1 and (maps > 1).mean() > 0.1
    pixels, pixel_labels = maps.reshape(-1), masks.reshape(-1) > 0
    assert roc_auc_score(labels, scores.clip(0, 1)) != roc_auc_score(labels, scores)  # a clamp would show
    assert roc_auc_score(pixel_labels, pixels.clip(0, 1)) != roc_auc_score(pixel_labels, pixels)
    assert metrics.results["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    pixel_reference = roc_auc_score(pixel_labels, pixels)
    assert metrics.results["pixel_AUROC"] == pytest.approx(pixel_reference, abs=1e-6)
    assert binned.results["pixel_AUROC_hist"] == pytest.approx(pixel_reference, abs=1e-3)
    assert len(list((tmp_path / "heatmaps").glob("*/*.png"))) == 2  # the display path takes raw maps too


def test_predictions_keep_raw_maps_and_scores(tmp_path: Path) -> None:
    seed_everything(0)
    data = SyntheticDataModule(root=str(tmp_path / "syn"), category="disc", image_size=96, eval_size=EVAL_SIZE)
    writer = PredictionWriter(map_format="npy", map_size="eval")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"),
                      callbacks=[writer])  # fmt: skip
    trainer.predict(WideRangeMemoryBank(), datamodule=data)
    maps = [np.load(path) for path in (tmp_path / "run" / "predictions").rglob("*_map.npy")]
    assert maps and min(m.min() for m in maps) < 0 < 1 < max(m.max() for m in maps)  # written as computed
    scores = [float(row["score"]) for row in writer.rows.values()]
    assert min(scores) < 0 < 1 < max(scores)
