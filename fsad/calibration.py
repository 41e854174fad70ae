"""Fit a model's decision thresholds (image and pixel, F1-optimal) and min-max statistics on a calibration set.

The calibration set is labelled anomalies when the user has them (``source: labelled``); otherwise every normal
image is paired with an NSA-synthesised anomaly made from it and the next normal image (``source: nsa``,
:func:`fsad.datamodules.synthesis.nsa_synthesize`). Thresholds are the score maximising F1 of ``score ≥ t``
(:func:`fsad.callbacks.metrics.f1_max_threshold`): on image scores against image labels, and on map pixels
against mask pixels. The normalisation range is the calibration set's min and max.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from fsad.batch import Batch, collate_batch
from fsad.callbacks.metrics import f1_max_threshold
from fsad.datamodules.mvtec import find_mask, list_images
from fsad.datamodules.synthesis import LABEL_THRESHOLD, nsa_synthesize
from fsad.datamodules.transforms import DataError, PairedTransform, load_mask, load_rgb
from fsad.errors import FsadError
from fsad.lightning_modules.base import FewShotAnomalyModule


class CalibrationError(FsadError, ValueError):
    """The calibration images cannot give thresholds (none found, or no anomalies among them)."""


@dataclass
class Example:
    """One calibration image: uint8 RGB [H,W,3], uint8 {0,1} mask [H,W], label, and where it came from."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    name: str


def batches_of(examples: Sequence[Example], transform: PairedTransform, batch_size: int = 8) -> Iterable[Batch]:
    """The examples through the datamodule's transform, collated like a test loader's batches."""
    for start in range(0, len(examples), batch_size):
        items = []
        for index, example in enumerate(examples[start : start + batch_size], start=start):
            image, mask = transform(example.image, example.mask)
            items.append({"image": image, "gt_mask": mask, "gt_label": example.label, "image_path": example.name,
                          "mask_path": None, "category": "calibration", "index": index})  # fmt: skip
        yield collate_batch(items)


def images_from(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder's images (sorted) or the given files; an error names a missing path."""
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise DataError(f"no JPG/PNG/BMP/TIFF images in {path}")
            return files
        source = [path]
    files = [Path(p).expanduser() for p in source]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {missing}")
    return files


def nsa_examples(normal_paths: Sequence[str | Path], seed: int = 0) -> list[Example]:
    """Each normal image, and an NSA anomaly blending a patch of the next normal image into it."""
    rng = np.random.default_rng(seed)
    normals = [load_rgb(p) for p in normal_paths]
    examples = [
        Example(img, np.zeros(img.shape[:2], np.uint8), 0, str(p)) for img, p in zip(normals, normal_paths, strict=True)
    ]
    for i, (target, path) in enumerate(zip(normals, normal_paths, strict=True)):
        source = normals[(i + 1) % len(normals)]
        if source.shape != target.shape:
            source = cv2.resize(source, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA)
        image, label = nsa_synthesize(target, source, rng)
        mask = (label > LABEL_THRESHOLD).astype(np.uint8)  # the authors' training-mask rule (GT > 0.3)
        examples.append(Example(image, mask, 1, f"nsa:{path}"))
    return examples


def labelled_examples(
    normal_paths: Sequence[str | Path], abnormal_paths: Sequence[str | Path], mask_dir: str | Path | None
) -> list[Example]:
    """Normal images (empty masks) and anomalous ones, with their masks from ``mask_dir`` when given."""
    examples = []
    for path in normal_paths:
        image = load_rgb(path)
        examples.append(Example(image, np.zeros(image.shape[:2], np.uint8), 0, str(path)))
    for path in abnormal_paths:
        image = load_rgb(path)
        mask = np.zeros(image.shape[:2], np.uint8)
        if mask_dir is not None:
            mask_path = find_mask(Path(mask_dir).expanduser(), Path(path))
            if mask_path is None:
                raise DataError(f"no mask for {path} in {mask_dir} (expected {Path(path).stem}.png or _mask.png)")
            mask = load_mask(mask_path)
            if mask.shape != image.shape[:2]:
                raise DataError(f"mask {mask_path} is {mask.shape} but image {path} is {image.shape[:2]}")
        examples.append(Example(image, mask, 1, str(path)))
    return examples


@torch.no_grad()
def fit_thresholds(module: FewShotAnomalyModule, batches: Iterable[Batch], source: str) -> dict[str, float]:
    """F1-optimal image and pixel thresholds plus min/max of scores and maps, stored in ``module.thresholds``.

    The pixel threshold is fitted only when some mask pixel is anomalous. Returns the values stored.
    """
    scores, labels, maps, masks = [], [], [], []
    for batch in batches:
        anomaly_map, pred_score = module(batch.image.to(module.device))
        scores.append(pred_score.cpu())
        maps.append(anomaly_map.cpu())
        labels.append(batch.gt_label)
        masks.append(batch.gt_mask)
    if not scores:
        raise CalibrationError("no calibration images: give normal images (and anomalous ones if you have them)")
    score, label = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    if label.sum() == 0 or label.sum() == len(label):
        raise CalibrationError("calibration needs both normal and anomalous images to fit an F1 threshold")
    values = {"image_threshold": f1_max_threshold(score, label)[1],
              "image_min": float(score.min()), "image_max": float(score.max())}  # fmt: skip
    pixel_map, pixel_mask = torch.cat(maps).numpy().ravel(), torch.cat(masks).numpy().ravel()
    if pixel_mask.any():
        values |= {"pixel_threshold": f1_max_threshold(pixel_map, pixel_mask)[1],
                   "pixel_min": float(pixel_map.min()), "pixel_max": float(pixel_map.max())}  # fmt: skip
    module.thresholds.set(source, **values)
    return values


def calibrate(
    module: FewShotAnomalyModule,
    transform: PairedTransform,
    normal_paths: Sequence[str | Path],
    abnormal_paths: Sequence[str | Path] = (),
    mask_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Labelled calibration when anomalous images are given, NSA-synthesised anomalies otherwise."""
    if not normal_paths:
        raise CalibrationError("calibration needs normal images (a validation folder or held-out normal images)")
    if abnormal_paths:
        return fit_thresholds(
            module, batches_of(labelled_examples(normal_paths, abnormal_paths, mask_dir), transform), "labelled"
        )
    return fit_thresholds(module, batches_of(nsa_examples(normal_paths, seed), transform), "nsa")
