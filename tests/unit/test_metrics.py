"""Metric functions against sklearn and a straightforward AUPRO reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from fsad.callbacks.metrics import aupro, exact_auroc, f1_max, histogram_auroc, histogram_counts


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
