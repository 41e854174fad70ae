"""Heatmaps on disk and in W&B (offline, failing, unreachable), and on the real MVTec bottle images."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import WandbLogger

from fsad.callbacks.heatmaps import HeatmapLogger
from fsad.callbacks.metrics import AnomalyMetrics
from fsad.callbacks.results import ResultsWriter
from fsad.cli import main
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.membank.module import MemoryBankAD

pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
REPO = Path(__file__).resolve().parents[2]


def tiny_model(eval_size: int = 64) -> MemoryBankAD:
    seed_everything(0)
    return MemoryBankAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), 96, eval_size, 1.0)


def test_offline_wandb_receives_heatmap_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    data = SyntheticDataModule(root=str(tmp_path / "syn"), category="tile", image_size=96, eval_size=64)
    logger = WandbLogger(project="fsad-test", save_dir=str(tmp_path), offline=True)
    heatmaps = HeatmapLogger(num_images=4, seed=1)
    trainer = Trainer(
        accelerator="cpu", logger=logger, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"),
        callbacks=[AnomalyMetrics(), heatmaps, ResultsWriter(print_table=False)],
    )  # fmt: skip
    trainer.test(tiny_model(), datamodule=data)
    logger.experiment.finish()
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/heatmaps_*.png"))
    assert len(media) == 4
    tables = {p.name.split("_")[0] for p in tmp_path.glob("wandb/offline-run-*/files/media/table/*.table.json")}
    assert {"support", "results", "predictions"} <= tables  # the k-shot picks, the results row, the per-image table
    assert len(list((tmp_path / "run" / "heatmaps").glob("*/*.png"))) == 4
    summary = (tmp_path / "run" / "results.csv").read_text()
    assert "image_AUROC" in summary and "tile" in summary


def test_failing_wandb_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise ConnectionError("wandb.ai unreachable")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(WandbLogger, "log_image", broken)
    data = SyntheticDataModule(root=str(tmp_path / "syn"), category="disc", image_size=96, eval_size=64)
    logger = WandbLogger(project="fsad-test", save_dir=str(tmp_path), offline=True)
    trainer = Trainer(
        accelerator="cpu", logger=logger, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"),
        callbacks=[AnomalyMetrics(), HeatmapLogger(num_images=2)],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="could not log heatmaps to W&B"):
        results = trainer.test(tiny_model(), datamodule=data)
    logger.experiment.finish()
    assert results[0]["pixel_AUROC"] > 0.9
    assert len(list((tmp_path / "run" / "heatmaps").glob("*/*.png"))) == 2


def test_unreachable_wandb_server_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a local port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "test", "-c", str(REPO / "configs/demo.yaml"), "-c", str(REPO / "configs/logger/wandb.yaml"),
        "--run_root", str(tmp_path / "runs"),
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="W&B server unreachable"):
        assert main(args) == 0
    run_dir = tmp_path / "runs" / "membank" / "synthetic" / "disc" / "k4_s0"
    assert (run_dir / "results.csv").is_file()
    assert list(run_dir.glob("wandb/offline-run-*"))
    # the W&B run config carries the run's config hash (the client logs each config update it records)
    run_hash = json.loads((run_dir / "run.json").read_text())["config_hash"]
    (client_log,) = run_dir.glob("wandb/offline-run-*/logs/debug.log")
    assert f"{{'config_hash': '{run_hash}'}}" in client_log.read_text()


def test_histogram_mode_tracks_the_exact_pixel_auroc(tmp_path: Path) -> None:
    data = SyntheticDataModule(root=str(tmp_path / "syn"), category="disc", image_size=96, eval_size=64)
    exact, binned = AnomalyMetrics(), AnomalyMetrics(pixel_mode="histogram")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[exact, binned])  # fmt: skip
    trainer.test(tiny_model(), datamodule=data, verbose=False)
    # 65536 bins of [0,1]: only positive/negative pairs sharing a bin can move the value
    assert abs(binned.results["pixel_AUROC_hist"] - exact.results["pixel_AUROC"]) < 1e-4
    assert binned.results["image_AUROC"] == exact.results["image_AUROC"]
