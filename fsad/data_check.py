"""``fsad data check``: inspect a dataset before a long sweep and list every problem, not just the first."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fsad.datamodules.base import FewShotDataModule, Sample
from fsad.datamodules.folder import FolderDataModule
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.realiad import RealIADDataModule
from fsad.datamodules.transforms import DataError, load_mask, load_rgb
from fsad.datamodules.visa import VisADataModule
from fsad.errors import OneLineArgumentParser

DATASETS: dict[str, type[FewShotDataModule]] = {
    "mvtec": MVTecDataModule,
    "visa": VisADataModule,
    "realiad": RealIADDataModule,
    "folder": FolderDataModule,
}


def image_size(path: str, full_decode: bool) -> tuple[int, int]:
    """(width, height) of an image; ``full_decode`` reads every pixel, which catches truncated files."""
    if full_decode:
        array = load_rgb(path)
        return array.shape[1], array.shape[0]
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def check_samples(samples: list[Sample], full_decode: bool, empty_masks_allowed: bool = False) -> tuple[list[str], int]:
    """Unreadable images and masks, masks whose size differs from their image, and empty defect masks (a problem
    unless the dataset allows them, as Real-IAD does for views that do not show the defect); also the number of
    empty defect masks."""
    problems = []
    empty_masks = 0
    for sample in samples:
        try:
            size = image_size(sample.image_path, full_decode)
        except DataError as err:
            problems.append(str(err))
            continue
        if sample.mask_path is None:
            continue
        try:
            mask = load_mask(sample.mask_path)
        except DataError as err:
            problems.append(str(err))
            continue
        if (mask.shape[1], mask.shape[0]) != size:
            problems.append(
                f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {sample.image_path} is "
                f"{size[0]}x{size[1]}"
            )
        elif not np.any(mask):
            empty_masks += 1
            if not empty_masks_allowed:
                problems.append(f"mask {sample.mask_path} of defect image {sample.image_path} is empty")
    return problems, empty_masks


def check_category(module: FewShotDataModule, full_decode: bool) -> tuple[dict[str, int], list[str]]:
    """Counts and problems of one category (the datamodule records problems instead of raising)."""
    module.problems = []
    counts = {"train_normal": 0, "test_normal": 0, "test_defect": 0, "masks": 0, "support": 0, "empty_masks": 0}
    try:
        train = module.collect_samples("train")
        test = module.collect_samples("test")
    except DataError as err:
        return counts, [*module.problems, str(err)]
    counts.update(
        train_normal=len(train),
        test_normal=sum(s.label == 0 for s in test),
        test_defect=sum(s.label == 1 for s in test),
        masks=sum(s.mask_path is not None for s in test),
        support=min(module.k_shot, len(train)),
    )
    sample_problems, counts["empty_masks"] = check_samples(
        train + test, full_decode, getattr(module, "empty_defect_masks_allowed", False)
    )
    counts.update(getattr(module, "notes", {}))
    problems = [*module.problems, *sample_problems]
    if module.k_shot > len(train):
        problems.append(f"k_shot={module.k_shot} exceeds the {len(train)} normal training images")
    return counts, problems


def main(argv: list[str]) -> int:
    parser = OneLineArgumentParser(prog="fsad data", description="Inspect a dataset and list every problem.")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="counts per category and every problem found")
    check.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    check.add_argument("--root", help="dataset root (mvtec, visa, realiad)")
    check.add_argument("--category", action="append", help="category to check (repeatable); default: all found")
    check.add_argument("--k-shot", type=int, default=4)
    check.add_argument("--resolution", default="1024", help="Real-IAD image folder: 256, 512, 1024 or raw")
    check.add_argument("--single-view", action="store_true", help="Real-IAD: the single-view splits (realiad_jsons_sv)")
    check.add_argument("--views", nargs="+", help="Real-IAD: keep only these camera views, e.g. --views C1")
    check.add_argument("--normal-dir", help="folder dataset: normal images")
    check.add_argument("--abnormal-dir", help="folder dataset: defect images")
    check.add_argument("--mask-dir", help="folder dataset: masks")
    check.add_argument("--normal-test-dir", help="folder dataset: normal test images")
    check.add_argument("--quick", action="store_true", help="read image headers only (faster, misses truncation)")
    args = parser.parse_args(argv)

    def build(category: str) -> FewShotDataModule:
        if args.dataset == "folder":
            if not args.normal_dir:
                parser.error("--normal-dir is required for --dataset folder")
            return FolderDataModule(
                normal_dir=args.normal_dir, abnormal_dir=args.abnormal_dir, mask_dir=args.mask_dir,
                normal_test_dir=args.normal_test_dir, category=category, k_shot=args.k_shot,
            )  # fmt: skip
        if not args.root:
            parser.error(f"--root is required for --dataset {args.dataset}")
        extra = {
            "resolution": int(args.resolution) if args.resolution.isdigit() else args.resolution,
            "single_view": args.single_view,
            "views": args.views,
        }
        return DATASETS[args.dataset](
            root=args.root, category=category, k_shot=args.k_shot, **(extra if args.dataset == "realiad" else {})
        )

    try:
        probe = build((args.category or ["custom"])[0])
        if args.dataset == "folder":
            probe.check_root()
        elif not probe.root.is_dir():
            raise DataError(f"--root: dataset root {probe.root} does not exist")
        found = probe.available_categories()
    except DataError as err:
        print(f"error: {err}")
        return 1
    categories = args.category or found
    unknown = [c for c in categories if c not in found]
    if unknown:
        print(f"error: categories {unknown} not found under {args.root}; categories found: {found or 'none'}")
        return 1
    print(f"{args.dataset} at {args.root or args.normal_dir}: {len(found)} categories found: {', '.join(found)}")
    header = f"{'category':<20}{'train':>7}{'test ok':>9}{'defect':>8}{'masks':>7}{'support':>9}  problems"
    print(header)
    total_problems = 0
    all_problems = []
    notes = {"empty_masks": 0, "ng_without_mask": 0}
    for category in categories:
        counts, problems = check_category(build(category), full_decode=not args.quick)
        for key in notes:
            notes[key] += counts.get(key, 0)
        total_problems += len(problems)
        all_problems += [f"[{category}] {p}" for p in problems]
        print(
            f"{category:<20}{counts['train_normal']:>7}{counts['test_normal']:>9}{counts['test_defect']:>8}"
            f"{counts['masks']:>7}{counts['support']:>9}  {len(problems)}"
        )
    for line in all_problems:
        print(f"  - {line}")
    if args.dataset == "realiad":
        print(
            f"{notes['ng_without_mask']} NG test entries without mask_path (read as normal, as the dataset's loader "
            f"does); {notes['empty_masks']} empty NG masks (defect not visible in that view; kept as NG)"
        )
    print(f"{total_problems} problem(s) in {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}")
    return 1 if total_problems else 0
