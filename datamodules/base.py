"""The few-shot datamodule base: one category per run, a recorded k-shot support set, batches in the fsad contract."""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader, Dataset

from fsad.batch import collate_batch
from fsad.datamodules.kshot import (
    SupportPreset,
    preset_support,
    resolve_support_files,
    sample_support,
    write_support_list,
)
from fsad.datamodules.transforms import (
    AugmentSpec,
    DataError,
    PairedTransform,
    ResizeName,
    load_mask,
    load_rgb,
    seed_worker_transforms,
)
from fsad.run_folder import output_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split. ``label`` is 1 for anomalous; ``mask_path`` is None for normal images."""

    image_path: str
    label: int
    category: str
    mask_path: str | None = None
    defect: str = "good"


class AnomalyDataset(Dataset):
    """Reads samples from disk and returns the input fields of :class:`fsad.batch.Batch` for each."""

    def __init__(self, samples: Sequence[Sample], transform: PairedTransform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def read(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """The sample's RGB image and its mask (zeros for a normal image), checked to be the same size."""
        image = load_rgb(sample.image_path)
        if sample.mask_path is not None:
            mask = load_mask(sample.mask_path)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {sample.image_path} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
        else:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image_tensor, mask_tensor = self.transform(*self.read(sample))
        return {
            "image": image_tensor,
            "gt_mask": mask_tensor,
            "gt_label": sample.label,
            "image_path": sample.image_path,
            "mask_path": sample.mask_path,
            "category": sample.category,
            "index": index,
        }


class FewShotDataModule(LightningDataModule, ABC):
    """Serves the k-shot normal support set, what the method trains on, and the test set of one category.

    Args:
        root: dataset root folder (required unless the datamodule has a :meth:`default_root`).
        category: the one category of this run.
        k_shot: number of normal support images; 0 for zero-shot methods (no support set; ``support.txt`` says so in a comment line).
        seed: seed of the k-shot draw (a pure function of seed, sorted file names and k).
        image_size: side of the backbone input; the CLI links it to ``model.image_size``.
        eval_size: side at which masks (and maps) are evaluated; linked to ``model.eval_size``.
        batch_size: test/predict batch size (the support set is one batch when it fits).
        num_workers: DataLoader workers.
        augment: training augmentations (off by default).
        support_files: explicit support picks (file names or paths) for paper parity; overrides the draw.
        support_preset: the authors' published picks instead of the seeded draw: ``promptad`` (MVTec-AD, VisA;
            index ``i`` = the ``i``-th of the sorted normal training files) or ``finegrainedad`` (Real-IAD). One
            draw per k: ``seed`` does not change the picks. See :func:`fsad.datamodules.kshot.preset_support`.
        support_preset_root: the authors' ``datasets/`` folder holding their ``seeds_*`` folders (or one picks
            file); ``None`` reads the packaged copy of PromptAD's lists.
        skip_bad_files: drop unreadable images with a warning instead of failing.
        resize: image resize, ``antialias`` (default) or ``authors`` (the PromptAD/FineGrainedAD chain, for
            ``variant: code``); see :mod:`fsad.datamodules.transforms`.
        mean: normalisation mean (the backbone's; CLIP's by default).
        std: normalisation std (the backbone's; CLIP's by default).
    """

    dataset_name: ClassVar[str] = "custom"

    def __init__(
        self,
        root: str | None,
        category: str,
        k_shot: int = 4,
        seed: int = 0,
        image_size: int = 240,
        eval_size: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        augment: AugmentSpec | None = None,
        support_files: list[str] | None = None,
        support_preset: SupportPreset | None = None,
        support_preset_root: str | None = None,
        skip_bad_files: bool = False,
        resize: ResizeName = "antialias",
        mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
        std: tuple[float, float, float] = OPENAI_DATASET_STD,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if root is None and self.default_root() is None:
            raise DataError(f"data.root is required for {type(self).__name__}: set --data.init_args.root")
        if batch_size < 1:
            raise DataError(f"data.batch_size must be a positive number of images per batch, got {batch_size}")
        self.root = Path(root).expanduser() if root is not None else self.default_root()
        self.category = category
        self.k_shot = k_shot
        self.seed = seed
        self.image_size = image_size
        self.eval_size = eval_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.support_files = support_files
        if support_files and support_preset:
            raise DataError("data.support_files and data.support_preset both choose the support set; give one")
        self.support_preset = support_preset
        self.support_preset_root = support_preset_root
        self.skip_bad_files = skip_bad_files
        self.resize = resize
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normal_pool: list[Sample] = []
        self.support_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.problems: list[str] | None = None

    def problem(self, message: str) -> None:
        """Raise one clear :class:`DataError`, or record it when a data check collects every problem."""
        if self.problems is None:
            raise DataError(message)
        self.problems.append(message)

    @classmethod
    def default_root(cls) -> Path | None:
        """Where the dataset lives when ``root`` is not given; ``None``: the root is required."""
        return None

    @classmethod
    def run_key(cls, init_args: dict[str, Any]) -> tuple[str, str, int, int]:
        """(dataset, category, k, seed) naming a run's directory, from the datamodule's init arguments."""
        return (
            cls.dataset_name,
            str(init_args.get("category")),
            int(init_args.get("k_shot", 4)),
            int(init_args.get("seed", 0)),
        )

    # ----------------------------------------------------------------- dataset-specific parts
    @abstractmethod
    def available_categories(self) -> list[str]:
        """Categories present under ``root`` (used to validate ``category`` and in error messages)."""

    @abstractmethod
    def collect_samples(self, split: str) -> list[Sample]:
        """All samples of ``split`` (``train``: normal images only; ``test``: normal and anomalous).

        The support set is already chosen when ``test`` is collected. Report bad data through :meth:`problem`.
        """

    # ----------------------------------------------------------------- setup
    @property
    def support_paths(self) -> list[str]:
        return [s.image_path for s in self.support_samples]

    def check_root(self) -> None:
        """Fail with the categories found when the root or the category is missing."""
        if not self.root.is_dir():
            raise DataError(f"data.root: dataset root {self.root} does not exist")
        found = self.available_categories()
        if self.category not in found:
            raise DataError(
                f"data.category: {self.category!r} not found under {self.root}; categories found: {found or 'none'}"
            )

    def _readable(self, samples: list[Sample]) -> list[Sample]:
        """With ``skip_bad_files``, drop samples whose image cannot be decoded, warning once per file."""
        if not self.skip_bad_files:
            return samples
        kept = []
        for sample in samples:
            try:
                load_rgb(sample.image_path)
            except DataError as err:
                warnings.warn(f"skipping unreadable file: {err}", UserWarning, stacklevel=2)
                continue
            kept.append(sample)
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.test_samples:
            return
        self.check_root()
        self.normal_pool = self._readable(self.collect_samples("train"))
        by_path = {s.image_path: s for s in self.normal_pool}
        if self.k_shot == 0 and (self.support_files or self.support_preset):
            raise DataError("data.k_shot: 0 (zero-shot) takes no support set; drop data.support_files/support_preset")
        if self.k_shot == 0:
            chosen = []
        elif self.support_files:
            chosen = resolve_support_files(list(by_path), self.support_files)
        elif self.support_preset:
            chosen = preset_support(
                self.support_preset, self.support_preset_root, self.dataset_name, self.category, list(by_path),
                self.k_shot, getattr(self, "views", None),
            )  # fmt: skip
        else:
            chosen = sample_support(list(by_path), self.k_shot, self.seed)
        self.support_samples = [by_path[p] for p in chosen]
        self.test_samples = self._readable(self.collect_samples("test"))
        if not self.test_samples:
            raise DataError(f"no test images found for category {self.category!r} under {self.root}")
        self.record_support()

    @rank_zero_only
    def record_support(self) -> None:
        """Write ``support.txt`` (a zero-shot note when ``k_shot`` is 0) into the run directory and log the picks to every logger that takes tables."""
        trainer = self.trainer
        if trainer is None:
            return
        write_support_list(self.support_paths, output_path(trainer.default_root_dir, "support.txt"))
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                try:
                    logger.log_table(
                        key="support_set",
                        columns=["rank", "path"],
                        data=[[i, p] for i, p in enumerate(self.support_paths)],
                    )
                except Exception as err:  # a logger failing to log must not end the run
                    warnings.warn(f"could not log the support set to {type(logger).__name__}: {err}", stacklevel=2)

    # ----------------------------------------------------------------- loaders
    def make_transform(self, augment: AugmentSpec | None = None) -> PairedTransform:
        return PairedTransform(self.image_size, self.eval_size, self.mean, self.std, augment, self.resize)

    def _loader(self, samples: list[Sample], augment: AugmentSpec | None, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            AnomalyDataset(samples, self.make_transform(augment)),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            worker_init_fn=seed_worker_transforms,
            persistent_workers=False,
        )

    def support_images(self, size: int) -> torch.Tensor:
        """The k-shot support images, unaugmented, read from their files at ``size`` pixels (this datamodule's resize
        rule) and normalised: [K,3,size,size]. FineGrainedAD's region aggregation reads them at high resolution."""
        self.setup()
        transform = PairedTransform(size, self.eval_size, self.mean, self.std, None, self.resize)
        pictures = [load_rgb(s.image_path) for s in self.support_samples]
        return torch.stack([transform(p, np.zeros(p.shape[:2], dtype=np.uint8))[0] for p in pictures])

    def support_dataloader(self) -> DataLoader:
        """The k-shot normal references, unaugmented, in a fixed order."""
        self.setup()
        return self._loader(self.support_samples, None, shuffle=False, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """What prompt methods train on: the support set (augmented if configured), all shots in one batch."""
        self.setup()
        return self._loader(self.support_samples, self.augment, shuffle=True, batch_size=len(self.support_samples))

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_samples, None, shuffle=False, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
