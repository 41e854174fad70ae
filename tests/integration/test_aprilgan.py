"""APRIL-GAN end to end: adapters fitted on the demo data's test images and masks, then a few-shot test on the real
MVTec bottle from the saved checkpoint, and the same adapters zero-shot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fsad.cli import FsadCLI
from tests.integration.test_cli_and_membank import CollectOutputs

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.init_args.backbone", "{arch: fsad-tiny, pretrained: null, taps: [1, 2, 3, 4], vv_attention: false}",
        "--model.init_args.lr", "0.01"]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


def test_fit_on_another_dataset_then_few_and_zero_shot_on_real_bottle(tmp_path: Path, mvtec_root: Path) -> None:
    runs = ["--run_root", str(tmp_path / "runs")]
    fit = FsadCLI(
        args=["-c", str(REPO / "configs/aprilgan/train_synthetic_tiny.yaml"), "-c",
              str(REPO / "configs/logger/csv.yaml"), *runs, "--trainer.max_epochs", "4"],
        run=False,
    )  # fmt: skip
    fit.trainer.fit(fit.model, datamodule=fit.datamodule)
    train_dir = tmp_path / "runs/aprilgan/synthetic_aux/all/k0_s0"
    rows = list(csv.DictReader((train_dir / "logs/version_0/metrics.csv").open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) >= 4 and np.mean(losses[-2:]) < np.mean(losses[:2])  # the adapters learn the masks
    checkpoint = train_dir / "checkpoints/last.ckpt"

    common = ["-c", str(REPO / "configs/aprilgan/mvtec.yaml"), *TINY, *runs, "--data.init_args.root", str(mvtec_root),
              "--data.init_args.image_size", "96", "--data.init_args.eval_size", "64",
              "--data.init_args.batch_size", "32"]  # fmt: skip
    cli = FsadCLI(args=[*common, "--data.init_args.k_shot", "2"], run=False)
    few = CollectOutputs()
    cli.trainer.callbacks.append(few)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint)
    results = (tmp_path / "runs/aprilgan/mvtec/bottle/k2_s0/results.csv").read_text()
    assert "aprilgan,mvtec,bottle,2,0" in results and "pixel_AUROC" in results
    model = cli.model.eval()
    assert model.model.memory.is_fitted
    few_maps, few_scores = torch.cat(few.maps).reshape(-1, 64 * 64), torch.cat(few.scores)

    model.clear_support()  # zero-shot: the same adapters without the memory map
    with torch.no_grad():
        zero = [model(batch.image) for batch in cli.datamodule.test_dataloader()]
    zero_maps, zero_scores = torch.cat([m for m, _ in zero]).flatten(1), torch.cat([s for _, s in zero])
    assert bool((few_maps >= zero_maps).all()) and not torch.allclose(zero_maps, few_maps)  # + a distance map
    # few-shot score = ½(zero-shot text score + max of the fused map), image by image (the authors' rule, unnormalised)
    assert torch.allclose(few_scores, 0.5 * (zero_scores + few_maps.amax(dim=1)), atol=1e-6)
    labels = torch.cat(few.labels).numpy()
    assert len(set(labels)) == 2 and 0.0 <= roc_auc_score(labels, few_scores.numpy()) <= 1.0
    # the authors' score, logged beside: ½(text probability + map maxima min-max normalised over the test set)
    row = next(csv.DictReader((tmp_path / "runs/aprilgan/mvtec/bottle/k2_s0/results.csv").open()))
    maxima = few_maps.amax(dim=1).numpy()
    authors = 0.5 * (zero_scores.numpy() + (maxima - maxima.min()) / (maxima.max() - maxima.min()))
    assert float(row["image_AUROC_paper_test_minmax"]) == pytest.approx(roc_auc_score(labels, authors), abs=1e-6)
