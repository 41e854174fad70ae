"""Exact, memory-lean anomaly metrics that give the same numbers on one process or N DDP ranks.

Pure functions first (image/pixel AUROC, F1-max, AP, AUPRO), then :class:`AnomalyMetrics`, the callback that buffers
per-rank results keyed by the sample index, drops DDP padding duplicates, gathers to rank 0, computes there and
broadcasts the numbers so every rank logs the same values (docs/architecture.md, "Metric rules").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from scipy import ndimage

from fsad.batch import Batch


# --------------------------------------------------------------------------- pure functions
def _binary_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 scores and boolean labels, without copies where the inputs already are float32 and bool/uint8."""
    scores = np.asarray(scores, dtype=np.float32).ravel()
    labels = np.asarray(labels).ravel()
    if labels.dtype == np.uint8 and labels.max(initial=0) <= 1:
        labels = labels.view(bool)
    elif labels.dtype != np.bool_:
        labels = labels != 0
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.shape} vs {labels.shape}")
    return scores, labels


def _split_sorted(scores: np.ndarray, labels: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """(positives' scores, negatives' scores), each a float32 copy sorted ascending in place.

    The flat arrays are split in chunks first: boolean indexing of one huge array builds int64 indices of every
    selected element (8 bytes each), twice the float32 copy it fills.
    """
    scores, labels = _binary_inputs(scores, labels)
    starts = range(0, max(scores.size, 1), chunk)
    return _split_sorted_parts([scores[i : i + chunk] for i in starts], [labels[i : i + chunk] for i in starts])


def _split_sorted_parts(
    score_parts: Sequence[np.ndarray], label_parts: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_split_sorted` over several arrays (e.g. one map per image) without stacking them first."""
    pairs = [_binary_inputs(scores, labels) for scores, labels in zip(score_parts, label_parts, strict=True)]
    positive_counts = [int(np.count_nonzero(labels)) for _, labels in pairs]
    positives = np.empty(sum(positive_counts), dtype=np.float32)
    negatives = np.empty(sum(labels.size for _, labels in pairs) - positives.size, dtype=np.float32)
    filled_positive = filled_negative = 0
    for (scores, labels), count in zip(pairs, positive_counts, strict=True):  # per-part temporaries only
        positives[filled_positive : filled_positive + count] = scores[labels]
        negatives[filled_negative : filled_negative + labels.size - count] = scores[~labels]
        filled_positive += count
        filled_negative += labels.size - count
    positives.sort()
    negatives.sort()  # the only large allocation: one float32 copy of the negatives, no argsort indices
    return positives, negatives


def _auroc_from_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC = P(s⁺ > s⁻) + ½·P(s⁺ = s⁻), counted with ``searchsorted`` of each positive into the sorted negatives."""
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    below = np.searchsorted(negatives, positives, side="left").astype(np.float64)
    at_most = np.searchsorted(negatives, positives, side="right").astype(np.float64)
    wins = below.sum() + 0.5 * (at_most - below).sum()
    return float(wins / (positives.size * negatives.size))


def _positive_thresholds(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct positive score t, descending: (t, TP(t), FP(t)) of the rule ``score ≥ t``.

    Recall changes only at a positive's score, so these thresholds are the only ones that
    matter for F1-max (raising any other threshold to the next positive score keeps TP and lowers FP) and for AP
    (a threshold that adds only negatives adds nothing to Σ ΔR·P).
    """
    first = np.flatnonzero(np.r_[True, positives[1:] != positives[:-1]])  # first index of each distinct value
    distinct = positives[first]
    true_positives = (positives.size - first).astype(np.float64)  # positives ≥ t
    false_positives = (negatives.size - np.searchsorted(negatives, distinct, side="left")).astype(np.float64)
    return distinct[::-1], true_positives[::-1], false_positives[::-1]


def _f1_from_sorted(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    if positives.size == 0:
        return float("nan"), float("nan")
    thresholds, tp, fp = _positive_thresholds(positives, negatives)
    f1 = 2 * tp / (tp + fp + positives.size)  # F1 = 2TP / (2TP + FP + FN), with TP + FN = all positives
    best = int(f1.argmax())
    return float(f1[best]), float(thresholds[best])


def _ap_from_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AP = Σₙ (Rₙ − Rₙ₋₁)·Pₙ over thresholds from high to low (sklearn's step-wise definition, ties grouped)."""
    if positives.size == 0:
        return float("nan")
    _, tp, fp = _positive_thresholds(positives, negatives)
    recall_step = np.diff(tp, prepend=0.0) / positives.size
    return float((recall_step * tp / (tp + fp)).sum())


def curves_from_sorted(positives: np.ndarray, negatives: np.ndarray) -> dict[str, list[float]]:
    """The ROC and PR curves behind :func:`_auroc_from_sorted` and :func:`_ap_from_sorted`, point for point.

    ROC: (FPR, TPR) of the rule ``score ≥ t`` at every distinct score t from high to low, starting at (0, 0); the
    trapezoids under it sum to the AUROC with ties counted ½. PR: (recall, precision) at every distinct positive
    score from high to low; Σ ΔR·P over it is the AP.
    """
    if positives.size == 0 or negatives.size == 0:
        return {}
    distinct = np.unique(np.concatenate([positives, negatives]))[::-1]
    tpr = (positives.size - np.searchsorted(positives, distinct, side="left")) / positives.size
    fpr = (negatives.size - np.searchsorted(negatives, distinct, side="left")) / negatives.size
    pr_thresholds, tp, fp = _positive_thresholds(positives, negatives)
    return {
        "roc_threshold": [float("inf"), *distinct.astype(np.float64).tolist()],
        "fpr": [0.0, *fpr.tolist()],
        "tpr": [0.0, *tpr.tolist()],
        "pr_threshold": pr_thresholds.astype(np.float64).tolist(),
        "recall": (tp / positives.size).tolist(),
        "precision": (tp / (tp + fp)).tolist(),
    }


def exact_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC with ties counted ½, in O(N log N) time and about 4 bytes per element (sorted float32 copies)."""
    return _auroc_from_sorted(*_split_sorted(scores, labels))


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC, F1-max (with its threshold) and AP from one sort of the negatives: the lean path for pixel metrics."""
    return _metrics_from_sorted(*_split_sorted(scores, labels))


def pixel_metrics(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """:func:`binary_metrics` over per-image maps and masks, without stacking them into one more full copy."""
    return _metrics_from_sorted(*_split_sorted_parts(maps, masks))


def _metrics_from_sorted(positives: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    best_f1, threshold = _f1_from_sorted(positives, negatives)
    return {
        "AUROC": _auroc_from_sorted(positives, negatives),
        "F1max": best_f1,
        "F1_threshold": threshold,
        "AP": _ap_from_sorted(positives, negatives),
    }


def histogram_counts(
    scores: np.ndarray, labels: np.ndarray, bins: int, value_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """int64 histograms of negative and positive scores over ``bins`` equal bins of ``value_range`` (summable across
    ranks); scores outside the range fall in the end bins."""
    scores, labels = _binary_inputs(scores, labels)
    low, high = value_range
    position = (scores.astype(np.float64) - low) / (high - low) * bins
    index = np.clip(np.floor(position), 0, bins - 1).astype(np.int64)
    return (
        np.bincount(index[~labels], minlength=bins).astype(np.int64),
        np.bincount(index[labels], minlength=bins).astype(np.int64),
    )


def histogram_auroc(negative_counts: np.ndarray, positive_counts: np.ndarray) -> float:
    """AUROC from binned counts, pairs in the same bin counted ½; the error is bounded by the shared-bin pairs."""
    negatives = negative_counts.astype(np.float64)
    positives = positive_counts.astype(np.float64)
    if negatives.sum() == 0 or positives.sum() == 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
    wins = (positives * (below + 0.5 * negatives)).sum()
    return float(wins / (positives.sum() * negatives.sum()))


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over all rules ``score ≥ t``; (nan, nan) without positives.

    Exact and lean: the best threshold is always a positive's score, so only the distinct positive scores are
    tried, each counted against the sorted negatives with ``searchsorted``.
    """
    return _f1_from_sorted(*_split_sorted(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over all thresholds ``score ≥ t`` (the maximum over sklearn's precision-recall curve)."""
    return f1_max_threshold(scores, labels)[0]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision exactly as sklearn's ``average_precision_score`` (ties grouped); nan without positives."""
    return _ap_from_sorted(*_split_sorted(scores, labels))


def aupro(
    maps: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    chunk: int = 1 << 16,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, divided by ``fpr_limit`` (MVTec AUPRO).

    Regions are the 8-connected components of each ground-truth mask (scipy). At threshold t, PRO is the mean over
    regions of the fraction of region pixels ≥ t and FPR the fraction of normal pixels ≥ t; the curve through every
    distinct score is integrated with the trapezoid rule and cut at ``fpr_limit`` by linear interpolation.

    Memory bound: only the normal pixels' float32 scores are held in full (sorted in place). PRO moves only at
    defect pixels and FPR only at normal ones, so the area is a sum over normal pixels n ranked above the cut of
    (PRO(> sₙ) + PRO(≥ sₙ)) / 2 / N⁻, evaluated in chunks of ``chunk`` pixels with ``searchsorted`` into the
    defect pixels' scores (each weighted 1 / (its region's size · number of regions)).
    """
    negative_count = sum(int(np.size(mask) - np.count_nonzero(mask)) for mask in masks)
    negatives = np.empty(negative_count, dtype=np.float32)
    positive_scores, positive_weights = [], []
    filled, region_count = 0, 0
    for image_map, image_mask in zip(maps, masks, strict=True):
        image_map = np.asarray(image_map, dtype=np.float32)
        defect = np.asarray(image_mask) != 0
        labelled, count = ndimage.label(defect, structure=np.ones((3, 3)))
        normal_scores = image_map[~defect]
        negatives[filled : filled + normal_scores.size] = normal_scores
        filled += normal_scores.size
        if count:
            region_of_pixel = labelled[defect]
            positive_scores.append(image_map[defect])
            positive_weights.append(1.0 / np.bincount(region_of_pixel)[region_of_pixel])
            region_count += count
    if region_count == 0 or negative_count == 0:
        return float("nan")
    negatives.sort()
    scores = np.concatenate(positive_scores)
    order = np.argsort(scores, kind="stable")  # defect pixels only
    scores = scores[order]
    cumulative = np.r_[0.0, np.cumsum(np.concatenate(positive_weights)[order] / region_count)]
    total = cumulative[-1]

    def pro_above(values: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
        """PRO of the rule ``score > v`` (side ``right``) or ``score ≥ v`` (side ``left``)."""
        return total - cumulative[np.searchsorted(scores, values, side=side)]

    # the normal pixel at which FPR crosses the limit: its tie group is cut, those strictly above it count fully
    limit_count = fpr_limit * negative_count
    cut_value = negatives[negative_count - max(math.ceil(limit_count), 1)]
    group_start = int(np.searchsorted(negatives, cut_value, side="left"))
    group_end = int(np.searchsorted(negatives, cut_value, side="right"))
    area = 0.0
    for start in range(group_end, negative_count, chunk):
        values = negatives[start : min(start + chunk, negative_count)]
        area += float((pro_above(values, "right") + pro_above(values, "left")).sum()) / 2
    area /= negative_count
    above_count = negative_count - group_end
    cut_values = np.array([cut_value])
    pro_before, pro_after = float(pro_above(cut_values, "right")[0]), float(pro_above(cut_values, "left")[0])
    fraction = (limit_count - above_count) / (group_end - group_start)  # share of the tie group's FPR step used
    width = (limit_count - above_count) / negative_count
    area += width * (pro_before + fraction * (pro_after - pro_before) / 2)
    return float(area / fpr_limit)


# --------------------------------------------------------------------------- distributed helpers
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (``None`` elsewhere); one-element list without DDP."""
    if not _distributed():
        return [obj]
    received = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, received, dst=0)
    return received


def broadcast_from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --------------------------------------------------------------------------- callback
class AnomalyMetrics(Callback):
    """Image/pixel AUROC, AP, F1-max and optional AUPRO of one category's test set, exact under DDP.

    Args:
        pixel_mode: ``exact`` (gather maps to rank 0, exact AUROC) or ``histogram`` (``bins`` summed across ranks,
            cheap monitoring; its value is logged as ``pixel_AUROC_hist``). Binned counts cannot be de-duplicated
            after summing, so under DDP each rank bins only the samples it owns under Lightning's unshuffled test
            sampler (dataset position p → rank p mod world size; the padding repeats positions onto other ranks).
        aupro: also compute AUPRO up to FPR 0.3 (costly; exact mode only).
        f1: also compute image and pixel F1-max.
        bins: histogram bins for ``histogram`` mode.
        histogram_range: the (low, high) span the bins cover; maps are raw, so set it to the method's range (values
            outside land in the end bins and tie there).
    """

    def __init__(
        self,
        pixel_mode: Literal["exact", "histogram"] = "exact",
        aupro: bool = False,
        f1: bool = True,
        bins: int = 65536,
        histogram_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if pixel_mode not in ("exact", "histogram"):
            raise ValueError(f"AnomalyMetrics.pixel_mode must be 'exact' or 'histogram', got {pixel_mode!r}")
        self.pixel_mode = pixel_mode
        self.aupro = aupro
        self.f1 = f1
        self.bins = bins
        if not histogram_range[0] < histogram_range[1]:
            raise ValueError(f"AnomalyMetrics.histogram_range must be (low, high), low < high; got {histogram_range}")
        self.histogram_range = (float(histogram_range[0]), float(histogram_range[1]))
        self.results: dict[str, float] = {}
        #: rank 0 only: the image-level ROC and PR curves the image AUROC and AP were computed from
        self.curves: dict[str, list[float]] = {}
        #: rank 0 only: the F1-max thresholds of this test set, ``image`` and (exact mode) ``pixel``
        self.f1_thresholds: dict[str, float] = {}
        self._rank, self._world = 0, 1
        self._reset()

    def _reset(self) -> None:
        self._seen: set[int] = set()
        self._scores: dict[int, float] = {}
        self._labels: dict[int, int] = {}
        self._maps: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._negative_counts = np.zeros(self.bins, dtype=np.int64)
        self._positive_counts = np.zeros(self.bins, dtype=np.int64)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        self._rank, self._world = trainer.global_rank, trainer.world_size

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        result = outputs if isinstance(outputs, Batch) else batch
        if result.pred_score is None or result.anomaly_map is None:
            raise RuntimeError("AnomalyMetrics needs test_step to fill batch.pred_score and batch.anomaly_map")
        scores = result.pred_score.detach().float().cpu().numpy()
        maps = result.anomaly_map.detach().float().cpu().numpy()
        masks = result.gt_mask.detach().cpu().numpy().astype(np.uint8)
        if maps.shape != masks.shape:
            raise ValueError(f"anomaly_map {maps.shape} and gt_mask {masks.shape} differ: both must be at eval_size")
        for row, index in enumerate(result.index.tolist()):
            if index in self._seen:  # DDP pads the last batch with duplicates of earlier samples
                continue
            self._seen.add(index)
            self._scores[index] = float(scores[row])
            self._labels[index] = int(result.gt_label[row])
            if self.pixel_mode == "exact":
                self._maps[index] = maps[row].astype(np.float32, copy=False)
                self._masks[index] = masks[row]
            elif index % self._world == self._rank:  # not a padding copy of another rank's sample
                negatives, positives = histogram_counts(maps[row], masks[row], self.bins, self.histogram_range)
                self._negative_counts += negatives
                self._positive_counts += positives

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.results = broadcast_from_rank_zero(self._compute_on_rank_zero())
        for name, value in self.results.items():
            pl_module.log(name, value, sync_dist=False, rank_zero_only=False)

    def _compute_on_rank_zero(self) -> dict[str, float] | None:
        shards = gather_to_rank_zero(
            {
                "scores": self._scores,
                "labels": self._labels,
                "maps": self._maps,
                "masks": self._masks,
                "neg": self._negative_counts,
                "pos": self._positive_counts,
            }
        )
        if shards is None:
            return None
        scores, labels, maps, masks = {}, {}, {}, {}
        negative_counts = np.zeros(self.bins, dtype=np.int64)
        positive_counts = np.zeros(self.bins, dtype=np.int64)
        for shard in shards:  # the same index on two ranks is a padding duplicate: keep one copy
            scores.update(shard["scores"])
            labels.update(shard["labels"])
            maps.update(shard["maps"])
            masks.update(shard["masks"])
            negative_counts += shard["neg"]
            positive_counts += shard["pos"]
        order = sorted(scores)
        image_scores = np.array([scores[i] for i in order], dtype=np.float32)
        image_labels = np.array([labels[i] for i in order], dtype=np.int64)
        positives, negatives = _split_sorted(image_scores, image_labels)
        image = _metrics_from_sorted(positives, negatives)
        self.curves = curves_from_sorted(positives, negatives)
        self.f1_thresholds = {"image": image["F1_threshold"]}
        results = self._named("image", image)
        if self.pixel_mode == "histogram":
            results["pixel_AUROC_hist"] = histogram_auroc(negative_counts, positive_counts)
            return results
        pixel_maps = [maps.pop(i) for i in order]  # hand each map over, so no second copy of them all is held
        pixel_masks = [masks.pop(i) for i in order]
        pixel = pixel_metrics(pixel_maps, pixel_masks)
        self.f1_thresholds["pixel"] = pixel["F1_threshold"]
        results |= self._named("pixel", pixel)
        if self.aupro:
            results["pixel_AUPRO"] = aupro(pixel_maps, pixel_masks)
        return results

    def _named(self, level: str, metrics: dict[str, float]) -> dict[str, float]:
        """``<level>_AUROC``, ``<level>_AP`` and (when ``f1``) ``<level>_F1max``; warns once where one is undefined."""
        names = ["AUROC", "AP"] + (["F1max"] if self.f1 else [])
        if math.isnan(metrics["AUROC"]):
            warnings.warn(
                f"{level}-level AUROC is undefined: the test set has only one class at {level} level",
                UserWarning,
                stacklevel=3,
            )
        return {f"{level}_{name}": metrics[name] for name in names}
