"""Auxiliary training data for KAG-prompt: one dataset's normal images plus their NSA-synthesised anomalies.

KAG-prompt trains on a different dataset than it tests on (VisA → MVTec-AD and the reverse); every normal image
yields a clean sample (label 0, empty mask) and an NSA sample (label 1, mask of the changed pixels), the NSA source
patch coming from another normal image of the same category. Anomalies are a pure function of (seed, index).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader, Dataset

from fsad.batch import collate_batch
from fsad.datamodules.base import FewShotDataModule, Sample
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.synthesis import nsa_synthesize
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.datamodules.transforms import DataError, PairedTransform, load_rgb, seed_worker_transforms
from fsad.datamodules.visa import VisADataModule

SOURCES: dict[str, type[FewShotDataModule]] = {
    "mvtec": MVTecDataModule,
    "visa": VisADataModule,
    "synthetic": SyntheticDataModule,
}


class NSADataset(Dataset):
    """Item 2i is normal image i; item 2i+1 is the same image with NSA patches from another image of its category."""

    def __init__(self, samples: list[Sample], transform: PairedTransform, seed: int) -> None:
        self.samples, self.transform, self.seed = samples, transform, seed
        self.by_category: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            self.by_category.setdefault(sample.category, []).append(i)

    def __len__(self) -> int:
        return 2 * len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index // 2]
        image = load_rgb(sample.image_path)
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        label = index % 2
        if label:
            rng = np.random.default_rng([self.seed, index])
            peers = self.by_category[sample.category]
            source = self.samples[peers[int(rng.integers(len(peers)))]]
            image, mask = nsa_synthesize(image, load_rgb(source.image_path), rng)
        image_tensor, mask_tensor = self.transform(image, mask)
        return {
            "image": image_tensor, "gt_mask": mask_tensor, "gt_label": label, "image_path": sample.image_path,
            "mask_path": None, "category": sample.category, "index": index,
        }  # fmt: skip


class AuxiliaryDataModule(LightningDataModule):
    """Training data for cross-dataset KAG-prompt training.

    Args:
        root: root of the training dataset (its own layout, as its few-shot datamodule reads it).
        dataset: ``mvtec``, ``visa`` or ``synthetic`` (the demo data; ``root`` may then be null).
        categories: categories to train on; ``None`` takes every category found.
        image_size, eval_size, batch_size, num_workers: as :class:`FewShotDataModule`.
        seed: seed of the NSA anomalies.
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
    ) -> None:
        super().__init__()
        if dataset not in SOURCES:
            raise ValueError(f"data.dataset: {dataset!r} is not one of {sorted(SOURCES)}")
        if root is None and dataset != "synthetic":
            raise ValueError(f"data.root is required for the {dataset} training dataset")
        self.save_hyperparameters()
        self.root, self.source, self.categories = root, dataset, categories
        self.image_size, self.eval_size, self.batch_size = image_size, eval_size, batch_size
        self.num_workers, self.seed, self.mean, self.std = num_workers, seed, tuple(mean), tuple(std)
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
            self.samples += self._category_module(category).collect_samples("train")
        if not self.samples:
            raise DataError(f"no normal training images found under {probe.root}")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        transform = PairedTransform(self.image_size, self.eval_size, self.mean, self.std)
        return DataLoader(
            NSADataset(self.samples, transform, self.seed), batch_size=self.batch_size, shuffle=True,
            num_workers=self.num_workers, collate_fn=collate_batch, worker_init_fn=seed_worker_transforms,
        )  # fmt: skip
