"""``fsad compare`` with one feature cache for every method ÷ the same comparison with one cache per method's sweep.

Two setups, each run through the real ``fsad compare`` command in a subprocess, in fresh output folders:

* ``demo`` (default): ``configs/benchmark/compare_demo.yaml`` as shipped: seven methods, the tiny random backbone,
  the demo data, one category, k = 1, one seed. Fitting and pretraining dominate it.
* ``--winclip-bottle N``: WinCLIP (k = 0) then WinCLIP+ (k = 1) on the first N real MVTec-AD bottle test images
  (``$FSAD_TEST_DATA/mvtec_ad/bottle`` or ``--bottle``) with ViT-B-16-plus-240 and random weights (no download), the
  case where the shared window embeddings matter.

Each round runs both modes, the order alternating between rounds. Prints per run the wall time, the summed
``test_seconds`` of its cells (from each sweep's ``benchmark.csv``) and the printed cache lines, then
``compare_cache ratio=<median shared wall time / median per-method wall time>``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from sweep_cache import bottle_subset

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "configs" / "benchmark"
RANDOM_CPU_ARGS = ["--model.init_args.backbone.pretrained", "null", "--seed_everything", "0",
                   "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]  # fmt: skip


def demo_comparison() -> dict[str, object]:
    config = yaml.safe_load((BENCHMARKS / "compare_demo.yaml").read_text())
    for method in config["methods"]:
        method["benchmark"] = str(BENCHMARKS / method["benchmark"])
    return config


def winclip_bottle_comparison(root: Path) -> dict[str, object]:
    winclip = str(BENCHMARKS / "winclip_mvtec.yaml")
    return {"root": str(root), "categories": ["bottle"], "shots": [1], "seeds": [0], "methods": [
        {"name": "WinCLIP", "benchmark": winclip, "shots": [0], "extra_args": RANDOM_CPU_ARGS},
        {"name": "WinCLIP+", "benchmark": winclip, "shots": [1], "extra_args": RANDOM_CPU_ARGS},
    ]}  # fmt: skip


def run_comparison(config: dict[str, object], folder: Path, share: bool) -> tuple[float, float, list[str]]:
    """Wall seconds of one ``fsad compare``, the summed test seconds of its cells, and its feature-cache lines."""
    output = folder / ("shared" if share else "per_method")
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config | {"output": str(output), "share_feature_cache": share}))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fsad", "compare", "-c", str(path)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fsad compare failed ({done.returncode}):\n{done.stderr[-3000:]}")
    test_seconds = 0.0
    for table in output.glob("*/benchmark.csv"):
        with table.open(newline="") as handle:
            test_seconds += sum(float(row["test_seconds"]) for row in csv.DictReader(handle))
    lines = [line for line in done.stdout.splitlines() if line.startswith(("compare:", "benchmark: feature cache"))]
    shutil.rmtree(output)
    return seconds, test_seconds, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--winclip-bottle", type=int, metavar="N", help="WinCLIP/WinCLIP+ on N bottle test images")
    parser.add_argument(
        "--bottle", type=Path, default=Path(os.environ.get("FSAD_TEST_DATA", "data")) / "mvtec_ad" / "bottle"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print each run's feature-cache lines")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="compare_cache_"))
    try:
        if args.winclip_bottle:
            config = winclip_bottle_comparison(bottle_subset(args.bottle, folder / "mvtec", args.winclip_bottle))
        else:
            config = demo_comparison()
        walls: dict[bool, list[float]] = {True: [], False: []}
        for round_index in range(args.rounds):
            for share in (False, True) if round_index % 2 == 0 else (True, False):
                seconds, test_seconds, lines = run_comparison(config, folder, share)
                walls[share].append(seconds)
                mode = "shared cache" if share else "per-method caches"
                print(
                    f"round {round_index}, {mode}: {seconds:.1f} s wall, cells' test_seconds summed {test_seconds:.1f}"
                )
                if args.verbose:
                    print("\n".join(f"  {line}" for line in lines))
        ratio = statistics.median(walls[True]) / statistics.median(walls[False])
        print(f"compare_cache ratio={ratio:.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
