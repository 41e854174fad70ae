"""`fsad export` from the CLI, `fsad.Inferencer` on checkpoints and exports, masks from `fsad predict`, and the
README's "Use it from Python" script, on the demo config (memory bank, tiny backbone, procedural data)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from PIL import Image

from fsad import Inferencer
from fsad.cli import main
from fsad.datamodules.synthetic import SyntheticDataModule, default_synthetic_root
from fsad.lightning_modules.membank.module import MemoryBankAD
from tests.integration.test_cli_and_membank import CollectOutputs

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
pytestmark = [pytest.mark.filterwarnings("ignore:backbone.pretrained is null"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]  # fmt: skip


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fsad export` of the demo config, thresholds calibrated on NSA anomalies of the held-out normal images."""
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", "-c", DEMO, "--out", str(out), "--run_root", str(out.parent / "runs")]) == 0
    return out


def disc_images() -> list[Path]:
    return sorted((default_synthetic_root() / "disc" / "test").rglob("*.png"))


@pytest.mark.slow
def test_cli_export_writes_a_self_contained_model_and_its_metadata(demo_export: Path) -> None:
    metadata = json.loads((demo_export / "metadata.json").read_text())
    assert {"model.onnx", "model.pt2", "model.ckpt", "metadata.json"} <= {p.name for p in demo_export.iterdir()}
    assert metadata["thresholds"]["source"] == "nsa" and metadata["thresholds"]["pixel_threshold"] is not None
    assert len(metadata["support_files"]) == 4 and re.fullmatch("[0-9a-f]{12}", metadata["config_hash"])
    assert metadata["outputs"] == ["anomaly_map", "pred_score", "pred_label", "pred_mask"]
    assert metadata["backbone"]["arch"] == "fsad-tiny" and metadata["fsad_version"]


@pytest.mark.slow
def test_inferencer_from_export_agrees_across_backends_and_with_the_checkpoint(demo_export: Path) -> None:
    metadata = json.loads((demo_export / "metadata.json").read_text())
    seed_everything(0)  # the demo's random backbone is rebuilt under the run's seed
    from_checkpoint = Inferencer.from_checkpoint(demo_export / "model.ckpt", support=metadata["support_files"])
    onnx, program = Inferencer.from_export(demo_export, "onnx"), Inferencer.from_export(demo_export, "pt2")
    thresholds = metadata["thresholds"]
    labels = []
    for path in disc_images()[::4]:
        reference = from_checkpoint.predict(path)
        height, width = np.asarray(Image.open(path)).shape[:2]
        assert reference.anomaly_map.shape == reference.mask.shape == (height, width)
        assert reference.label == int(reference.score >= thresholds["image_threshold"])  # sensitivity 0.5
        labels.append(reference.label)
        for other in (onnx.predict(path), program.predict(path)):
            assert abs(other.score - reference.score) <= 1e-4
            assert np.abs(other.anomaly_map - reference.anomaly_map).max() <= 1e-4
            assert other.label == reference.label
            clear = np.abs(reference.anomaly_map - thresholds["pixel_threshold"]) > 1e-4
            assert np.array_equal(other.mask[clear], reference.mask[clear])
    assert 0 < sum(labels) < len(labels)  # both verdicts occur: the label check above can fail


def test_inferencer_from_checkpoint_matches_fsad_test_on_any_input_type(tmp_path: Path) -> None:
    seed_everything(0)
    data = SyntheticDataModule(category="disc", k_shot=4, seed=0, image_size=96, eval_size=128)
    module = MemoryBankAD(backbone={"arch": "fsad-tiny", "pretrained": None, "taps": [2, 4]}, image_size=96,
                          eval_size=128, gaussian_sigma=2.0)  # fmt: skip
    collector = CollectOutputs()
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[collector], enable_progress_bar=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    trainer.test(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")  # no _class_path: written by a plain Trainer
    seed_everything(0)
    inferencer = Inferencer.from_checkpoint(
        tmp_path / "plain.ckpt", support=data.support_paths, model_class=MemoryBankAD
    )
    scores = torch.cat(collector.scores)
    for index in (0, len(data.test_samples) - 1):
        path = data.test_samples[index].image_path
        by_path = inferencer.predict(path)
        by_pil = inferencer.predict(Image.open(path))
        by_array = inferencer.predict(np.asarray(Image.open(path).convert("RGB")))
        assert abs(by_path.score - float(scores[index])) <= 1e-5
        assert by_pil.score == by_path.score == by_array.score and by_path.label is None and by_path.mask is None
    anonymous = torch.load(tmp_path / "plain.ckpt", map_location="cpu", weights_only=True)
    del anonymous["model_class"]  # a checkpoint of an older fsad: no class recorded anywhere
    torch.save(anonymous, tmp_path / "anonymous.ckpt")
    with pytest.raises(Exception, match="model_class"):
        Inferencer.from_checkpoint(tmp_path / "anonymous.ckpt", support=data.support_paths)
    with pytest.raises(Exception, match="checkpoint: no such file: .*missing.ckpt"):
        Inferencer.from_checkpoint(tmp_path / "missing.ckpt", support=data.support_paths)


@pytest.mark.slow
def test_fsad_predict_writes_masks_when_the_checkpoint_has_a_pixel_threshold(demo_export: Path, tmp_path: Path) -> None:
    root = default_synthetic_root() / "disc"
    args = ["predict", "-c", DEMO, "-c", str(REPO / "configs/data/predict.yaml"), "--run_root", str(tmp_path),
            "--data.init_args.path", str(root / "test" / "paint"), "--data.init_args.normal_dir",
            str(root / "train" / "good"), "--data.init_args.category", "disc", "--ckpt_path", str(demo_export / "model.ckpt"),
            "--trainer.callbacks.init_args.overlays", "false"]  # fmt: skip
    assert main(args) == 0
    out = next(tmp_path.rglob("predictions"))
    threshold = json.loads((demo_export / "metadata.json").read_text())["thresholds"]["pixel_threshold"]
    masks = sorted(out.glob("*_mask.png"))
    assert masks and len(masks) == len(list(out.glob("*_map.npy")))
    flagged = 0
    for mask_file in masks:
        anomaly_map = np.load(str(mask_file).replace("_mask.png", "_map.npy"))
        mask = np.asarray(Image.open(mask_file))
        assert np.array_equal(mask == 255, anomaly_map >= np.float32(threshold))
        flagged += int(mask.any())
    assert flagged > 0


@pytest.mark.slow
def test_readme_python_script_runs(demo_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use it from Python") :]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(demo_export, tmp_path / "model")
    shutil.copy(disc_images()[-1], tmp_path / "part.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "README.md", "exec"), {})
    assert (tmp_path / "part_mask.png").is_file()
