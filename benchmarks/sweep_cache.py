"""P6: a 3 k × 3 seed memory-bank sweep with the test-feature cache ÷ nine uncached cells.

The real MVTec-AD bottle images (``$FSAD_TEST_DATA/mvtec_ad/bottle`` or ``--bottle``), ViT-B-16-plus-240 with
random weights (``pretrained: null``) on the CPU, through ``fsad benchmark``'s own runner. ``seed_everything`` is
fixed so every cell draws the same random backbone, as every cell of a real sweep loads the same pretrained
weights (the cache key holds a digest of the weights, so different draws would never share entries).

Both sweeps are timed whole (probe, every cell's model build, support pass, test, metrics, CSV): first one cell
with the cache off, then the nine cells with a fresh cache, where the first cell fills it and the other eight
read it. Prints ``sweep_cache ratio=<sweep time with cache / 9 × one uncached cell>``; budget ≤ 0.3. On a CPU the
full test split (83 images) takes minutes; ``--max-test-images`` keeps the first N test images (spread over the
defect types) to shorten it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import yaml

from fsad.benchmark import Sweep, load_config

REPO = Path(__file__).resolve().parents[1]


def bottle_subset(source: Path, destination: Path, max_test_images: int | None) -> Path:
    """An MVTec-AD root with the bottle category: every training image, up to ``max_test_images`` test images
    (taken round-robin over the test folders) and their masks. Files are symlinked, not copied."""
    category = destination / "bottle"
    (category / "train").mkdir(parents=True)
    (category / "train/good").symlink_to(source / "train/good", target_is_directory=True)
    folders = sorted(p for p in (source / "test").iterdir() if p.is_dir())
    queues = [sorted(folder.glob("*.png")) for folder in folders]
    chosen: list[Path] = []
    while any(queues) and (max_test_images is None or len(chosen) < max_test_images):
        for queue in queues:
            if queue and (max_test_images is None or len(chosen) < max_test_images):
                chosen.append(queue.pop(0))
    for image in chosen:
        defect = image.parent.name
        (category / "test" / defect).mkdir(parents=True, exist_ok=True)
        (category / "test" / defect / image.name).symlink_to(image)
        if defect != "good":
            mask = source / "ground_truth" / defect / f"{image.stem}_mask.png"
            (category / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            (category / "ground_truth" / defect / mask.name).symlink_to(mask)
    return destination


def sweep_seconds(folder: Path, name: str, root: Path, shots: list[int], seeds: list[int], cache: bool) -> float:
    config = {
        "method_config": [str(REPO / "configs/membank/mvtec.yaml")], "root": str(root), "categories": ["bottle"],
        "shots": shots, "seeds": seeds, "output": str(folder / name), "feature_cache": {"enabled": cache},
        "extra_args": [
            "--model.init_args.backbone.pretrained", "null", "--seed_everything", "0",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        ],
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    ran, failed = Sweep(load_config(str(path))).run()
    seconds = time.perf_counter() - start
    if failed or len(ran) != len(shots) * len(seeds):
        raise SystemExit(f"the {name} sweep did not finish every cell: ran {ran}, failed {failed}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bottle", type=Path, default=Path(os.environ.get("FSAD_TEST_DATA", "data")) / "mvtec_ad" / "bottle"
    )
    parser.add_argument("--max-test-images", type=int, default=None, help="first N test images (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    folder = Path(tempfile.mkdtemp(prefix="sweep_cache_"))
    try:
        root = bottle_subset(args.bottle, folder / "mvtec", args.max_test_images)
        images = sum(1 for _ in (root / "bottle/test").glob("*/*.png"))
        uncached = sweep_seconds(folder, "uncached", root, shots=[1], seeds=[0], cache=False)
        cached = sweep_seconds(folder, "cached", root, shots=[1, 2, 4], seeds=[0, 1, 2], cache=True)
        print(f"one uncached cell {uncached:.1f} s; 9 cells with the cache {cached:.1f} s; {images} test images")
        print(f"sweep_cache ratio={cached / (9 * uncached):.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
