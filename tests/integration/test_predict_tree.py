"""fsad predict on a nested folder tree: recursive, mirrored, maps at each image's size, same under 2-rank DDP."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsad.datamodules.synthetic import generate_synthetic_dataset

JOB = Path(__file__).with_name("ddp_predict_job.py")
REPO = Path(__file__).resolve().parents[2]


def run_job(devices: int, out_dir: Path, tree: Path, normal_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(JOB), str(devices), str(out_dir), str(tree), str(normal_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def outputs(predictions: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(predictions)): np.load(p) for p in sorted(predictions.rglob("*_map.npy"))}


@pytest.mark.ddp
def test_predict_tree_is_mirrored_at_image_size_and_identical_under_two_gloo_processes(tmp_path: Path) -> None:
    data = generate_synthetic_dataset(tmp_path / "synthetic")
    tests = sorted((data / "disc/test").rglob("*.png"))[:9]  # 9 images: a 2-rank sampler pads one duplicate
    tree = tmp_path / "factory"
    expected: dict[str, tuple[int, int]] = {}
    for number, image in enumerate(tests):
        relative = Path(["line_a/cam1", "line_a/cam2", "line_b"][number % 3]) / f"{number:02d}_{image.name}"
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        if number == 4:  # one odd-sized image: its map must come back at its own size
            Image.open(image).convert("RGB").resize((150, 110)).save(tree / relative)
        else:
            shutil.copy(image, tree / relative)
        with Image.open(tree / relative) as opened:
            expected[relative.as_posix()] = (opened.height, opened.width)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    (single / "predictions").mkdir(parents=True)
    (single / "predictions/stale_map.npy").write_bytes(b"from an earlier run")

    run_job(1, single, tree, data / "disc/train/good")
    run_job(2, ddp, tree, data / "disc/train/good")

    rows = list(csv.DictReader((single / "predictions/scores.csv").open()))
    assert sorted(r["path"] for r in rows) == sorted(expected)  # relative to the tree, nothing missed or doubled
    assert (ddp / "predictions/scores.csv").read_text() == (single / "predictions/scores.csv").read_text()
    maps = outputs(single / "predictions")
    assert "stale_map.npy" not in maps and not (single / "predictions.partial").exists()
    for path, size in expected.items():
        assert maps[str(Path(path).with_name(Path(path).stem + "_map.npy"))].shape == size
    ddp_maps = outputs(ddp / "predictions")
    assert ddp_maps.keys() == maps.keys()
    for name, values in maps.items():
        np.testing.assert_array_equal(ddp_maps[name], values)
