"""P3b: exact pixel F1-max on 1725 maps of 256×256 — ours vs torchmetrics ``BinaryPrecisionRecallCurve``.

Same data and the same per-subprocess peak-memory measure as ``pixel_auroc_memory.py`` (peak RSS minus that of a
child that only builds the data). torchmetrics runs on the full set, fed batch by batch as a test loop would;
sklearn's ``precision_recall_curve`` checks both on a subsample. Prints, last,
``pixel_f1 mem_ratio=<ours/tm> time_ratio=<ours/tm> max_abs_diff=<...>`` (budget: mem ≤ 0.35, time ≤ 0.5).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
from pixel_auroc_memory import N_MAPS, build_data


def child(method: str) -> None:
    maps, masks = build_data()
    value = float("nan")
    start = time.perf_counter()
    if method == "ours":
        from fsad.callbacks.metrics import f1_max

        value = f1_max(maps, masks)
    elif method == "torchmetrics":
        import torch
        from torchmetrics.classification import BinaryPrecisionRecallCurve

        metric = BinaryPrecisionRecallCurve(thresholds=None)
        for i in range(0, N_MAPS, 32):
            metric.update(torch.from_numpy(maps[i : i + 32]), torch.from_numpy(masks[i : i + 32]).long())
        precision, recall, _ = metric.compute()
        value = float((2 * precision * recall / (precision + recall).clamp_min(1e-30)).max())
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"value": value, "seconds": seconds, "peak_mb": peak_kb / 1024}))


def measure(method: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    baseline, ours, reference = measure("baseline"), measure("ours"), measure("torchmetrics")
    ours_mb = ours["peak_mb"] - baseline["peak_mb"]
    reference_mb = reference["peak_mb"] - baseline["peak_mb"]
    print(f"data only: {baseline['peak_mb']:.0f} MB peak")
    print(f"ours:         +{ours_mb:.0f} MB, {ours['seconds']:.2f} s, F1-max {ours['value']:.12f}")
    print(f"torchmetrics: +{reference_mb:.0f} MB, {reference['seconds']:.2f} s, F1-max {reference['value']:.12f}")

    from sklearn.metrics import precision_recall_curve

    from fsad.callbacks.metrics import f1_max

    maps, masks = build_data()
    pick = np.random.default_rng(1).choice(N_MAPS, 60, replace=False)
    sub_maps, sub_masks = maps[pick], masks[pick]
    precision, recall, _ = precision_recall_curve(sub_masks.ravel(), sub_maps.ravel())
    sklearn_f1 = float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-30)))
    sklearn_gap = abs(f1_max(sub_maps, sub_masks) - sklearn_f1)
    print(f"subsample of 60 maps: |ours - sklearn| = {sklearn_gap:.3e}")
    print(
        f"pixel_f1 mem_ratio={ours_mb / reference_mb:.3f} time_ratio={ours['seconds'] / reference['seconds']:.3f} "
        f"max_abs_diff={max(abs(ours['value'] - reference['value']), sklearn_gap):.3e}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
