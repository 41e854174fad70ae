"""Inference on new images: a folder tree (or one file) of any size and colour mode, plus the normal references.

``path`` is searched recursively; the prediction writer mirrors its subfolders.

The model needs its k-shot support set at predict time, so ``normal_dir`` names the user's normal reference images
(the k-shot draw and ``support.txt`` work as in training). Unreadable files are reported and skipped up-front: one
bad file never ends the run; they are listed in ``bad_files`` for the prediction writer.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from fsad.datamodules.base import Sample
from fsad.datamodules.folder import FolderDataModule
from fsad.datamodules.mvtec import IMAGE_SUFFIXES, list_images
from fsad.datamodules.transforms import DataError, load_rgb


def images_in_tree(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (factory dumps are nested), sorted by their path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class PredictFolderDataModule(FolderDataModule):
    """Predict on ``path`` (a folder or one image) with the k-shot support set drawn from ``normal_dir``.

    Optional ``validation_normal_dir`` / ``validation_abnormal_dir`` hold labelled images for fitting an F1
    threshold (see :class:`fsad.callbacks.predictions.PredictionWriter`).
    """

    dataset_name = "predict"

    def __init__(
        self,
        path: str,
        normal_dir: str,
        validation_normal_dir: str | None = None,
        validation_abnormal_dir: str | None = None,
        category: str = "custom",
        **kwargs: Any,
    ) -> None:
        super().__init__(normal_dir=normal_dir, category=category, **kwargs)
        self.path = Path(path).expanduser()
        self.validation_normal_dir = Path(validation_normal_dir).expanduser() if validation_normal_dir else None
        self.validation_abnormal_dir = Path(validation_abnormal_dir).expanduser() if validation_abnormal_dir else None
        self.predict_samples: list[Sample] = []
        self.bad_files: list[tuple[str, str]] = []

    def _readable_images(self, files: list[Path], label: int) -> list[Sample]:
        samples = []
        for file in files:
            try:
                load_rgb(file)
            except DataError as err:
                warnings.warn(f"skipping unreadable file: {err}", UserWarning, stacklevel=2)
                self.bad_files.append((str(file), str(err)))
                continue
            samples.append(Sample(str(file), label, self.category))
        return samples

    def setup(self, stage: str | None = None) -> None:
        if self.predict_samples:
            return
        if not self.path.exists():
            raise DataError(f"data.path: {self.path} does not exist")
        super().setup(stage)
        files = [self.path] if self.path.is_file() else images_in_tree(self.path)
        if not files:
            raise DataError(f"data.path: no JPG/PNG/BMP/TIFF images in {self.path} or its subfolders")
        self.predict_samples = self._readable_images(files, label=0)

    def collect_samples(self, split: str) -> list[Sample]:
        if split == "train":
            return [Sample(str(p), 0, self.category) for p in list_images(self.normal_dir)]
        support = set(self.support_paths)
        return [s for s in self.normal_pool if s.image_path not in support] or self.support_samples

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.predict_samples, None, shuffle=False, batch_size=self.batch_size)

    def validation_samples(self) -> list[Sample]:
        """Labelled validation images for threshold fitting (empty without validation folders)."""
        normals = list_images(self.validation_normal_dir) if self.validation_normal_dir else []
        defects = list_images(self.validation_abnormal_dir) if self.validation_abnormal_dir else []
        return self._readable_images(normals, 0) + self._readable_images(defects, 1)

    def validation_loader(self) -> DataLoader:
        return self._loader(self.validation_samples(), None, shuffle=False, batch_size=self.batch_size)
