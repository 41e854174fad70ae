"""Exact, memory-lean anomaly metrics that give the same numbers on one process or N DDP ranks.

Pure functions first (image/pixel AUROC, F1-max, AUPRO), then :class:`AnomalyMetrics`, the callback that buffers
per-rank results keyed by the sample index, drops DDP padding duplicates, gathers to rank 0, computes there and
broadcasts the numbers so every rank logs the same values (DESIGN.md, "Metrics and callbacks").
"""

from __future__ import annotations

import math
import warnings
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


def exact_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC with ties counted ½, in O(N log N) time and about 4 bytes per negative.

    AUROC = P(s⁺ > s⁻) + ½·P(s⁺ = s⁻). The negatives' float32 scores are sorted once; for each positive,
    ``searchsorted`` gives the negatives strictly below it (left side) and at most equal to it (right side).
    No argsort indices over all elements are ever held.
    """
    scores, labels = _binary_inputs(scores, labels)
    positives = scores[labels]
    negatives = scores[~labels]
    negatives.sort()  # in place: the only large allocation is this one float32 copy of the negatives
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    below = np.searchsorted(negatives, positives, side="left").astype(np.float64)
    at_most = np.searchsorted(negatives, positives, side="right").astype(np.float64)
    wins = below.sum() + 0.5 * (at_most - below).sum()
    return float(wins / (positives.size * negatives.size))


def histogram_counts(scores: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 histograms of negative and positive scores over ``bins`` equal bins of [0,1] (summable across ranks)."""
    scores, labels = _binary_inputs(scores, labels)
    index = np.clip((scores.astype(np.float64) * bins).astype(np.int64), 0, bins - 1)
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
    """(best F1, its threshold) over all rules ``score ≥ t``; (nan, nan) without positives."""
    scores, labels = _binary_inputs(scores, labels)
    if labels.sum() == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(labels[order], dtype=np.float64)
    # only the last index of each run of equal scores is a valid threshold
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tp = true_positives[last_of_run]
    predicted = (np.nonzero(last_of_run)[0] + 1).astype(np.float64)
    f1 = 2 * tp / (predicted + labels.sum())
    best = int(f1.argmax())
    return float(f1[best]), float(sorted_scores[last_of_run][best])


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over all thresholds ``score ≥ t`` (the maximum over sklearn's precision-recall curve)."""
    return f1_max_threshold(scores, labels)[0]


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, divided by ``fpr_limit`` (MVTec AUPRO).

    Regions are the 8-connected components of each ground-truth mask (scipy). For each threshold, PRO is the mean
    over regions of the fraction of region pixels above it; FPR is the fraction of normal pixels above it. The curve
    is integrated with the trapezoid rule and cut exactly at ``fpr_limit`` by linear interpolation.
    """
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool)
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    next_id = 0
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        region_ids[i] = np.where(labelled > 0, labelled + next_id, 0)
        next_id += count
    if next_id == 0 or masks.all():
        return float("nan")
    flat_scores = maps.ravel()
    flat_regions = region_ids.ravel()
    normal = flat_regions == 0
    region_sizes = np.bincount(flat_regions, minlength=next_id + 1).astype(np.float64)
    # sweep thresholds from high to low over every distinct score: each pixel adds to FPR or to its region's overlap
    order = np.argsort(-flat_scores, kind="stable")
    sorted_scores = flat_scores[order]
    sorted_regions = flat_regions[order]
    fpr = np.cumsum(normal[order], dtype=np.float64) / normal.sum()
    weights = np.where(sorted_regions > 0, 1.0 / region_sizes[sorted_regions], 0.0) / next_id
    pro = np.cumsum(weights)
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fpr[last_of_run]]
    pro = np.r_[0.0, pro[last_of_run]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    fpr_cut, pro_cut = fpr[:cut], pro[:cut]
    if cut < fpr.size and fpr[cut - 1] < fpr_limit:
        step = (fpr_limit - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
        fpr_cut = np.r_[fpr_cut, fpr_limit]
        pro_cut = np.r_[pro_cut, pro[cut - 1] + step * (pro[cut] - pro[cut - 1])]
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


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
    """Image/pixel AUROC, F1-max and optional AUPRO of one category's test set, exact under DDP.

    Args:
        pixel_mode: ``exact`` (gather maps to rank 0, exact AUROC) or ``histogram`` (``bins`` summed across ranks,
            cheap monitoring; its value is logged as ``pixel_AUROC_hist``). Binned counts cannot be de-duplicated
            after summing, so under DDP each rank bins only the samples it owns under Lightning's unshuffled test
            sampler (dataset position p → rank p mod world size; the padding repeats positions onto other ranks).
        aupro: also compute AUPRO up to FPR 0.3 (costly; exact mode only).
        f1: also compute image and pixel F1-max.
        bins: histogram bins for ``histogram`` mode.
    """

    def __init__(
        self,
        pixel_mode: Literal["exact", "histogram"] = "exact",
        aupro: bool = False,
        f1: bool = True,
        bins: int = 65536,
    ) -> None:
        if pixel_mode not in ("exact", "histogram"):
            raise ValueError(f"AnomalyMetrics.pixel_mode must be 'exact' or 'histogram', got {pixel_mode!r}")
        self.pixel_mode = pixel_mode
        self.aupro = aupro
        self.f1 = f1
        self.bins = bins
        self.results: dict[str, float] = {}
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
                negatives, positives = histogram_counts(maps[row], masks[row], self.bins)
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
        results = {"image_AUROC": self._checked(exact_auroc, image_scores, image_labels, "image")}
        if self.f1:
            results["image_F1max"] = self._checked(f1_max, image_scores, image_labels, "image")
        if self.pixel_mode == "histogram":
            results["pixel_AUROC_hist"] = histogram_auroc(negative_counts, positive_counts)
            return results
        pixel_scores = np.stack([maps[i] for i in order])
        pixel_masks = np.stack([masks[i] for i in order])
        results["pixel_AUROC"] = self._checked(exact_auroc, pixel_scores, pixel_masks, "pixel")
        if self.f1:
            results["pixel_F1max"] = self._checked(f1_max, pixel_scores, pixel_masks, "pixel")
        if self.aupro:
            results["pixel_AUPRO"] = aupro(pixel_scores, pixel_masks)
        return results

    @staticmethod
    def _checked(metric: Any, scores: np.ndarray, labels: np.ndarray, level: str) -> float:
        value = metric(scores, labels)
        if math.isnan(value):
            warnings.warn(
                f"{level}-level {metric.__name__} is undefined: the test set has only one class at {level} level",
                UserWarning,
                stacklevel=3,
            )
        return value
