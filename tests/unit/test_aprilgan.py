"""APRIL-GAN pieces checked against hand-computed values: the smoothed focal loss, the zero-shot switch, and the
test-split training data (real masks) the cross-dataset protocol trains on."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fsad.datamodules.auxiliary import AuxiliaryDataModule, MosaicDataset
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.datamodules.transforms import PairedTransform, load_mask, load_rgb
from fsad.lightning_modules.aprilgan.model import smoothed_focal_loss
from fsad.lightning_modules.aprilgan.module import AprilGan

pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
TINY = {"arch": "fsad-tiny", "pretrained": None, "taps": [1, 2, 3, 4], "vv_attention": False}


def test_smoothed_focal_loss_by_hand() -> None:
    """Two pixels, p(anomalous) = 0.8 (target 1) and 0.3 (target 0); onehot clamped to [1e-5, 1 − 1e-5]:
    p_t = (1 − s)·p_true + s·p_other + s, loss = −(1 − p_t)² log p_t, averaged."""
    anomalous = torch.tensor([0.8, 0.3])
    probabilities = torch.stack([1 - anomalous, anomalous]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    s = 1e-5
    expected = 0.0
    for p_true in (0.8, 0.7):
        p_t = (1 - s) * p_true + s * (1 - p_true) + s
        expected += -((1 - p_t) ** 2) * math.log(p_t) / 2
    assert smoothed_focal_loss(probabilities, target).item() == pytest.approx(expected, rel=1e-6)


def test_k_shot_zero_leaves_the_model_zero_shot() -> None:
    module = AprilGan(backbone=TINY, image_size=96, eval_size=64)
    images = torch.randn(2, 3, 96, 96)
    module.fit_support(module.backbone(images))
    assert module.model.memory.is_fitted
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(k_shot=0))
    module.prepare_support()
    assert not module.model.memory.is_fitted


def test_test_split_training_data_has_the_real_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path))
    data = AuxiliaryDataModule(dataset="synthetic", split="test", categories=["tile"], image_size=96, eval_size=64,
                               batch_size=64)  # fmt: skip
    batches = list(data.train_dataloader())
    expected = SyntheticDataModule(category="tile", k_shot=1).collect_samples("test")
    paths = [p for b in batches for p in b.image_path]
    assert sorted(paths) == sorted(s.image_path for s in expected) and paths != [s.image_path for s in expected]
    labels = torch.cat([b.gt_label for b in batches])
    masks = torch.cat([b.gt_mask for b in batches]).flatten(1)
    assert set(labels.tolist()) == {0, 1}
    assert bool((masks[labels == 1].amax(dim=1) > 0).all()) and not masks[labels == 0].any()
    with pytest.raises(ValueError, match="data.split"):
        AuxiliaryDataModule(dataset="synthetic", split="val")
    with pytest.raises(ValueError, match="data.mosaic_rate"):
        AuxiliaryDataModule(dataset="synthetic", split="train", mosaic_rate=0.2)


def test_mosaic_tiles_four_test_images_of_the_category_with_their_own_masks() -> None:
    samples = SyntheticDataModule(category="tile", k_shot=1).collect_samples("test")
    transform = PairedTransform(96, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dataset = MosaicDataset(samples, transform, seed=0, rate=1.0)
    image, mask = dataset.mosaic("tile", np.random.default_rng(3))
    files = {s.image_path: (load_rgb(s.image_path), load_mask(s.mask_path) if s.mask_path else None) for s in samples}
    height, width = image.shape[0] // 2, image.shape[1] // 2
    for top in (0, height):
        for left in (0, width):
            tile, tile_mask = (
                image[top : top + height, left : left + width],
                mask[top : top + height, left : left + width],
            )
            matches = [m for picture, m in files.values() if np.array_equal(picture, tile)]
            assert matches, "every tile is one of the category's test images"
            expected = matches[0] if matches[0] is not None else np.zeros_like(tile_mask)
            assert np.array_equal(tile_mask > 0, expected > 0)
    item, again = dataset[(0, 5)], dataset[(0, 5)]
    assert torch.equal(item["image"], again["image"]) and not torch.equal(item["image"], dataset[(1, 5)]["image"])
    assert item["gt_label"] == int(item["gt_mask"].any())
    assert all(dataset[(0, i)]["image"].shape == (3, 96, 96) for i in range(3))
    plain = MosaicDataset(samples, transform, seed=0, rate=0.0)
    assert torch.equal(plain[(4, 2)]["gt_mask"], plain.items[2]["gt_mask"])  # rate 0: the test image itself
