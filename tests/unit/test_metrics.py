"""Metric functions against sklearn and a straightforward AUPRO reference."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fsad.callbacks.metrics import (
    aupro,
    average_precision,
    binary_metrics,
    exact_auroc,
    f1_max,
    f1_max_threshold,
    histogram_auroc,
    histogram_counts,
    pixel_metrics,
)


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_f1_equal_sklearn(ties: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.random(4000).astype(np.float32)
    if ties:
        scores = np.round(scores * 7) / 7  # only 8 distinct values: heavy ties
    labels = rng.random(4000) < 0.2
    assert abs(exact_auroc(scores, labels) - roc_auc_score(labels, scores)) < 1e-9
    assert abs(f1_max(scores, labels) - sklearn_f1_max(scores, labels)) < 1e-9


def test_histogram_auroc_is_exact_when_bins_separate_scores_and_close_otherwise() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.integers(0, 100, 5000) + 0.5) / 100  # 100 distinct values, each in its own bin of 1000
    labels = rng.random(5000) < 0.3
    assert abs(histogram_auroc(*histogram_counts(scores, labels, 1000)) - roc_auc_score(labels, scores)) < 1e-9
    fine = rng.random(20000).astype(np.float32)
    fine_labels = rng.random(20000) < (0.2 + 0.3 * fine)
    approx = histogram_auroc(*histogram_counts(fine, fine_labels, 65536))
    assert abs(approx - roc_auc_score(fine_labels, fine)) < 1e-4


def test_single_class_gives_nan() -> None:
    assert np.isnan(exact_auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, steps: int = 4000) -> float:
    """Threshold sweep on a fine grid, per-region overlap averaged over regions, trapezoid up to the FPR limit."""
    regions = []
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [], []
    for t in np.linspace(maps.max() + 1e-6, maps.min() - 1e-6, steps):
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    fpr_cut = np.r_[fprs[keep], fpr_limit]
    pro_cut = np.r_[pros[keep], np.interp(fpr_limit, fprs, pros)]
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


def test_aupro_matches_reference_on_small_cases() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 24, 24), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[0, 15:20, 15:17] = 1  # two regions in one image
    masks[2, 8:16, 8:16] = 1
    maps = rng.random((3, 24, 24)).astype(np.float32) * 0.7 + 0.3 * masks
    assert abs(aupro(maps, masks) - reference_aupro(maps, masks)) < 2e-3
    perfect = masks.astype(np.float32)
    assert abs(aupro(perfect + 0.01 * rng.random(masks.shape), masks) - 1.0) < 1e-9


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_equals_sklearn_with_and_without_ties(ties: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(5000) < 0.1).astype(np.uint8)
    scores = rng.random(5000).astype(np.float32) * 0.7 + 0.3 * labels
    if ties:
        scores = np.round(scores * 20) / 20  # 21 distinct values, many positive/negative ties
    expected = average_precision_score(labels, scores)
    assert abs(average_precision(scores, labels) - expected) < 1e-9
    assert abs(binary_metrics(scores, labels)["AP"] - expected) < 1e-9


def test_f1_threshold_is_a_positive_score_and_reaches_the_sklearn_maximum() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.random(3000) < 0.2).astype(np.uint8)
    scores = (np.round(rng.random(3000) * 30) / 30 + 0.1 * labels).astype(np.float32)
    best, threshold = f1_max_threshold(scores, labels)
    assert threshold in set(scores[labels == 1].tolist())
    predicted = scores >= threshold
    tp = float((predicted & (labels == 1)).sum())
    assert abs(2 * tp / (predicted.sum() + labels.sum()) - best) < 1e-12  # the threshold really gives that F1
    assert abs(best - sklearn_f1_max(scores, labels)) < 1e-9
    metrics = binary_metrics(scores, labels)
    assert metrics["F1max"] == best and metrics["F1_threshold"] == threshold
    assert abs(metrics["AUROC"] - roc_auc_score(labels, scores)) < 1e-9


def test_average_precision_edge_cases_follow_sklearn() -> None:
    assert average_precision(np.array([0.2, 0.9]), np.array([1, 1])) == 1.0
    assert np.isnan(average_precision(np.array([0.2, 0.9]), np.array([0, 0])))


def exact_reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Brute force over every distinct score: the (FPR, PRO) points, trapezoid, linear cut at the FPR limit."""
    regions = []
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    after = np.argmax(fprs > fpr_limit)
    before = after - 1
    cut_pro = pros[before] + (fpr_limit - fprs[before]) / (fprs[after] - fprs[before]) * (pros[after] - pros[before])
    return float(np.trapezoid(np.r_[pros[keep], cut_pro], np.r_[fprs[keep], fpr_limit]) / fpr_limit)


@pytest.mark.parametrize("levels", [None, 8])
def test_aupro_is_exact_against_a_brute_force_sweep_with_ties(levels: int | None) -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 20, 20), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[0, 12:18, 12:14] = 1
    masks[2, 5:12, 5:12] = 1
    maps = (rng.random((3, 20, 20)) * 0.7 + 0.3 * masks).astype(np.float32)
    if levels:
        maps = np.round(maps * levels) / levels  # ties across normal and defect pixels, a tie group at the cut
    assert abs(aupro(maps, masks) - exact_reference_aupro(maps, masks)) < 1e-9
    assert abs(aupro(maps, masks, chunk=7) - exact_reference_aupro(maps, masks)) < 1e-9


def peak_bytes(function, *args) -> int:
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pixel_metrics_stay_within_six_bytes_per_pixel() -> None:
    """Lean: one float32 copy plus a boolean mask; an argsort of all pixels alone would take 8 bytes each."""
    rng = np.random.default_rng(6)
    maps = rng.random((64, 128, 128), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=np.uint8)
    masks[:, 40:60, 40:70] = 1
    maps += 0.2 * masks
    for metric in (f1_max, average_precision, exact_auroc, binary_metrics):
        assert peak_bytes(metric, maps, masks) < 6 * maps.size, metric.__name__
    assert peak_bytes(lambda m, g: aupro(m, g, chunk=4096), maps, masks) < 6 * maps.size  # + O(chunk) temporaries


def test_pixel_metrics_over_per_image_maps_equal_sklearn_on_the_stacked_maps() -> None:
    rng = np.random.default_rng(7)
    masks = (rng.random((5, 16, 16)) < 0.1).astype(np.uint8)
    maps = (np.round(rng.random((5, 16, 16)) * 10) / 10 + 0.2 * masks).astype(np.float32)
    metrics = pixel_metrics(list(maps), list(masks))
    assert abs(metrics["AUROC"] - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-9
    assert abs(metrics["AP"] - average_precision_score(masks.ravel(), maps.ravel())) < 1e-9
    assert abs(metrics["F1max"] - sklearn_f1_max(maps.ravel(), masks.ravel())) < 1e-9
