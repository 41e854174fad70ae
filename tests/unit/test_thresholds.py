"""Decision thresholds, normalisation, calibration by F1, memory banks in the state dict, and the small API fixes
(dict backbones, size errors naming both fields, SyntheticDataModule without ``root``)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve
from torch import nn

from fsad.batch import Batch
from fsad.calibration import fit_thresholds
from fsad.lightning_modules.components.memory_bank import MemoryBank
from fsad.lightning_modules.components.thresholds import DecisionThresholds

TINY = {"arch": "fsad-tiny", "pretrained": None, "taps": [2, 4]}


def fitted(**values: float) -> DecisionThresholds:
    thresholds = DecisionThresholds()
    thresholds.set("labelled", **values)
    return thresholds


def test_normalisation_matches_the_min_max_formula_by_hand() -> None:
    thresholds = fitted(image_threshold=0.4, image_min=0.2, image_max=0.6)
    scores = torch.tensor([0.0, 0.3, 0.4, 0.5, 0.9])
    # (x − 0.4)/0.4 + 0.5, clipped: -0.5→0, 0.25, 0.5, 0.75, 1.75→1
    assert torch.allclose(thresholds.normalised_score(scores), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_sensitivity_moves_the_decision_as_its_normalised_level() -> None:
    thresholds = fitted(image_threshold=0.4, image_min=0.2, image_max=0.6)
    scores = torch.tensor([0.29, 0.31, 0.39, 0.4, 0.49, 0.51])
    assert thresholds.image_label(scores).tolist() == [0, 0, 0, 1, 1, 1]  # 0.5: the fitted threshold itself
    thresholds.set_sensitivity(0.75)  # flag when normalised ≥ 0.25, i.e. raw ≥ 0.4 − 0.25·0.4 = 0.3
    assert thresholds.image_label(scores).tolist() == [0, 1, 1, 1, 1, 1]
    thresholds.set_sensitivity(0.25)  # normalised ≥ 0.75, raw ≥ 0.5
    assert thresholds.image_label(scores).tolist() == [0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="sensitivity"):
        thresholds.set_sensitivity(1.5)


def test_decision_is_exact_at_the_threshold_and_works_without_a_range() -> None:
    threshold = 0.123456789
    below = float(np.nextafter(np.float32(threshold), np.float32(0)))
    thresholds = fitted(image_threshold=threshold, image_min=0.0, image_max=1e-3)
    scores = torch.tensor([below, threshold], dtype=torch.float32)
    assert thresholds.image_label(scores).tolist() == [0, 1]
    alone = DecisionThresholds()
    alone.set("", image_threshold=threshold)  # e.g. PredictionWriter's F1 threshold: no range fitted
    assert alone.image_label(scores).tolist() == [0, 1]
    assert not alone.has_pixel and alone.has_image


def test_thresholds_and_their_source_survive_a_weights_only_checkpoint() -> None:
    thresholds = fitted(image_threshold=0.3, pixel_threshold=0.2, pixel_min=0.0, pixel_max=0.5)
    thresholds.source = "nsa"
    buffer = io.BytesIO()
    torch.save(thresholds.state_dict(), buffer)
    buffer.seek(0)
    restored = DecisionThresholds()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.source == "nsa" and restored.as_dict() == thresholds.as_dict()
    assert math.isnan(float(restored.image_min))


class MapsFromImages(nn.Module):
    """A stand-in model: the first channel is the anomaly map, its maximum the image score."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        self.thresholds = DecisionThresholds()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[:, 0], images[:, 0].flatten(1).amax(dim=1)


def sklearn_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def test_fit_thresholds_picks_the_f1_optimal_thresholds_of_sklearn() -> None:
    rng = np.random.default_rng(0)
    masks = (rng.random((12, 6, 6)) < 0.15).astype(np.uint8)
    masks[:6] = 0
    maps = np.clip(rng.normal(0.3, 0.1, masks.shape) + 0.25 * masks, 0, 1).astype(np.float32)
    labels = masks.reshape(12, -1).max(axis=1)
    batch = Batch(image=torch.from_numpy(maps)[:, None], gt_mask=torch.from_numpy(masks),
                  gt_label=torch.from_numpy(labels.astype(np.int64)), image_path=[""] * 12, mask_path=[None] * 12,
                  category=["x"] * 12, index=torch.arange(12))  # fmt: skip
    model = MapsFromImages()
    values = fit_thresholds(model, [batch], "labelled")
    scores = maps.reshape(12, -1).max(axis=1)
    assert values["image_threshold"] == pytest.approx(sklearn_f1_threshold(scores, labels), abs=0)
    assert values["pixel_threshold"] == pytest.approx(sklearn_f1_threshold(maps.ravel(), masks.ravel()), abs=0)
    assert values["pixel_min"] == maps.min() and values["image_max"] == scores.max()
    assert model.thresholds.source == "labelled" and model.thresholds.has_pixel


def test_memory_banks_travel_in_the_state_dict() -> None:
    bank = MemoryBank()
    bank.fit({2: torch.randn(2, 9, 8), 4: torch.randn(18, 8)})
    query = {2: torch.randn(1, 9, 8), 4: torch.randn(1, 9, 8)}
    restored = MemoryBank()
    restored.load_state_dict(bank.state_dict())
    assert restored.taps == [2, 4] and torch.equal(restored(query), bank(query))
    restored.load_state_dict(MemoryBank().state_dict())  # a support-free checkpoint leaves it unfitted
    assert not restored.is_fitted


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_dict_backbone_and_size_errors_name_both_fields() -> None:
    from fsad.lightning_modules.base import SizeMismatchError
    from fsad.lightning_modules.membank.module import MemoryBankAD

    module = MemoryBankAD(backbone=TINY, image_size=96, eval_size=128)
    assert module.backbone.spec.taps == [2, 4]
    with pytest.raises(
        SizeMismatchError, match=r"data\.image_size.*model\.image_size|model\.image_size.*data\.image_size"
    ):
        module(torch.zeros(1, 3, 64, 64))
    module.fit_support(module.backbone(torch.zeros(1, 3, 96, 96)))
    batch = Batch(image=torch.zeros(1, 3, 96, 96), gt_mask=torch.zeros(1, 64, 64, dtype=torch.uint8),
                  gt_label=torch.zeros(1, dtype=torch.int64), image_path=[""], mask_path=[None], category=["x"],
                  index=torch.zeros(1, dtype=torch.int64))  # fmt: skip
    with pytest.raises(SizeMismatchError, match=r"model\.eval_size is 128.*data\.eval_size"):
        module.predict_batch(batch)
    with pytest.raises(ValueError, match="unknown field"):
        MemoryBankAD(backbone={"arch": "fsad-tiny", "layers": 3}, image_size=96)


def test_synthetic_datamodule_needs_no_root() -> None:
    from fsad.datamodules.synthetic import SyntheticDataModule, default_synthetic_root

    data = SyntheticDataModule(category="disc")
    assert data.root == default_synthetic_root()


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_every_method_accepts_a_dict_backbone() -> None:
    from fsad.lightning_modules.components.clip import BackboneSpec
    from fsad.lightning_modules.finegrainedad.module import FineGrainedAD
    from fsad.lightning_modules.kagprompt.module import KAGPrompt
    from fsad.lightning_modules.promptad.module import PromptAD

    for method, backbone in [(PromptAD, TINY), (FineGrainedAD, TINY),
                             (KAGPrompt, {**TINY, "taps": [1, 2, 3, 4], "vv_attention": False})]:  # fmt: skip
        module = method(backbone=backbone, image_size=96)
        assert module.backbone.spec == BackboneSpec(**backbone), method.__name__


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_checkpoints_from_before_the_thresholds_component_still_load() -> None:
    from fsad.lightning_modules.membank.module import MemoryBankAD

    module = MemoryBankAD(backbone=TINY, image_size=96)
    state = {
        key: value for key, value in module.state_dict().items() if not key.startswith(("thresholds.", "backbone."))
    }
    checkpoint = {"state_dict": {**state, "image_threshold": torch.tensor(0.25)}}  # the old bare buffer
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict
    assert float(module.image_threshold) == 0.25 and not module.thresholds.has_pixel and module.thresholds.source == ""
