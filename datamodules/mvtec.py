"""MVTec-AD in its official layout: ``root/<cat>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``."""

from __future__ import annotations

from pathlib import Path

from fsad.datamodules.base import FewShotDataModule, Sample
from fsad.datamodules.transforms import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_CATEGORIES = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
    "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)  # fmt: skip


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_mask(mask_dir: Path, image: Path) -> Path | None:
    """The mask of ``image`` in ``mask_dir``, ``<stem>_mask.<ext>`` or ``<stem>.<ext>``; ``None`` if there is none."""
    for stem in (f"{image.stem}_mask", image.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = mask_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def missing_mask_message(image: Path, mask_dir: Path) -> str:
    return f"mask missing for defect image {image}: expected {mask_dir / (image.stem + '_mask.png')}"


def mvtec_layout_samples(module: FewShotDataModule, base: Path, split: str) -> list[Sample]:
    """Samples of one category folder in MVTec layout (shared by MVTec-AD, prepared VisA and the demo data)."""
    if split == "train":
        return [Sample(str(p), 0, module.category) for p in list_images(base / "train" / "good")]
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"data.root: {test_dir} does not exist")
    samples = []
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == "good":
                samples.append(Sample(str(image), 0, module.category))
                continue
            mask_dir = base / "ground_truth" / defect
            mask = find_mask(mask_dir, image)
            if mask is None:
                module.problem(missing_mask_message(image, mask_dir))
                continue
            samples.append(Sample(str(image), 1, module.category, str(mask), defect))
    return samples


class MVTecDataModule(FewShotDataModule):
    """MVTec-AD, one category per run. Grayscale categories (grid, screw, zipper) are converted to RGB on load."""

    dataset_name = "mvtec"

    def available_categories(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "train" / "good").is_dir())

    def collect_samples(self, split: str) -> list[Sample]:
        return mvtec_layout_samples(self, self.root / self.category, split)
