"""KAG-prompt end to end: auxiliary fit on synthetic NSA data, few-shot test on the real MVTec bottle."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from fsad.cli import FsadCLI
from tests.integration.test_cli_and_membank import CollectOutputs

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.init_args.backbone", "{arch: fsad-tiny, pretrained: null, taps: [1, 2, 3, 4], vv_attention: false}",
        "--model.init_args.rounds", "2", "--model.init_args.graph_dim", "null"]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


def test_auxiliary_fit_then_few_shot_test_on_real_bottle(tmp_path: Path, mvtec_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    runs = ["--run_root", str(tmp_path / "runs")]
    fit = FsadCLI(
        args=[
            "-c",
            str(REPO / "configs/kagprompt/train_synthetic_tiny.yaml"),
            "-c",
            str(REPO / "configs/logger/csv.yaml"),
            *runs,
            "--trainer.max_epochs",
            "4",
        ],
        run=False,
    )
    fit.trainer.fit(fit.model, datamodule=fit.datamodule)
    train_dir = tmp_path / "runs/kagprompt/synthetic_aux/all/k0_s0"
    rows = list(csv.DictReader((train_dir / "logs/version_0/metrics.csv").open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])
    checkpoint = train_dir / "checkpoints/last.ckpt"

    test = ["-c", str(REPO / "configs/kagprompt/mvtec.yaml"), *TINY, *runs,
            "--data.init_args.root", str(mvtec_root), "--data.init_args.image_size", "96",
            "--data.init_args.eval_size", "64", "--data.init_args.batch_size", "16"]  # fmt: skip
    trained, reloaded = CollectOutputs(), CollectOutputs()
    cli = FsadCLI(args=test, run=False)
    cli.trainer.callbacks.append(trained)
    cli.trainer.test(fit.model, datamodule=cli.datamodule)  # the model still in memory after training
    cli = FsadCLI(args=test, run=False)
    cli.trainer.callbacks.append(reloaded)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint)
    first, second = trained, reloaded
    assert torch.equal(torch.cat(first.scores), torch.cat(second.scores))
    assert torch.equal(torch.cat(first.maps), torch.cat(second.maps))
    results = (tmp_path / "runs/kagprompt/mvtec/bottle/k4_s0/results.csv").read_text()
    assert "kagprompt,mvtec,bottle,4,0" in results and "pixel_AUROC" in results
    assert len((tmp_path / "runs/kagprompt/mvtec/bottle/k4_s0/support.txt").read_text().splitlines()) == 4
