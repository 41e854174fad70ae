"""NSA (natural synthetic anomalies, Schlüter et al. 2022) as KAG-prompt's authors train with it.

Patches of a source image are resized and Poisson-blended (``cv2.seamlessClone``, ``NORMAL_CLONE``) into the target;
the label is the logistic of the median-filtered mean absolute intensity change, and the training mask is that
label > 0.3 (the authors' ``gt > 0.3``). Per-category parameters are the table :data:`NSA_PARAMETERS`. Everything
random comes from the ``rng`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

LABEL_THRESHOLD = 0.3  # the authors binarise the logistic label at 0.3 (openllama.py, training forward)


@dataclass(frozen=True)
class NSAParameters:
    """One category's NSA settings.

    width_bounds: ((min, max) half-height, (min, max) half-width) of a patch as fractions of the image side.
    logistic: (k, x0) of the intensity label 1 / (1 + exp(−k (Δ − x0))), Δ the mean absolute change in grey levels.
    background: (brightness, threshold): object pixels differ from the background brightness by more than the
        threshold (grey mean over RGB); ``None``: the whole image is object.
    resize_bounds: range of the random patch rescale factor N(1, 0.5).
    """

    width_bounds: tuple[tuple[float, float], tuple[float, float]] = ((0.03, 0.4), (0.03, 0.4))
    logistic: tuple[float, float] = (1 / 12, 24)
    background: tuple[float, float] | None = None
    resize_bounds: tuple[float, float] = (0.5, 2.0)


# Source: CVL-hub/KAG-prompt, code/datasets/mvtec.py (WIDTH_BOUNDS_PCT, INTENSITY_LOGISTIC_PARAMS, BACKGROUND; textures
# get resize bounds (0.5, 2), objects the patch_ex default (0.7, 1.3)) and code/datasets/visa.py (one setting for every
# VisA category, used here as the default for any category not listed).
_OBJECT_RESIZE = (0.7, 1.3)
NSA_PARAMETERS: dict[str, NSAParameters] = {
    "bottle": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 12, 24), (200, 60), _OBJECT_RESIZE),
    "cable": NSAParameters(((0.05, 0.4), (0.05, 0.4)), (1 / 12, 24), None, _OBJECT_RESIZE),
    "capsule": NSAParameters(((0.03, 0.15), (0.03, 0.4)), (1 / 2, 4), (200, 60), _OBJECT_RESIZE),
    "hazelnut": NSAParameters(((0.03, 0.35), (0.03, 0.35)), (1 / 12, 24), (20, 20), _OBJECT_RESIZE),
    "metal_nut": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 3, 7), (20, 20), _OBJECT_RESIZE),
    "pill": NSAParameters(((0.03, 0.2), (0.03, 0.4)), (1 / 3, 7), (20, 20), _OBJECT_RESIZE),
    "screw": NSAParameters(((0.03, 0.12), (0.03, 0.12)), (1, 3), (200, 60), _OBJECT_RESIZE),
    "toothbrush": NSAParameters(((0.03, 0.4), (0.03, 0.2)), (1 / 6, 15), (20, 20), _OBJECT_RESIZE),
    "transistor": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 6, 15), None, _OBJECT_RESIZE),
    "zipper": NSAParameters(((0.03, 0.4), (0.03, 0.2)), (1 / 6, 15), (200, 60), _OBJECT_RESIZE),
    "carpet": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 3, 7), None, (0.5, 2.0)),
    "grid": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 3, 7), None, (0.5, 2.0)),
    "leather": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 3, 7), None, (0.5, 2.0)),
    "tile": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 3, 7), None, (0.5, 2.0)),
    "wood": NSAParameters(((0.03, 0.4), (0.03, 0.4)), (1 / 6, 15), None, (0.5, 2.0)),
}
DEFAULT_PARAMETERS = NSAParameters()  # the authors' VisA setting


def parameters_for(category: str) -> NSAParameters:
    """The table row of a category (MVTec names, ``metal nut`` = ``metal_nut``), else the VisA default."""
    return NSA_PARAMETERS.get(category.replace(" ", "_"), DEFAULT_PARAMETERS)


@dataclass(frozen=True)
class NSASettings:
    """Settings shared by every category (the authors' values): up to ``patches`` patches (the first always, each
    further one with probability ½); half-widths (offset + Gamma(shape, scale)) × side; at least ``min_overlap`` of
    the source object must land on the target object; changes of at most ``tolerance`` grey levels are not labelled."""

    patches: int = 2
    gamma_shape: float = 2.0
    gamma_scale: float = 0.05
    gamma_offset: float = 0.03
    min_object: float = 0.0
    min_overlap: float = 0.25
    tolerance: float = 1.0
    attempts: int = 200


def object_mask(image: np.ndarray, background: tuple[float, float] | None) -> np.ndarray:
    """uint8 {0,1} [H,W]: pixels whose grey level differs from the background brightness by more than the threshold,
    median-filtered (7×7) against grain; all ones without a background setting."""
    if background is None:
        return np.ones(image.shape[:2], dtype=np.uint8)
    brightness, threshold = background
    grey_sum = image.sum(axis=2, dtype=np.int32)  # |mean − b| > t  ⇔  |sum − 3b| > 3t, without float images
    mask = (np.abs(grey_sum - 3 * brightness) > 3 * threshold).astype(np.uint8)
    return cv2.medianBlur(mask, 7)


def logistic_label(change: np.ndarray, changed: np.ndarray, logistic: tuple[float, float]) -> np.ndarray:
    """The intensity label: changed / (1 + exp(−k (median₅(Δ) − x0))), Δ [H,W] the mean absolute change over RGB in
    grey levels, median₅ a median over a radius-5 disk, ``changed`` the {0,1} pixels that count as changed."""
    k, x0 = logistic
    radius = 5
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = xx**2 + yy**2 <= radius**2
    smoothed = np.zeros_like(change)
    rows, cols = np.nonzero(changed)
    if len(rows):  # the filter only matters near changed pixels (Δ is 0 elsewhere), so run it on their box
        top, left = max(rows.min() - radius, 0), max(cols.min() - radius, 0)
        bottom, right = rows.max() + radius + 1, cols.max() + radius + 1
        smoothed[top:bottom, left:right] = ndimage.median_filter(
            change[top:bottom, left:right], footprint=disk, mode="nearest"
        )
    return changed / (1.0 + np.exp(-k * (smoothed - x0)))


def _blend_patch(
    result: np.ndarray, source: np.ndarray, target_object: np.ndarray, source_object: np.ndarray | None,
    params: NSAParameters, settings: NSASettings, rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[tuple[slice, slice], np.ndarray] | None]:  # fmt: skip
    """Blend one resized source patch into ``result``; returns the new image and (box, patch region) or None when
    no spot was found in ``settings.attempts`` tries (the image is then unchanged)."""
    height, width = result.shape[:2]
    (lo1, hi1), (lo2, hi2) = params.width_bounds
    min1, max1 = round(lo1 * height), round(hi1 * height)
    min2, max2 = round(lo2 * width), round(hi2 * width)
    half1 = int(
        np.clip((settings.gamma_offset + rng.gamma(settings.gamma_shape, settings.gamma_scale)) * height, min1, max1)
    )
    half2 = int(
        np.clip((settings.gamma_offset + rng.gamma(settings.gamma_shape, settings.gamma_scale)) * width, min2, max2)
    )
    for _ in range(settings.attempts):  # a source box with enough object in it
        c1, c2 = int(rng.integers(min1, height - min1)), int(rng.integers(min2, width - min2))
        s1, e1 = max(c1 - half1, 0), min(c1 + half1, height)
        s2, e2 = max(c2 - half2, 0), min(c2 + half2, width)
        if source_object is None or source_object[s1:e1, s2:e2].mean() > settings.min_object:
            break
    else:
        return result, None
    patch = source[s1:e1, s2:e2]
    patch_object = None if source_object is None else source_object[s1:e1, s2:e2]
    h, w = patch.shape[:2]
    scale = float(np.clip(rng.normal(1.0, 0.5), *params.resize_bounds))  # random patch resizing
    new_h = int(np.clip(scale * h, min1, max1))
    new_w = int(np.clip(int(new_h / h * w), min2, max2))
    new_h = int(np.clip(int(new_w / w * h), min1, max1))
    patch = cv2.resize(patch, (new_w, new_h))
    if patch_object is not None:
        patch_object = cv2.resize(patch_object, (new_w, new_h))
    for _ in range(settings.attempts):  # a target spot where the source object overlaps the target object
        c1 = int(rng.integers(new_h // 2 + 1, height - new_h // 2 - 1))
        c2 = int(rng.integers(new_w // 2 + 1, width - new_w // 2 - 1))
        box = (slice(c1 - new_h // 2, c1 + (new_h + 1) // 2), slice(c2 - new_w // 2, c2 + (new_w + 1) // 2))
        if patch_object is None:
            break
        here = target_object[box]
        area = patch_object.sum()
        if (
            area / patch_object.size > settings.min_object
            and (here & patch_object).sum() / max(area, 1) > settings.min_overlap
        ):
            break
    else:
        return result, None
    if patch_object is None:
        region = blend = np.ones((new_h, new_w), dtype=np.uint8)
    else:  # the patch counts where either object is; the shared background is blended too (avoids seams)
        here = target_object[box]
        region = patch_object | here
        blend = region | ((1 - patch_object) & (1 - here))
    blend = 255 * blend.astype(np.uint8)
    blend[0], blend[-1], blend[:, 0], blend[:, -1] = 0, 0, 0, 0
    if (blend > 0).sum() < 50:  # seamlessClone fails on tiny masks
        return result, None
    centre = (box[1].stop - new_w // 2, box[0].start + new_h // 2)
    return cv2.seamlessClone(np.ascontiguousarray(patch), result, blend, centre, cv2.NORMAL_CLONE), (box, region)


def nsa_synthesize(
    target: np.ndarray, source: np.ndarray, rng: np.random.Generator, params: NSAParameters = DEFAULT_PARAMETERS,
    settings: NSASettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Blend 1–``settings.patches`` resized patches of ``source`` into ``target`` (uint8 RGB [H,W,3], same size).

    Returns the image and the float32 logistic intensity label [H,W] in [0,1]; threshold it at
    :data:`LABEL_THRESHOLD` for the training mask.
    """
    settings = settings or NSASettings()
    if source.shape != target.shape:
        raise ValueError(f"NSA source {source.shape} and target {target.shape} must have the same shape")
    target_object = object_mask(target, params.background)
    source_object = None if params.background is None else object_mask(source, params.background)
    result = target.copy()
    in_patch = np.zeros(target.shape[:2], dtype=np.uint8)
    for i in range(settings.patches):
        if i > 0 and rng.integers(2) == 0:
            continue
        result, placed = _blend_patch(result, source, target_object, source_object, params, settings, rng)
        if placed is not None:
            in_patch[placed[0]] = placed[1]
    change = cv2.absdiff(target, result).sum(axis=2, dtype=np.int32).astype(np.float32) / 3.0 * in_patch
    changed = cv2.medianBlur((change > settings.tolerance).astype(np.uint8), 5)
    return result, logistic_label(change * changed, changed, params.logistic).astype(np.float32)
