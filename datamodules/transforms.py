"""Image and mask reading plus paired transforms (albumentations 2.0.8, built in code from a typed spec).

Albumentations objects do not parse from LightningCLI YAML (ecosystem.md §3), so configs carry an
:class:`AugmentSpec` and :class:`PairedTransform` builds the ``Compose`` here. Spatial augmentations move image and
mask together (mask interpolation nearest); then the image is resized to ``image_size`` without cropping and the mask
to ``eval_size`` with nearest-neighbour.

Two image resizes exist (``resize``):

* ``antialias`` (default): one bicubic resize with an anti-aliasing filter (:func:`antialiased_resize`). Downscaling
  a 900 px MVTec image to 240 px without a low-pass filter would alias fine texture arbitrarily. The same torch
  operation runs inside exported models, so exports reproduce the datamodule exactly.
* ``authors``: the released PromptAD/FineGrainedAD chain (``datasets/dataset.py`` then the model transform): cv2
  bilinear to 1024×1024, then PIL bicubic (anti-aliased) to ``image_size`` on uint8 pixels. ``variant: code`` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fsad.errors import FsadError


class DataError(FsadError, ValueError):
    """A data file or dataset field is missing, unreadable or inconsistent."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit or float pixel data to 8 bits, keeping 8-bit data as is."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535 if array.max(initial=0) > 255 else 255
        return (array.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read any image (grayscale, RGBA, palette, 16-bit) as uint8 RGB [H,W,3]; errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                gray = _to_uint8(np.asarray(img))
                return np.repeat(gray[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def load_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as uint8 {0,1} [H,W]: every non-zero pixel (any channel, palette index) is a defect."""
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from None
    if array.ndim == 3:
        array = array.max(axis=2)
    return (array != 0).astype(np.uint8)


ResizeName = Literal["antialias", "authors"]
RESIZES: tuple[str, ...] = ("antialias", "authors")
#: The intermediate square size of the authors' chain (PromptAD ``datasets/dataset.py``).
AUTHORS_INTERMEDIATE_SIZE = 1024


def antialiased_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [B,C,H,W] in 0..255 → [B,C,size,size], bicubic with an anti-aliasing filter, clamped to 0..255.

    torch's anti-aliased bicubic follows PIL's filter support (a kernel widened by the scale factor when downscaling),
    so fine stripes average to grey instead of turning into arbitrary moiré.
    """
    resized = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return resized.clamp_(0.0, 255.0)


def authors_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] → uint8 [size,size,3] as the authors' code does: cv2 bilinear to 1024², then PIL bicubic."""
    intermediate = cv2.resize(image, (AUTHORS_INTERMEDIATE_SIZE, AUTHORS_INTERMEDIATE_SIZE))
    return np.asarray(Image.fromarray(intermediate).resize((size, size), Image.BICUBIC))


def resize_image(image: np.ndarray, size: int, resize: ResizeName) -> np.ndarray:
    """uint8 [H,W,3] → float32 [size,size,3] in 0..255 with the named resize."""
    if resize == "authors":
        return authors_resize(image, size).astype(np.float32)
    if resize != "antialias":
        raise DataError(f"data.resize: {resize!r} is not one of {list(RESIZES)}")
    tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()
    return antialiased_resize(tensor, size)[0].permute(1, 2, 0).numpy()


@dataclass
class AugmentSpec:
    """Training augmentations, all off by default. Probabilities in [0,1]; ``rotate_limit`` in degrees."""

    hflip_p: float = 0.0
    vflip_p: float = 0.0
    rotate_limit: float = 0.0
    rotate_p: float = 0.0
    color_jitter_p: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02

    def build(self) -> A.Compose | None:
        """The albumentations pipeline for these settings, or ``None`` when nothing is enabled."""
        steps: list[A.BasicTransform] = []
        if self.hflip_p > 0:
            steps.append(A.HorizontalFlip(p=self.hflip_p))
        if self.vflip_p > 0:
            steps.append(A.VerticalFlip(p=self.vflip_p))
        if self.rotate_p > 0 and self.rotate_limit > 0:
            steps.append(A.Rotate(limit=self.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=self.rotate_p))
        if self.color_jitter_p > 0:
            steps.append(
                A.ColorJitter(
                    brightness=self.brightness,
                    contrast=self.contrast,
                    saturation=self.saturation,
                    hue=self.hue,
                    p=self.color_jitter_p,
                )
            )
        if not steps:
            return None
        return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST, strict=True)


class PairedTransform:
    """Augment image and mask together, resize the image to ``image_size`` and the mask to ``eval_size``."""

    def __init__(
        self,
        image_size: int,
        eval_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        augment: AugmentSpec | None = None,
        resize: ResizeName = "antialias",
    ) -> None:
        if resize not in RESIZES:
            raise DataError(f"data.resize: {resize!r} is not one of {list(RESIZES)}")
        self.resize = resize
        self.image_size = image_size
        self.eval_size = eval_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.augment = augment.build() if augment is not None else None

    def set_random_seed(self, seed: int) -> None:
        """Reseed the augmentation pipeline (albumentations 2.0.8 repeats augmentations across workers otherwise)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB [H,W,3] and {0,1} mask [H,W] → normalised float [3,S,S] and uint8 mask [E,E]."""
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        resized = resize_image(image, self.image_size, self.resize)
        normalised = (resized / 255.0 - self.mean) / self.std
        if self.resize == "authors":  # their masks go through the same 1024² intermediate, nearest both times
            side = AUTHORS_INTERMEDIATE_SIZE
            mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST)
        eval_mask = cv2.resize(mask, (self.eval_size, self.eval_size), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(normalised.transpose(2, 0, 1).copy()), torch.from_numpy(eval_mask.astype(np.uint8))


def seed_worker_transforms(worker_id: int) -> None:
    """``worker_init_fn``: give each DataLoader worker's augmentation pipeline its own seed.

    ``torch.initial_seed()`` inside a worker is the loader's base seed plus the worker id, so workers differ and a
    fixed ``seed_everything`` still reproduces the whole run.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, PairedTransform):
        transform.set_random_seed(torch.initial_seed() % 2**32)
