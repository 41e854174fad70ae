"""FineGrainedAD end to end on the real MVTec-AD bottle images with the tiny backbone, in both variants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from fsad.cli import FsadCLI, main
from tests.integration.test_cli_and_membank import CollectOutputs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_both_variants_fit_and_test_on_the_real_bottle(tmp_path: Path, mvtec_root: Path, variant: str) -> None:
    """`fsad fit` then `fsad test` on real bottle shots and test images; the paper variant's checkpoint carries its
    placeholders, Attr-MoE weights and one query per level (foreground included), the code variant's none of them;
    the logged AUROCs are sklearn's on the written maps and scores."""
    common = [
        "-c", str(REPO / "configs/finegrainedad/synthetic_tiny.yaml"), "--run_root", str(tmp_path / "runs"),
        "--data", "fsad.datamodules.mvtec.MVTecDataModule", "--data.init_args.root", str(mvtec_root),
        "--data.init_args.category", "bottle", "--data.init_args.k_shot", "2", "--data.init_args.image_size", "96",
        "--data.init_args.eval_size", "64", "--model.init_args.variant", variant,
    ]  # fmt: skip
    if variant == "code":  # the authors' tap hook needs a block after each tap; their resize chain
        common += ["--model.init_args.backbone.taps", "[1, 3]", "--data.init_args.resize", "authors"]
    assert main(["fit", *common, "--trainer.max_epochs", "1"]) == 0
    run_dir = tmp_path / "runs/finegrainedad/mvtec/bottle/k2_s0"
    state = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    paper_parts = {"model.prompts.normal_placeholders", "model.prompts.abnormal_placeholders",
                   "model.prompts.slot_gate_logits"}  # fmt: skip
    if variant == "paper":
        assert paper_parts <= set(state) and "model.attribute_gates" not in state
        assert state["model.query_former.queries"].shape[0] == 2 + 3  # mouth, rim, foreground, image, background
        assert state["model.prompts.slot_gate_logits"].shape[:2] == (2, 2)  # normal/abnormal × the two components
    else:
        assert not paper_parts & set(state) and "model.attribute_gates" in state

    cli = FsadCLI(args=common, run=False)
    outputs = CollectOutputs()
    cli.trainer.callbacks.append(outputs)
    logged = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=run_dir / "checkpoints/last.ckpt")[0]
    labels = torch.cat(outputs.labels).numpy()
    assert len(labels) == 83 and labels.sum() == 63
    assert abs(logged["image_AUROC"] - roc_auc_score(labels, torch.cat(outputs.scores).numpy())) < 1e-6
    masks = torch.cat(outputs.masks).flatten().numpy() > 0
    assert abs(logged["pixel_AUROC"] - roc_auc_score(masks, torch.cat(outputs.maps).flatten().numpy())) < 1e-6
