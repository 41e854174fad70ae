"""A user's own product: folders of normal images, defect images and masks (masks matched by file stem)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from fsad.datamodules.base import FewShotDataModule, Sample
from fsad.datamodules.mvtec import find_mask, list_images, missing_mask_message
from fsad.datamodules.transforms import DataError


class FolderDataModule(FewShotDataModule):
    """Few-shot anomaly detection on your own folders.

    Args:
        normal_dir: normal images; the k-shot support set is drawn from them.
        abnormal_dir: defect images for testing (optional).
        mask_dir: masks of the defect images, named ``<stem>.png`` or ``<stem>_mask.png``. Optional: without it the
            defect images have no pixel ground truth, only image metrics are meaningful, and setup warns. With it, a
            defect image without a mask is an error naming both files.
        normal_test_dir: normal test images. Without it, the normal images not picked for the support set are the
            normal test images (never the support images themselves).
        category: a name for your product (used in the run directory and the results).
        Other arguments as :class:`FewShotDataModule`; ``root`` defaults to the parent of ``normal_dir``.
    """

    dataset_name = "folder"

    def __init__(
        self,
        normal_dir: str,
        abnormal_dir: str | None = None,
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
        category: str = "custom",
        root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root or str(Path(normal_dir).expanduser().parent), category=category, **kwargs)
        self.normal_dir = Path(normal_dir).expanduser()
        self.abnormal_dir = Path(abnormal_dir).expanduser() if abnormal_dir else None
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir else None
        self.normal_test_dir = Path(normal_test_dir).expanduser() if normal_test_dir else None

    def check_root(self) -> None:
        for name in ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir"):
            folder = getattr(self, name)
            if folder is not None and not folder.is_dir():
                raise DataError(f"data.{name}: folder {folder} does not exist")
        if self.abnormal_dir is not None and self.mask_dir is None:
            warnings.warn(
                "data.mask_dir is not set: defect images have no pixel ground truth, so pixel metrics are meaningless",
                UserWarning,
                stacklevel=2,
            )

    def available_categories(self) -> list[str]:
        return [self.category]

    def collect_samples(self, split: str) -> list[Sample]:
        if split == "train":
            return [Sample(str(p), 0, self.category) for p in list_images(self.normal_dir)]
        if self.normal_test_dir is not None:
            normals = [Sample(str(p), 0, self.category) for p in list_images(self.normal_test_dir)]
        else:
            support = set(self.support_paths)
            pool = self.normal_pool or self.collect_samples("train")
            normals = [s for s in pool if s.image_path not in support]
        defects = []
        for image in list_images(self.abnormal_dir) if self.abnormal_dir else []:
            mask = find_mask(self.mask_dir, image) if self.mask_dir else None
            if self.mask_dir is not None and mask is None:
                self.problem(missing_mask_message(image, self.mask_dir))
                continue
            defects.append(Sample(str(image), 1, self.category, str(mask) if mask else None, "anomaly"))
        return normals + defects
