"""The review picture (outlines, colour bar, raw-range scales) and the exact ROC/PR curves behind the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from fsad.callbacks.metrics import _split_sorted, curves_from_sorted
from fsad.callbacks.predictions import overlay_scale
from fsad.callbacks.visualiser import (
    COLOUR_BAR_WIDTH,
    GROUND_TRUTH_RGB,
    PREDICTED_RGB,
    ReviewCaption,
    calibrated_scale,
    colour_bar,
    overlay_region,
    render_review,
    run_scale,
)
from fsad.lightning_modules.components.thresholds import DecisionThresholds


def test_curves_are_sklearns_and_integrate_to_the_metrics() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1).astype(np.float32)  # rounded: many ties
    curves = curves_from_sorted(*_split_sorted(scores, labels))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curves["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(curves["tpr"], tpr, atol=1e-12)
    assert np.trapezoid(curves["tpr"], curves["fpr"]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)  # ascending thresholds, (P=1, R=0) appended
    points = {(r, p) for r, p in zip(recall[:-1], precision[:-1], strict=True)}
    ours = list(zip(curves["recall"], curves["precision"], strict=True))
    assert all(any(abs(r - a) < 1e-12 and abs(p - b) < 1e-12 for a, b in points) for r, p in ours)
    ap = sum((r1 - r0) * p for (r0, _), (r1, p) in zip([(0.0, 1.0), *ours[:-1]], ours, strict=True))
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def square_mask(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


def test_outlines_are_drawn_on_the_overlay_at_the_masks_boundaries() -> None:
    size = 64  # enlarged 4× to the 256-pixel display height
    truth, predicted = square_mask(size, 8, 8, 20), square_mask(size, 36, 30, 16)
    anomaly_map = np.random.default_rng(1).random((size, size)).astype(np.float32) * 5 - 2  # raw, any range
    image = np.full((size * 2, size * 2, 3), 90, dtype=np.uint8)
    picture = render_review(image, anomaly_map, run_scale(-2, 3), ReviewCaption(0.5, 1, 1, "scratch"), truth, predicted)
    overlay = overlay_region(picture, (size, size))
    assert overlay.shape[:2] == (256, 256)
    for mask, colour in ((truth, GROUND_TRUTH_RGB), (predicted, PREDICTED_RGB)):
        big = np.kron(mask, np.ones((4, 4), dtype=np.uint8)).astype(bool)
        drawn = np.all(overlay == colour, axis=2)
        distance_to_edge = ndimage.distance_transform_edt(~(big & ~ndimage.binary_erosion(big)))
        assert drawn.sum() > 0.9 * 4 * 4 * (mask.sum() ** 0.5)  # about the square's perimeter, 4+ px wide
        assert distance_to_edge[drawn].max() <= 3  # nowhere but along that mask's outline
    assert picture.shape[0] > 256  # the caption strip under the panels


def test_a_raw_range_is_spread_over_the_whole_colour_map() -> None:
    anomaly_map = np.linspace(-3.0, 7.0, 64 * 64, dtype=np.float32).reshape(64, 64)  # far outside [0,1]
    image = np.zeros((64, 64, 3), dtype=np.uint8)  # black: the overlay is half the colour map
    scale = run_scale(float(anomaly_map.min()), float(anomaly_map.max()))
    overlay = overlay_region(render_review(image, anomaly_map, scale, ReviewCaption(1.0)), (64, 64)).astype(int)
    low, high = overlay[2, 2], overlay[-3, -3]
    assert low[2] > low[0] + 20 and high[0] > high[2] + 20  # blue at the minimum, red at the maximum
    clamped = run_scale(0.0, 1.0)  # the old [0,1] scale would saturate two thirds of this map
    saturated = clamped.scaled(anomaly_map)
    assert (saturated == 1.0).mean() > 0.6 and 0 < scale.scaled(anomaly_map).mean() < 1


def test_the_colour_bar_marks_the_threshold_where_it_lies_on_the_scale() -> None:
    scale = run_scale(-1.0, 3.0, threshold=2.0)  # 3/4 of the way up
    bar = colour_bar(201, scale)
    assert bar.shape == (201, COLOUR_BAR_WIDTH, 3)
    mark = np.all(bar[:, 1] == 0, axis=1)  # the black tick left of the ramp
    assert abs(np.flatnonzero(mark).mean() - 50) <= 1.5  # row (1 − 3/4)·200
    assert not np.all(colour_bar(201, run_scale(-1.0, 3.0))[:, 1] == 0, axis=1).any()  # no threshold, no mark


def test_scales_follow_the_thresholds_or_the_data() -> None:
    maps = torch.tensor([[[0.001, 0.064]]])  # a real map's range: it peaks far below 1
    thresholds = DecisionThresholds()
    batch = overlay_scale(thresholds, maps)
    assert (batch.low, batch.high, batch.threshold) == pytest.approx((0.001, 0.064, None))
    thresholds.set("labelled", image_threshold=0.03, pixel_threshold=0.02, pixel_min=0.0, pixel_max=0.08)
    fixed = overlay_scale(thresholds, maps)  # normalisation n(x) = (x − t)/(max − min) + ½ over [0, 1]
    assert (fixed.low, fixed.high, fixed.threshold) == pytest.approx((0.02 - 0.04, 0.02 + 0.04, 0.02))
    assert fixed.scaled(np.float64(0.02)) == pytest.approx(0.5)
    thresholds.set_sensitivity(0.75)  # the effective threshold moves by (½ − s)(max − min) = −0.02
    assert overlay_scale(thresholds, maps).threshold == pytest.approx(0.0)
    assert calibrated_scale(1.0, 0.0, 4.0).threshold == 1.0
    assert run_scale(0.2, 0.4, threshold=0.9).high == 0.9  # widened so the mark stays on the bar
    assert math.isfinite(run_scale(0.5, 0.5).high)


def test_the_caption_carries_score_labels_and_defect_type() -> None:
    text = ReviewCaption(0.0412, 1, 0, "broken_large", "calibrated thresholds (labelled)").text()
    for part in ("score 0.0412", "gt: anomalous", "pred: normal", "defect type: broken_large", "calibrated"):
        assert part in text
    assert "pred: ?" in ReviewCaption(0.1).text()
