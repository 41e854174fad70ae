"""fsad benchmark (sweep, resume after a kill, cell by cell), SLURM detection, and fsad predict on folders."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fsad.benchmark import build_table, read_rows
from fsad.cli import FsadCLI, main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null", "ignore:skipping unreadable file")


def write_benchmark(tmp_path: Path, name: str) -> Path:
    config = {
        "method_config": [str(REPO / "configs/demo.yaml")], "categories": "all", "shots": [1, 2], "seeds": [0, 1],
        "output": str(tmp_path / name), "extra_args": ["--data.init_args.root", str(tmp_path / "synthetic")],
        "feature_cache": {"dtype": "float32"},  # exact, so a cell equals a direct `fsad test` to the last bit
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows_of(output: Path) -> list[dict[str, str]]:
    return read_rows(output)


def test_sweep_table_matches_a_direct_test_and_cell_by_cell_collect(tmp_path: Path, capsys) -> None:
    config = write_benchmark(tmp_path, "sweep")
    assert main(["benchmark", "-c", str(config)]) == 0
    rows = rows_of(tmp_path / "sweep")
    assert [(r["category"], r["k"], r["seed"]) for r in rows] == [
        (c, k, s) for c in ("disc", "tile") for k in ("1", "2") for s in ("0", "1")
    ]
    table = (tmp_path / "sweep/benchmark.md").read_text()
    assert "| k=1 I-AUROC | k=1 P-AUROC |" in table and "±" in table and "| mean |" in table

    # one cell against a direct `fsad test` of the same cell
    direct = FsadCLI(args=["-c", str(REPO / "configs/demo.yaml"), "--run_root", str(tmp_path / "direct"),
                           "--data.init_args.root", str(tmp_path / "synthetic"), "--data.init_args.category", "tile",
                           "--data.init_args.k_shot", "2", "--data.init_args.seed", "1"], run=False)  # fmt: skip
    direct.trainer.test(direct.model, datamodule=direct.datamodule, verbose=False)
    metrics = next(cb.results for cb in direct.trainer.callbacks if hasattr(cb, "results") and cb.results)
    cell = next(r for r in rows if (r["category"], r["k"], r["seed"]) == ("tile", "2", "1"))
    assert float(cell["pixel_AUROC"]) == metrics["pixel_AUROC"] and float(cell["image_AUROC"]) == metrics["image_AUROC"]

    # the same sweep cell by cell (array tasks), then --collect: the same table
    cells = write_benchmark(tmp_path, "cells")
    main(["benchmark", "-c", str(cells), "--list-cells"])
    listed = [line for line in capsys.readouterr().out.splitlines() if line.split("\t")[0].isdigit()]
    assert len(listed) == 8 and listed[5].startswith("5\tmembank\tsynthetic\ttile\tk=1\tseed=1\ttodo")
    for index in range(8):
        assert main(["benchmark", "-c", str(cells), "--cell-index", str(index)]) == 0
    assert main(["benchmark", "-c", str(cells), "--collect"]) == 0
    assert (tmp_path / "cells/benchmark.md").read_text() == table
    assert len(list((tmp_path / "cells/cells").glob("*.csv"))) == 8


def test_killed_sweep_resumes_with_only_the_remaining_cells(tmp_path: Path) -> None:
    config = write_benchmark(tmp_path, "killed")
    csv_path = tmp_path / "killed/benchmark.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fsad", "benchmark", "-c", str(config)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if csv_path.is_file() and len(csv_path.read_text().splitlines()) >= 4:  # header + 3 finished cells
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    finished = {(r["category"], r["k"], r["seed"]) for r in rows_of(tmp_path / "killed")}
    assert 3 <= len(finished) < 8, "the sweep must be killed part-way"

    from fsad.benchmark import Sweep, load_config

    sweep = Sweep(load_config(str(config)))
    ran, failed = sweep.run()
    expected = [c.index for c in sweep.cells if (c.category, str(c.k), str(c.seed)) not in finished]
    assert ran == expected and len(ran) == 8 - len(finished) and failed == []
    assert len(rows_of(tmp_path / "killed")) == 8


def test_bad_benchmark_config_names_the_field(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("method_config: [configs/demo.yaml]\nshots: [one]\n")
    assert main(["benchmark", "-c", str(path)]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"error: {path}: shots.0: Input should be a valid integer, unable to parse string as an integer"
    )


def test_table_mean_row_is_mean_over_seeds_of_category_means() -> None:
    rows = [
        {"method": "m", "dataset": "d", "category": c, "k": "1", "seed": s, "image_AUROC": v, "pixel_AUROC": v}
        for c, s, v in (("a", "0", "0.9"), ("a", "1", "0.8"), ("b", "0", "0.7"), ("b", "1", "0.6"))
    ]
    table = build_table(rows)
    # a: 85 ± 5; b: 65 ± 5; seed means 0.8 and 0.7 -> 75 ± 5
    assert "| a | 85.00 ± 5.00 |" in table and "| b | 65.00 ± 5.00 |" in table and "| mean | 75.00 ± 5.00 |" in table


def test_lightning_detects_slurm_ranks_with_our_trainer_config(monkeypatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                       "SLURM_JOB_NAME": "fsad", "SLURM_JOB_ID": "42", "SLURM_NODELIST": "node[1-2]",
                       "SLURM_NTASKS_PER_NODE": "4"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    trainer_config = yaml.safe_load((REPO / "configs/trainer/slurm.yaml").read_text())["trainer"]
    assert trainer_config["strategy"] == "ddp" and "SLURMEnvironment" in trainer_config["plugins"][0]["class_path"]
    environment = SLURMEnvironment()
    assert SLURMEnvironment.detect()
    assert (environment.world_size(), environment.global_rank(), environment.local_rank(), environment.node_rank()) == (
        8,
        5,
        1,
        1,
    )


# ----------------------------------------------------------------------------- predict
def predict_args(tmp_path: Path, folder: Path, normal: Path, *extra: str) -> list[str]:
    return [
        "predict", "-c", str(REPO / "configs/demo.yaml"), "-c", str(REPO / "configs/data/predict.yaml"),
        "--run_root", str(tmp_path / "runs"), "--data.init_args.path", str(folder),
        "--data.init_args.normal_dir", str(normal), "--data.init_args.category", "hazelnut", *extra,
    ]  # fmt: skip


def test_predict_on_a_real_folder_reports_and_skips_a_corrupt_file(tmp_path: Path, shared_data: Path) -> None:
    hazelnut = shared_data / "hazelnut_toy"
    folder = tmp_path / "incoming"
    shutil.copytree(hazelnut / "test/good", folder)
    shutil.copy(hazelnut / "train/good/01.jpg", folder / "odd_512x522.jpg")
    Image.open(hazelnut / "test/good/04.jpg").convert("L").save(folder / "grey.png")  # a grayscale input too
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(predict_args(tmp_path, folder, hazelnut / "train/good", "--trainer.callbacks.init_args.map_format",
                             "png16")) == 0  # fmt: skip
    out = tmp_path / "runs/membank/predict/hazelnut/k4_s0/predictions"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    readable = sorted(p.name for p in folder.iterdir() if p.name != "broken.jpg")
    assert sorted(Path(r["path"]).name for r in rows if not r["error"]) == readable
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["path"].endswith("broken.jpg") and "cannot read image" in broken[0]["error"]
    assert (
        len(list(out.glob("*_map.png"))) == len(readable) == len([p for p in out.glob("*.png") if "_map" not in p.name])
    )
    odd = next(out.glob("*odd_512x522.png"))
    assert odd.is_file() and all(r["label"] == "" for r in rows)


def test_f1_threshold_is_fitted_then_reused_from_the_checkpoint(tmp_path: Path, shared_data: Path) -> None:
    hazelnut = shared_data / "hazelnut_toy"
    fit = predict_args(tmp_path, hazelnut / "test/colour", hazelnut / "train/good",
                       "--data.init_args.validation_normal_dir", str(hazelnut / "test/good"),
                       "--data.init_args.validation_abnormal_dir", str(hazelnut / "test/colour"),
                       "--trainer.callbacks.init_args.threshold", "f1")  # fmt: skip
    assert main(fit) == 0
    run_dir = tmp_path / "runs/membank/predict/hazelnut/k4_s0"
    checkpoint = run_dir / "checkpoints/threshold.ckpt"
    import torch

    threshold = float(torch.load(checkpoint, weights_only=True)["state_dict"]["thresholds.image_threshold"])
    first = list(csv.DictReader((run_dir / "predictions/scores.csv").open()))
    assert all(r["label"] == str(int(float(r["score"]) >= threshold)) for r in first)
    # a later predict on other images reuses the stored threshold without validation folders
    assert (
        main(predict_args(tmp_path, hazelnut / "test/good", hazelnut / "train/good", "--ckpt_path", str(checkpoint)))
        == 0
    )
    later = list(csv.DictReader((run_dir / "predictions/scores.csv").open()))
    assert len(later) == 6 and all(r["label"] == str(int(float(r["score"]) >= threshold)) for r in later)


def test_f1_threshold_without_anomalies_warns_instead_of_guessing(tmp_path: Path, shared_data: Path) -> None:
    hazelnut = shared_data / "hazelnut_toy"
    args = predict_args(tmp_path, hazelnut / "test/good", hazelnut / "train/good",
                        "--data.init_args.validation_normal_dir", str(hazelnut / "test/good"),
                        "--trainer.callbacks.init_args.threshold", "f1")  # fmt: skip
    with pytest.warns(UserWarning, match="needs labelled anomalies"):
        assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "runs/membank/predict/hazelnut/k4_s0/predictions/scores.csv").open()))
    assert rows and all(r["label"] == "" for r in rows)
