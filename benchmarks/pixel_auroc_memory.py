"""P3: exact pixel AUROC on 1725 maps of 256×256 — ours vs torchmetrics ``BinaryAUROC(thresholds=None)``.

Each measurement runs in its own subprocess; peak memory is the child's peak RSS minus that of a child that only
builds the same data. Prints, last, ``pixel_auroc mem_ratio=<ours/tm> time_ratio=<ours/tm> max_abs_diff=<...>``
(budget: mem_ratio ≤ 0.35, time_ratio ≤ 0.5). The values are also checked against sklearn on a subsample.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]

N_MAPS, SIDE, DEFECT_FRACTION = 1725, 256, 0.03


def build_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random score maps in [0,1] with blob-shaped defects covering about 3% of the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    masks = np.zeros((N_MAPS, SIDE, SIDE), dtype=np.uint8)
    maps = rng.random((N_MAPS, SIDE, SIDE), dtype=np.float32)
    maps *= 0.6
    defective = rng.random(N_MAPS) < 0.7
    radius = np.sqrt(DEFECT_FRACTION * SIDE * SIDE / 0.7 / np.pi)
    for i in np.nonzero(defective)[0]:
        cy, cx = rng.uniform(radius, SIDE - radius, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < (radius * rng.uniform(0.5, 1.3)) ** 2
        masks[i][blob] = 1
        maps[i][blob] += 0.4 * rng.random(int(blob.sum()), dtype=np.float32)
    return maps, masks


def run_child(metrics: dict[str, Metric], method: str) -> None:
    """In a child process: build the data, time ``metrics[method]`` on it (``baseline``: nothing), print value,
    seconds and peak RSS as one JSON line."""
    maps, masks = build_data()
    start = time.perf_counter()
    value = metrics[method](maps, masks) if method != "baseline" else float("nan")
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"value": value, "seconds": seconds, "peak_mb": peak_kb / 1024}))


def measure(script: str, method: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, script, "--child", method], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(script: str, name: str, label: str, sklearn_gap: Metric) -> None:
    """Ours vs torchmetrics on the full data (each in its own child of ``script``), ours vs sklearn on a subsample
    (``sklearn_gap`` returns |ours − sklearn| there); prints the budget line ``<name> mem_ratio= time_ratio=``."""
    baseline, ours, reference = (measure(script, m) for m in ("baseline", "ours", "torchmetrics"))
    ours_mb = ours["peak_mb"] - baseline["peak_mb"]
    reference_mb = reference["peak_mb"] - baseline["peak_mb"]
    print(f"data only: {baseline['peak_mb']:.0f} MB peak")
    print(f"ours:         +{ours_mb:.0f} MB, {ours['seconds']:.2f} s, {label} {ours['value']:.12f}")
    print(f"torchmetrics: +{reference_mb:.0f} MB, {reference['seconds']:.2f} s, {label} {reference['value']:.12f}")
    maps, masks = build_data()
    pick = np.random.default_rng(1).choice(N_MAPS, 60, replace=False)
    gap = sklearn_gap(maps[pick], masks[pick])
    print(f"subsample of 60 maps: |ours - sklearn| = {gap:.3e}")
    print(
        f"{name} mem_ratio={ours_mb / reference_mb:.3f} time_ratio={ours['seconds'] / reference['seconds']:.3f} "
        f"max_abs_diff={max(abs(ours['value'] - reference['value']), gap):.3e}"
    )


def main(script: str, name: str, label: str, metrics: dict[str, Metric], sklearn_gap: Metric) -> None:
    """``script --child <method>`` measures one method; ``script`` alone compares them."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(metrics, sys.argv[2])
    else:
        compare(script, name, label, sklearn_gap)


def ours(maps: np.ndarray, masks: np.ndarray) -> float:
    from fsad.callbacks.metrics import exact_auroc

    return exact_auroc(maps, masks)


def torchmetrics_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    import torch
    from torchmetrics.classification import BinaryAUROC

    metric = BinaryAUROC(thresholds=None)
    for i in range(0, N_MAPS, 32):  # fed batch by batch, as a test loop would
        metric.update(torch.from_numpy(maps[i : i + 32]), torch.from_numpy(masks[i : i + 32]).long())
    return float(metric.compute())


def sklearn_gap(maps: np.ndarray, masks: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return abs(ours(maps, masks) - roc_auc_score(masks.ravel(), maps.ravel()))


if __name__ == "__main__":
    main(__file__, "pixel_auroc", "AUROC", {"ours": ours, "torchmetrics": torchmetrics_auroc}, sklearn_gap)
