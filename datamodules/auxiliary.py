"""Auxiliary training data for KAG-prompt (one dataset's normal images plus their NSA-synthesised anomalies) and
APRIL-GAN (one dataset's test split: real anomalies with their masks, ``split: test``).

KAG-prompt trains on a different dataset than it tests on (VisA → MVTec-AD and the reverse); every normal image
yields a clean sample (label 0, empty mask) and an NSA sample (label 1, the authors' logistic intensity label > 0.3),
the NSA source coming from another normal image of the same category. Synthesis runs at the training resolution on
images resized once and cached on disk. The anomaly is fresh every epoch and a pure function of (seed, epoch, index):
:class:`EpochSampler` hands ``(epoch, index)`` pairs to the dataset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from lightning.pytorch import LightningDataModule
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader, Dataset, Sampler

from fsad.batch import collate_batch
from fsad.datamodules.base import AnomalyDataset, FewShotDataModule, Sample
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.synthesis import LABEL_THRESHOLD, NSASettings, nsa_synthesize, parameters_for
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.datamodules.transforms import DataError, PairedTransform, load_rgb, seed_worker_transforms
from fsad.datamodules.visa import VisADataModule

SOURCES: dict[str, type[FewShotDataModule]] = {
    "mvtec": MVTecDataModule,
    "visa": VisADataModule,
    "synthetic": SyntheticDataModule,
}


def resized_cache_dir(size: int) -> Path:
    """``$FSAD_CACHE_DIR/nsa_<size>`` (default ``~/.cache/fsad``): training images resized once for synthesis."""
    return Path(os.environ.get("FSAD_CACHE_DIR", Path.home() / ".cache" / "fsad")) / f"nsa_{size}"


def load_resized(path: str, size: int) -> np.ndarray:
    """The image at ``size``×``size`` (cv2 area resize), read from the disk cache when present (keyed by the
    absolute path, modification time and file size), decoded and cached otherwise."""
    stat = Path(path).stat()
    key = hashlib.sha1(f"{Path(path).resolve()}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()
    cached = resized_cache_dir(size) / f"{key}.npy"
    if cached.is_file():
        try:
            return np.load(cached)
        except (OSError, ValueError):
            pass  # a partial write from another process; decode again
    image = cv2.resize(load_rgb(path), (size, size), interpolation=cv2.INTER_AREA)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    with partial.open("wb") as handle:
        np.save(handle, image)
    partial.replace(cached)
    return image


class EpochSampler(Sampler):
    """Shuffles the indices with a generator seeded from (seed, epoch) and yields ``(epoch, index)`` pairs.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also after resuming), so the epoch a sample is
    synthesised for is the trainer's.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
            if self.shuffle
            else range(self.length)
        )
        return iter([(self.epoch, int(i)) for i in order])


class NSADataset(Dataset):
    """Item 2i is normal image i; item 2i+1 is the same image with NSA patches from another image of its category.

    Items are addressed by ``(epoch, index)`` (a bare index means epoch 0); with ``synthesis=False`` every item is a
    normal image (the "w/o NSA" ablation).
    """

    def __init__(
        self, samples: list[Sample], transform: PairedTransform, seed: int, image_size: int, synthesis: bool = True,
        settings: NSASettings | None = None,
    ) -> None:  # fmt: skip
        self.samples, self.transform, self.seed, self.image_size = samples, transform, seed, image_size
        self.synthesis, self.settings = synthesis, settings or NSASettings()
        self.by_category: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            self.by_category.setdefault(sample.category, []).append(i)

    def __len__(self) -> int:
        return 2 * len(self.samples) if self.synthesis else len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        position = index // 2 if self.synthesis else index
        sample = self.samples[position]
        image = load_resized(sample.image_path, self.image_size)
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        label = index % 2 if self.synthesis else 0
        if label:
            rng = np.random.default_rng([self.seed, epoch, index])
            peers = [p for p in self.by_category[sample.category] if p != position] or [position]
            source = self.samples[peers[int(rng.integers(len(peers)))]]
            image, intensity = nsa_synthesize(
                image, load_resized(source.image_path, self.image_size), rng, parameters_for(sample.category),
                self.settings,
            )  # fmt: skip
            mask = (intensity > LABEL_THRESHOLD).astype(np.uint8)
        image_tensor, mask_tensor = self.transform(image, mask)
        return {
            "image": image_tensor, "gt_mask": mask_tensor, "gt_label": label, "image_path": sample.image_path,
            "mask_path": None, "category": sample.category, "index": index,
        }  # fmt: skip


class MosaicDataset(Dataset):
    """Test-split items with real masks; with probability ``rate`` an item becomes a 2×2 mosaic of four test images of
    its category (APRIL-GAN's MVTec-AD training augmentation: each tile's defect type drawn uniformly, then a file of
    it; pasted at the first tile's size, masks likewise). Items are addressed by ``(epoch, index)`` as
    :class:`NSADataset`, so the draw is a pure function of (seed, epoch, index).
    """

    def __init__(self, samples: list[Sample], transform: PairedTransform, seed: int, rate: float) -> None:
        self.items, self.seed, self.rate = AnomalyDataset(samples, transform), seed, rate
        self.by_defect: dict[str, dict[str, list[Sample]]] = {}
        for sample in samples:
            self.by_defect.setdefault(sample.category, {}).setdefault(sample.defect, []).append(sample)

    def __len__(self) -> int:
        return len(self.items)

    def mosaic(self, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Four test images of ``category`` and their masks tiled 2×2 (row-major)."""
        defects = self.by_defect[category]
        names = sorted(defects)
        tiles = []
        for _ in range(4):
            files = defects[names[int(rng.integers(len(names)))]]
            tiles.append(AnomalyDataset.read(files[int(rng.integers(len(files)))]))
        height, width = tiles[0][0].shape[:2]
        image = np.zeros((2 * height, 2 * width, 3), dtype=tiles[0][0].dtype)
        mask = np.zeros((2 * height, 2 * width), dtype=tiles[0][1].dtype)
        for position, (tile, tile_mask) in enumerate(tiles):
            top, left = (position // 2) * height, (position % 2) * width
            h, w = min(height, tile.shape[0]), min(width, tile.shape[1])
            image[top : top + h, left : left + w] = tile[:h, :w]
            mask[top : top + h, left : left + w] = tile_mask[:h, :w]
        return image, mask

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        rng = np.random.default_rng([self.seed, epoch, index])
        if rng.random() >= self.rate:
            return self.items[index]
        sample = self.items.samples[index]
        image, mask = self.mosaic(sample.category, rng)
        image_tensor, mask_tensor = self.items.transform(image, mask)
        return {
            "image": image_tensor, "gt_mask": mask_tensor, "gt_label": int(mask.any()),
            "image_path": sample.image_path, "mask_path": None, "category": sample.category, "index": index,
        }  # fmt: skip


class AuxiliaryDataModule(LightningDataModule):
    """Training data for cross-dataset training (KAG-prompt, APRIL-GAN).

    Args:
        root: root of the training dataset (its own layout, as its few-shot datamodule reads it).
        dataset: ``mvtec``, ``visa`` or ``synthetic`` (the demo data; ``root`` may then be null).
        categories: categories to train on; ``None`` takes every category found.
        image_size, eval_size, batch_size, num_workers: as :class:`FewShotDataModule`.
        seed: seed of the NSA anomalies and of the shuffling (fresh anomalies each epoch from (seed, epoch, index)).
        synthesis: False = normal images only (the "w/o NSA" ablation).
        split: ``train`` = the normal training images (with NSA anomalies); ``test`` = the test split with its real
            anomalies and masks, no synthesis (APRIL-GAN trains on the other dataset's test images and masks).
        mosaic_rate: with ``split: test``, the probability that an item becomes a 2×2 mosaic of four test images of its
            category (:class:`MosaicDataset`; the APRIL-GAN authors use 0.2 on MVTec-AD, 0 on VisA).
        nsa_patches, nsa_min_overlap, nsa_tolerance: :class:`NSASettings` (the authors' 2, 0.25, 1 grey level); the
            per-category parameters are the table ``NSA_PARAMETERS`` in ``datamodules/synthesis.py``.
    """

    category = "all"
    k_shot = 0

    @classmethod
    def run_key(cls, init_args: dict[str, Any]) -> tuple[str, str, int, int]:
        """Runs land in ``<method>/<dataset>_aux/all/k0_s<seed>``."""
        return f"{init_args.get('dataset', 'visa')}_aux", "all", 0, int(init_args.get("seed", 0))

    def __init__(
        self,
        root: str | None = None,
        dataset: Literal["mvtec", "visa", "synthetic"] = "visa",
        categories: list[str] | None = None,
        image_size: int = 240,
        eval_size: int = 224,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
        std: tuple[float, float, float] = OPENAI_DATASET_STD,
        synthesis: bool = True,
        nsa_patches: int = 2,
        nsa_min_overlap: float = 0.25,
        nsa_tolerance: float = 1.0,
        split: Literal["train", "test"] = "train",
        mosaic_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if dataset not in SOURCES:
            raise ValueError(f"data.dataset: {dataset!r} is not one of {sorted(SOURCES)}")
        if root is None and dataset != "synthetic":
            raise ValueError(f"data.root is required for the {dataset} training dataset")
        if split not in ("train", "test"):
            raise ValueError(f"data.split: {split!r} is not 'train' or 'test'")
        if not 0.0 <= mosaic_rate <= 1.0 or (mosaic_rate and split != "test"):
            raise ValueError(f"data.mosaic_rate: {mosaic_rate} must lie in [0, 1] and needs split: test")
        self.save_hyperparameters()
        self.root, self.source, self.categories = root, dataset, categories
        self.image_size, self.eval_size, self.batch_size = image_size, eval_size, batch_size
        self.num_workers, self.seed, self.mean, self.std = num_workers, seed, tuple(mean), tuple(std)
        self.synthesis, self.split, self.mosaic_rate = synthesis, split, mosaic_rate
        self.nsa_settings = NSASettings(patches=nsa_patches, min_overlap=nsa_min_overlap, tolerance=nsa_tolerance)
        self.dataset_name = f"{dataset}_aux"
        self.samples: list[Sample] = []

    def _category_module(self, category: str) -> FewShotDataModule:
        return SOURCES[self.source](root=self.root, category=category, k_shot=1)

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        probe = self._category_module(self.categories[0] if self.categories else "probe")
        if self.source == "synthetic":
            probe.prepare_data()
        found = probe.available_categories()
        chosen = self.categories or found
        missing = [c for c in chosen if c not in found]
        if missing:
            raise DataError(f"data.categories: {missing} not found under {probe.root}; categories found: {found}")
        for category in chosen:
            self.samples += self._category_module(category).collect_samples(self.split)
        if not self.samples:
            raise DataError(f"no {self.split} images found under {probe.root}")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        transform = PairedTransform(self.image_size, self.eval_size, self.mean, self.std)
        if self.split == "test":  # real anomalies and masks (and mosaics of them)
            dataset = MosaicDataset(self.samples, transform, self.seed, self.mosaic_rate)
        else:
            dataset = NSADataset(self.samples, transform, self.seed, self.image_size, self.synthesis, self.nsa_settings)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=EpochSampler(len(dataset), self.seed),
            num_workers=self.num_workers, collate_fn=collate_batch, worker_init_fn=seed_worker_transforms,
        )  # fmt: skip
