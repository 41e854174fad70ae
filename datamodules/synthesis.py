"""NSA (natural synthetic anomalies): patches of one normal image Poisson-blended into another (KAG-prompt's
training anomalies; the authors use ``cv2.seamlessClone`` with ``NORMAL_CLONE``, 1–2 patches).

The mask marks exactly the pixels the blending changed. Everything random comes from the ``rng`` passed in.
"""

from __future__ import annotations

import cv2
import numpy as np


def object_region(image: np.ndarray, threshold: float = 30.0) -> np.ndarray:
    """Pixels that differ from the border's median colour by more than ``threshold``; the whole image when that
    covers less than 2% or more than 90% of it (textures, or no clear object)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    distance = np.linalg.norm(image.astype(np.float32) - np.median(border, axis=0), axis=2)
    region = distance > threshold
    share = region.mean()
    return region if 0.02 <= share <= 0.9 else np.ones(image.shape[:2], dtype=bool)


def nsa_synthesize(
    target: np.ndarray,
    source: np.ndarray,
    rng: np.random.Generator,
    patches: tuple[int, int] = (1, 2),
    size_range: tuple[float, float] = (0.1, 0.35),
) -> tuple[np.ndarray, np.ndarray]:
    """Blend 1–2 random patches of ``source`` into ``target`` (both uint8 RGB [H,W,3], any sizes).

    Patch sides are ``size_range`` of the target's shorter side; patches are cut inside the source object and
    centred inside the target object. Returns the image and the uint8 {0,1} mask of exactly the changed pixels.
    """
    height, width = target.shape[:2]
    source = cv2.resize(source, (width, height), interpolation=cv2.INTER_AREA) if source.shape != target.shape else source
    result = target.copy()
    target_region, source_region = object_region(target), object_region(source)
    for _ in range(int(rng.integers(patches[0], patches[1] + 1))):
        side = min(height, width)
        ph = int(rng.uniform(*size_range) * side) | 1
        pw = int(rng.uniform(*size_range) * side) | 1
        ys, xs = np.nonzero(source_region[ph // 2 : height - ph // 2, pw // 2 : width - pw // 2])
        pick = int(rng.integers(len(ys)))
        sy, sx = ys[pick], xs[pick]  # top-left corner of the patch in the source
        patch = source[sy : sy + ph, sx : sx + pw]
        margin_y, margin_x = ph // 2 + 2, pw // 2 + 2
        ty, tx = np.nonzero(target_region[margin_y : height - margin_y, margin_x : width - margin_x])
        pick = int(rng.integers(len(ty)))
        centre = (int(tx[pick] + margin_x), int(ty[pick] + margin_y))
        blend_mask = np.full(patch.shape[:2], 255, dtype=np.uint8)
        result = cv2.seamlessClone(np.ascontiguousarray(patch), result, blend_mask, centre, cv2.NORMAL_CLONE)
    changed = np.any(result != target, axis=2).astype(np.uint8)
    return result, changed
