"""Review pictures of the real bottle test set in every logger, the W&B predictions table and curves, and
predict overlays on a usable scale."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from scipy import ndimage

from fsad.callbacks.heatmaps import HeatmapLogger
from fsad.callbacks.metrics import AnomalyMetrics
from fsad.callbacks.results import ResultsWriter
from fsad.callbacks.visualiser import GROUND_TRUTH_RGB, overlay_region
from fsad.cli import main
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.synthetic import default_synthetic_root
from fsad.datamodules.transforms import load_mask
from fsad.report import write_run_report
from tests.integration.test_heatmaps_wandb import tiny_model
from tests.integration.test_report import assert_self_contained, render

pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
REPO = Path(__file__).resolve().parents[2]
EVAL = 128


def test_bottle_review_pictures_reach_disk_wandb_tensorboard_and_mlflow(
    tmp_path: Path, mvtec_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed (dev extra)")
    pytest.importorskip("mlflow", reason="mlflow-skinny not installed (dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # where offline W&B stages table artifacts
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, offline, files on disk
    data = MVTecDataModule(root=str(mvtec_root), category="bottle", k_shot=2, image_size=96, eval_size=EVAL)
    heatmaps = HeatmapLogger(num_images=4, seed=0, worst=1)
    metrics = AnomalyMetrics()
    loggers = [
        WandbLogger(project="fsad-test", save_dir=str(tmp_path), offline=True),
        TensorBoardLogger(save_dir=str(tmp_path / "tb"), name="run"),
        MLFlowLogger(experiment_name="fsad-test", tracking_uri=f"file:{tmp_path / 'mlruns'}"),
    ]
    trainer = Trainer(accelerator="cpu", logger=loggers, enable_progress_bar=False,
                      default_root_dir=str(tmp_path / "run"), callbacks=[metrics, heatmaps, ResultsWriter(print_table=False)])  # fmt: skip
    trainer.test(tiny_model(eval_size=EVAL), datamodule=data, verbose=False)
    loggers[0].experiment.finish()

    # disk: <defect_type>/<stem>.png, listed in heatmaps.json, outline on the overlay following the real mask
    samples = data.test_samples
    index = json.loads((tmp_path / "run/heatmaps/heatmaps.json").read_text())
    records = {r["index"]: r for r in index["images"]}
    assert len(records) == len(heatmaps.written) >= 4 + 1
    assert {r["chosen_as"] for r in records.values()} >= {"watchlist"}
    for number, record in records.items():
        sample = samples[number]
        assert record["file"] == f"{sample.defect}/{Path(sample.image_path).stem}.png"
        assert record["defect_type"] == sample.defect and record["gt_label"] == sample.label
        picture = cv2.cvtColor(cv2.imread(str(tmp_path / "run/heatmaps" / record["file"])), cv2.COLOR_BGR2RGB)
        drawn = np.all(overlay_region(picture, (EVAL, EVAL)) == GROUND_TRUTH_RGB, axis=2)
        if sample.mask_path is None:
            assert not drawn.any()
            continue
        mask = cv2.resize(load_mask(sample.mask_path), (256, 256), interpolation=cv2.INTER_NEAREST) > 0
        filled = ndimage.binary_fill_holes(cv2.resize(mask.astype(np.uint8), (256, 256)))
        edge = filled & ~ndimage.binary_erosion(filled)
        # the original mask resized straight to 256 px differs by up to a pixel of the 128-pixel evaluation mask
        assert drawn.any() and ndimage.distance_transform_edt(~edge)[drawn].max() <= 3.5
        assert (ndimage.distance_transform_edt(~drawn)[edge] <= 3.5).mean() > 0.95  # the whole outline is drawn
    worst_normal = max((i for i, s in enumerate(samples) if s.label == 0), key=lambda i: metrics_score(metrics, i))
    assert records[worst_normal]["chosen_as"] in ("false_positive", "watchlist")

    # TensorBoard: one image per picture, under its defect/stem name
    events = EventAccumulator(
        str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0}
    )
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"heatmaps/{r['file'][:-4]}" for r in records.values())

    # MLflow: the same PNGs as artifacts
    artifacts = sorted(p.relative_to(p.parents[2]).as_posix() for p in (tmp_path / "mlruns").rglob("heatmaps/*/*.png"))
    assert artifacts == sorted(f"heatmaps/{r['file']}" for r in records.values())

    # W&B offline: the pictures, the predictions table and the exact curves
    run = next(tmp_path.glob("wandb/offline-run-*/files"))
    assert len(list(run.glob("media/images/heatmaps_*.png"))) == len(records)
    assert list(run.glob("media/table/predictions_*.table.json"))
    staged = [
        json.loads(f.read_text()) for f in (tmp_path / "data/artifacts/staging").iterdir() if f.read_bytes()[:1] == b"{"
    ]
    table = next(
        t for t in staged if t.get("_type") == "table" and t["columns"][0] == "image"
    )  # the run's table artifact
    assert table["columns"] == ["image", "heatmap", "score", "gt_label", "defect_type", "pred_label"]
    assert sorted(row[2] for row in table["data"]) == pytest.approx(sorted(r["score"] for r in records.values()))
    assert sorted(row[4] for row in table["data"]) == sorted(r["defect_type"] for r in records.values())
    for row in table["data"]:  # ground truth and the F1-max prediction as masks the dashboard toggles
        assert row[0]["_type"] == "image-file" and set(row[0]["masks"]) == {"ground_truth", "prediction"}
    roc = json.loads(next(run.glob("media/table/image_roc_curve_table_*.table.json")).read_text())
    fpr, tpr = np.array(roc["data"]).T
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.results["image_AUROC"], abs=1e-9)
    curves = json.loads((tmp_path / "run/curves.json").read_text())["image"]
    assert curves["fpr"] == pytest.approx(fpr.tolist())

    # the run's report.html: self-contained, every picture and support image in it, rendered by Chromium last
    page = write_run_report(tmp_path / "run")
    assert_self_contained(page.read_text())
    dom = render(page, tmp_path / "bottle_report.png")  # skips here, with one line, without Chromium
    assert dom.texts["title"] == "fsad run: membank mvtec bottle k=2 seed=0"
    assert dom.count("img") == len(records) + 2 and dom.texts["shown"] == str(len(records))


def metrics_score(metrics: AnomalyMetrics, index: int) -> float:
    return metrics._scores[index]


def test_predict_overlays_carry_the_score_on_the_batch_range(tmp_path: Path) -> None:
    root = default_synthetic_root() / "disc"
    args = ["predict", "-c", str(REPO / "configs/demo.yaml"), "-c", str(REPO / "configs/data/predict.yaml"),
            "--run_root", str(tmp_path), "--data.init_args.path", str(root / "test" / "paint"),
            "--data.init_args.normal_dir", str(root / "train" / "good"), "--data.init_args.category", "disc"]  # fmt: skip
    assert main(args) == 0
    out = next(tmp_path.rglob("predictions"))
    strips = []
    for overlay_file in sorted(p for p in out.glob("*.png") if "_map" not in p.name and "_mask" not in p.name):
        anomaly_map = np.load(out / f"{overlay_file.stem}_map.npy")
        picture = cv2.cvtColor(cv2.imread(str(overlay_file)), cv2.COLOR_BGR2RGB).astype(int)
        overlay = overlay_region(picture, anomaly_map.shape)
        height, width = overlay.shape[:2]
        peak = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        low = np.unravel_index(anomaly_map.argmin(), anomaly_map.shape)
        red = overlay[int(peak[0] * height / anomaly_map.shape[0]), int(peak[1] * width / anomaly_map.shape[1])]
        blue = overlay[int(low[0] * height / anomaly_map.shape[0]), int(low[1] * width / anomaly_map.shape[1])]
        assert red[0] > red[2] and blue[2] > blue[0]  # the batch's range spans the colour map: not all blue
        strip = picture[height:]
        assert strip.shape[0] >= 40 and (strip < 100).any()  # the caption strip holds text
        strips.append(strip)
    assert len(strips) >= 2 and not np.array_equal(strips[0], strips[1])  # each with its own score


def test_fitted_thresholds_set_the_scale_and_the_predictions(tmp_path: Path) -> None:
    from fsad.datamodules.synthetic import SyntheticDataModule

    model = tiny_model()
    image_t, pixel_t, low, high = 0.2, 0.15, 0.05, 0.45  # as if fitted by calibration
    model.thresholds.set("labelled", image_threshold=image_t, pixel_threshold=pixel_t, pixel_min=low, pixel_max=high)
    data = SyntheticDataModule(root=str(tmp_path / "syn"), category="disc", image_size=96, eval_size=64)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[AnomalyMetrics(), HeatmapLogger(num_images=6)])  # fmt: skip
    trainer.test(model, datamodule=data, verbose=False)
    index = json.loads((tmp_path / "heatmaps/heatmaps.json").read_text())
    # n(x) = (x − t)/(max − min) + ½ spans [0, 1] over t ± (max − min)/2, the threshold in the middle
    assert index["scale"] == f"calibrated scale {pixel_t - 0.2:.4g}..{pixel_t + 0.2:.4g}, threshold {pixel_t:.4g}"
    assert index["decisions"] == "calibrated thresholds (labelled)"
    assert [r["pred_label"] for r in index["images"]] == [int(r["score"] >= image_t) for r in index["images"]]
