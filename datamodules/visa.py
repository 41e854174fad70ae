"""VisA: the raw release read through ``split_csv/1cls.csv``, or the prepared MVTec-like layout.

Raw layout: ``root/<cat>/Data/{Images,Masks}/{Normal,Anomaly}/...`` and ``root/split_csv/1cls.csv`` with columns
``object,split,label,image,mask`` (paths relative to ``root``; label ``normal`` or ``anomaly``). Images are about
1500×1000: they are resized, never centre-cropped. Masks hold label values 1..N and are binarised as ≠ 0.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fsad.datamodules.base import FewShotDataModule, Sample
from fsad.datamodules.mvtec import mvtec_layout_samples
from fsad.datamodules.transforms import DataError

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")


class VisADataModule(FewShotDataModule):
    """VisA, one category per run; the raw release is used when ``split_csv/1cls.csv`` exists under ``root``."""

    dataset_name = "visa"

    @property
    def raw_layout(self) -> bool:
        return (self.root / SPLIT_CSV).is_file()

    def _rows(self) -> list[dict[str, str]]:
        path = self.root / SPLIT_CSV
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing columns {missing}; expected {list(CSV_COLUMNS)}")
            return list(reader)

    def available_categories(self) -> list[str]:
        if self.raw_layout:
            return sorted({row["object"] for row in self._rows()})
        return sorted(p.name for p in self.root.iterdir() if (p / "train" / "good").is_dir())

    def collect_samples(self, split: str) -> list[Sample]:
        if not self.raw_layout:
            return mvtec_layout_samples(self, self.root / self.category, split)
        samples = []
        for line, row in enumerate(self._rows(), start=2):
            if row["object"] != self.category or row["split"] != split:
                continue
            image = self.root / row["image"]
            if not image.is_file():
                self.problem(f"{self.root / SPLIT_CSV} line {line}: image {image} does not exist")
                continue
            if row["label"] == "normal":
                samples.append(Sample(str(image), 0, self.category))
                continue
            if row["label"] != "anomaly":
                self.problem(f"{self.root / SPLIT_CSV} line {line}: label {row['label']!r} is not normal/anomaly")
                continue
            mask = self.root / row["mask"] if row["mask"] else None
            if mask is None or not mask.is_file():
                self.problem(f"mask missing for defect image {image}: {mask or 'no mask in the csv'}")
                continue
            samples.append(Sample(str(image), 1, self.category, str(mask), "anomaly"))
        return samples
