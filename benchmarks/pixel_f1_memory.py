"""P3b: exact pixel F1-max on 1725 maps of 256×256 — ours vs torchmetrics ``BinaryPrecisionRecallCurve``.

Same data and the same per-subprocess peak-memory measure as ``pixel_auroc_memory.py`` (peak RSS minus that of a
child that only builds the data). torchmetrics runs on the full set, fed batch by batch as a test loop would;
sklearn's ``precision_recall_curve`` checks both on a subsample. Prints, last,
``pixel_f1 mem_ratio=<ours/tm> time_ratio=<ours/tm> max_abs_diff=<...>`` (budget: mem ≤ 0.35, time ≤ 0.5).
"""

from __future__ import annotations

import numpy as np
from pixel_auroc_memory import N_MAPS, main


def ours(maps: np.ndarray, masks: np.ndarray) -> float:
    from fsad.callbacks.metrics import f1_max

    return f1_max(maps, masks)


def torchmetrics_f1(maps: np.ndarray, masks: np.ndarray) -> float:
    import torch
    from torchmetrics.classification import BinaryPrecisionRecallCurve

    metric = BinaryPrecisionRecallCurve(thresholds=None)
    for i in range(0, N_MAPS, 32):
        metric.update(torch.from_numpy(maps[i : i + 32]), torch.from_numpy(masks[i : i + 32]).long())
    precision, recall, _ = metric.compute()
    return float((2 * precision * recall / (precision + recall).clamp_min(1e-30)).max())


def sklearn_gap(maps: np.ndarray, masks: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    return abs(ours(maps, masks) - float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-30))))


if __name__ == "__main__":
    main(__file__, "pixel_f1", "F1-max", {"ours": ours, "torchmetrics": torchmetrics_f1}, sklearn_gap)
