"""A small procedural dataset in MVTec-AD layout, for the demo and the tests (no download needed).

Two categories: ``disc`` (a striped grey disc on a dark background, an object category) and ``tile`` (a periodic
beige texture). Defects are obvious painted blobs and scratches whose masks are exactly the painted pixels.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fsad.datamodules.mvtec import MVTecDataModule

SYNTHETIC_CATEGORIES = ("disc", "tile")
SYNTHETIC_VERSION = "v1"
IMAGE_SIDE = 128
COUNTS = {"train_good": 10, "test_good": 6, "paint": 8, "scratch": 6}


def default_synthetic_root() -> Path:
    """``$FSAD_CACHE_DIR`` or ``~/.cache/fsad``, plus a versioned folder name."""
    base = Path(os.environ.get("FSAD_CACHE_DIR", Path.home() / ".cache" / "fsad"))
    return base / f"synthetic-{SYNTHETIC_VERSION}"


def _normal_image(category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A normal RGB image and the boolean region where defects may be painted."""
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32)
    noise = rng.normal(0.0, 4.0, (IMAGE_SIDE, IMAGE_SIDE, 1)).astype(np.float32)
    if category == "tile":
        phase = rng.uniform(0, 2 * np.pi, 2)
        wave = np.sin(xx / 5.0 + phase[0]) * np.sin(yy / 5.0 + phase[1])
        base = np.array([200.0, 180.0, 140.0], dtype=np.float32)
        image = base + 25.0 * wave[..., None] + noise
        region = np.ones((IMAGE_SIDE, IMAGE_SIDE), dtype=bool)
    else:
        cy, cx = IMAGE_SIDE / 2 + rng.uniform(-3, 3, 2)
        radius = IMAGE_SIDE * 0.36
        dist = np.hypot(yy - cy, xx - cx)
        angle = np.arctan2(yy - cy, xx - cx)
        stripes = 0.5 + 0.5 * np.sin(12 * angle + rng.uniform(0, 2 * np.pi))
        disc = dist < radius
        image = np.full((IMAGE_SIDE, IMAGE_SIDE, 3), 30.0, dtype=np.float32) + noise
        grey = 120.0 + 60.0 * stripes
        image[disc] = np.stack([grey, grey, grey * 0.95], axis=-1)[disc] + noise[disc]
        region = dist < radius * 0.8
    return np.clip(image, 0, 255).astype(np.uint8), region


def _paint_defect(image: np.ndarray, region: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Paint one obvious defect inside ``region``; return the mask of exactly the painted pixels."""
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    ys, xs = np.nonzero(region)
    pick = rng.integers(len(ys))
    centre = (int(xs[pick]), int(ys[pick]))
    colour = [(220, 30, 30), (30, 60, 220), (30, 200, 60)][int(rng.integers(3))]
    if kind == "paint":
        axes = (int(rng.integers(6, 14)), int(rng.integers(6, 14)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    else:
        length = rng.integers(25, 45)
        angle = rng.uniform(0, np.pi)
        end = (int(centre[0] + length * np.cos(angle)), int(centre[1] + length * np.sin(angle)))
        cv2.line(mask, centre, end, 1, thickness=4)
    image[mask.astype(bool)] = colour
    return mask


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")


def generate_synthetic_dataset(root: str | Path, seed: int = 0) -> Path:
    """Write the dataset under ``root`` unless it is already complete; return ``root``.

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted run leaves nothing
    half-written. The content is a pure function of ``seed``.
    """
    root = Path(root).expanduser()
    if (root / ".complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    try:
        for cat_index, category in enumerate(SYNTHETIC_CATEGORIES):
            rng = np.random.default_rng([seed, cat_index])
            base = staging / category
            for i in range(COUNTS["train_good"]):
                _write_png(base / "train" / "good" / f"{i:03d}.png", _normal_image(category, rng)[0])
            for i in range(COUNTS["test_good"]):
                _write_png(base / "test" / "good" / f"{i:03d}.png", _normal_image(category, rng)[0])
            for kind in ("paint", "scratch"):
                for i in range(COUNTS[kind]):
                    image, region = _normal_image(category, rng)
                    mask = _paint_defect(image, region, kind, rng)
                    _write_png(base / "test" / kind / f"{i:03d}.png", image)
                    _write_png(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask * 255)
        (staging / ".complete").write_text(f"synthetic {SYNTHETIC_VERSION} seed={seed}\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root


class SyntheticDataModule(MVTecDataModule):
    """The procedural demo dataset, generated on first use, then read through the MVTec-AD parser."""

    dataset_name = "synthetic"

    def __init__(self, root: str | None = None, category: str = "disc", **kwargs: Any) -> None:
        """``root`` defaults to the generated dataset's folder; other arguments as :class:`FewShotDataModule`."""
        super().__init__(root=root, category=category, **kwargs)

    @classmethod
    def default_root(cls) -> Path:
        return default_synthetic_root()

    def prepare_data(self) -> None:
        generate_synthetic_dataset(self.root)

    def setup(self, stage: str | None = None) -> None:
        generate_synthetic_dataset(self.root)
        super().setup(stage)
