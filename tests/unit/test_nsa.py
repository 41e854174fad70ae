"""NSA as KAG-prompt's authors train with it: the logistic intensity label, object masks, the auxiliary dataset."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from fsad.datamodules.auxiliary import EpochSampler, NSADataset, load_resized
from fsad.datamodules.base import Sample
from fsad.datamodules.synthesis import (
    LABEL_THRESHOLD,
    NSA_PARAMETERS,
    NSAParameters,
    logistic_label,
    nsa_synthesize,
    object_mask,
    parameters_for,
)
from fsad.datamodules.transforms import PairedTransform


def test_label_follows_the_logistic_rule_on_a_known_intensity_ramp() -> None:
    k, x0 = 1 / 6, 15.0
    change = np.zeros((40, 60))
    changed = np.zeros((40, 60), dtype=np.uint8)
    ramp = np.linspace(0.0, 50.0, 40)  # grey-level change rising along x inside the patch
    change[5:35, 10:50] = ramp
    changed[5:35, 10:50] = 1
    label = logistic_label(change, changed, (k, x0))
    # a median over a symmetric disk leaves a linear ramp unchanged away from the patch border (radius 5)
    interior = (slice(10, 30), slice(15, 45))
    expected = 1 / (1 + np.exp(-k * (ramp[5:35] - x0)))
    np.testing.assert_allclose(label[interior], np.broadcast_to(expected, (20, 30)), rtol=1e-6)
    assert not label[~changed.astype(bool)].any()
    # the 0.3 threshold falls where the logistic crosses 0.3: Δ = x0 + ln(0.3/0.7)/k ≈ 9.9 grey levels
    crossing = x0 + np.log(0.3 / 0.7) / k
    assert np.array_equal(label[interior] > LABEL_THRESHOLD, np.broadcast_to(ramp[5:35] > crossing, (20, 30)))


def textured(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def test_synthesis_label_equals_the_rule_recomputed_from_the_output_image() -> None:
    target, source = textured(0), textured(1)
    params = NSAParameters(((0.1, 0.3), (0.1, 0.3)), (1 / 6, 15), None, (0.7, 1.3))
    image, label = nsa_synthesize(target, source, np.random.default_rng(3), params)
    change = np.abs(target.astype(np.float64) - image.astype(np.float64)).mean(axis=2)
    changed = cv2.medianBlur((change > 1).astype(np.uint8), 5)
    yy, xx = np.mgrid[-5:6, -5:6]
    smoothed = ndimage.median_filter(change * changed, footprint=xx**2 + yy**2 <= 25, mode="nearest")
    expected = changed / (1 + np.exp(-(1 / 6) * (smoothed - 15)))
    assert changed.any()
    np.testing.assert_allclose(label, expected, atol=1e-5)
    again, again_label = nsa_synthesize(target, source, np.random.default_rng(3), params)
    assert np.array_equal(image, again) and np.array_equal(label, again_label)
    other, _ = nsa_synthesize(target, source, np.random.default_rng(4), params)
    assert not np.array_equal(image, other)


def test_object_mask_is_the_background_threshold_rule() -> None:
    image = np.full((40, 40, 3), 220, dtype=np.uint8)  # bright background
    image[10:30, 10:30] = (100, 150, 110)  # object: grey mean 120, |120 − 200| = 80 > 60
    image[0:8, 30:40] = (170, 160, 150)  # grey 160, |160 − 200| = 40 ≤ 60: background
    mask = object_mask(image, (200, 60))
    assert mask[11:29, 11:29].all()  # the 7×7 median against grain only rounds the square's corners
    outside = np.ones((40, 40), dtype=bool)
    outside[10:30, 10:30] = False
    assert not mask[outside].any()
    image[10:30, 10:30] = (150, 150, 141)  # grey 147: |147 − 200| = 53 ≤ 60, now background
    assert not object_mask(image, (200, 60)).any()
    assert object_mask(image, None).all()


def test_parameter_table_lookup() -> None:
    assert parameters_for("metal nut") is NSA_PARAMETERS["metal_nut"]
    assert parameters_for("candle") == NSAParameters()  # a VisA category: the authors' one VisA setting
    assert NSA_PARAMETERS["bottle"].logistic == (1 / 12, 24) and NSA_PARAMETERS["bottle"].background == (200, 60)


@pytest.fixture
def bottle_samples(mvtec_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Sample]:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    paths = sorted((mvtec_root / "bottle/train/good").glob("*.png"))[:3]
    return [Sample(image_path=str(p), label=0, category="bottle") for p in paths]


def test_dataset_gives_a_fresh_reproducible_anomaly_per_epoch(bottle_samples: list[Sample]) -> None:
    transform = PairedTransform(96, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dataset = NSADataset(bottle_samples, transform, seed=0, image_size=96)
    assert len(dataset) == 6
    normal = dataset[(0, 0)]
    assert normal["gt_label"] == 0 and not normal["gt_mask"].any()
    first, repeat, next_epoch = dataset[(0, 1)], dataset[(0, 1)], dataset[(1, 1)]
    assert first["gt_label"] == 1
    assert torch.equal(torch.as_tensor(first["image"]), torch.as_tensor(repeat["image"]))
    assert not torch.equal(torch.as_tensor(first["image"]), torch.as_tensor(next_epoch["image"]))
    assert not torch.equal(torch.as_tensor(first["image"]), torch.as_tensor(normal["image"]))
    cached = load_resized(bottle_samples[0].image_path, 96)  # second read comes from the disk cache
    assert cached.shape == (96, 96, 3) and np.array_equal(cached, load_resized(bottle_samples[0].image_path, 96))
    without = NSADataset(bottle_samples, transform, seed=0, image_size=96, synthesis=False)
    assert len(without) == 3 and all(without[i]["gt_label"] == 0 for i in range(3))


def test_epoch_sampler_reshuffles_per_epoch_and_tags_the_epoch() -> None:
    sampler = EpochSampler(10, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(i for _, i in first) == list(range(10)) and [i for _, i in first] != [i for _, i in second]
    sampler.set_epoch(0)
    assert list(sampler) == first
