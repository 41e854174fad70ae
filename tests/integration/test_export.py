"""Exported models (ONNX through onnxruntime, torch.export's ``model.pt2``) against the Lightning module on real bottle
images.

Each export is recorded once per method (module-scoped fixtures); the graphs take the raw uint8 files, so they
also reproduce the datamodule's resize and normalisation. The reference is the module's own ``test_step`` output,
and the AUROC check recomputes the ONNX model's AUROC with sklearn against what ``AnomalyMetrics`` logged.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from sklearn.metrics import roc_auc_score

from fsad.callbacks.metrics import AnomalyMetrics
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.transforms import load_rgb
from fsad.export import export_model
from fsad.lightning_modules.membank.module import MemoryBankAD
from fsad.lightning_modules.promptad.module import PromptAD
from tests.integration.test_cli_and_membank import CollectOutputs

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:backbone.pretrained is null"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]  # fmt: skip
TINY = {"arch": "fsad-tiny", "pretrained": None, "taps": [2, 4]}  # a dict: BackboneSpec fields are accepted as is


class Exported(SimpleNamespace):
    """A tested module, its Lightning test outputs and metrics, and the folder its export went to."""


def bottle_data(root: Path) -> MVTecDataModule:
    return MVTecDataModule(root=str(root), category="bottle", k_shot=2, seed=0, image_size=96, eval_size=128)


def run_and_export(method: str, root: Path, out: Path) -> Exported:
    seed_everything(0)
    if method == "membank":
        module = MemoryBankAD(backbone=TINY, image_size=96, eval_size=128, gaussian_sigma=2.0)
    else:
        module = PromptAD(backbone=TINY, image_size=96, eval_size=128, gaussian_sigma=2.0)
    data = bottle_data(root)
    collector, metrics = CollectOutputs(), AnomalyMetrics()
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[collector, metrics], enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(out / "run"))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = trainer.test(module, datamodule=data)[0]
    paths = [sample.image_path for sample in data.test_samples]  # the test loader's order (no shuffling)
    written = export_model(module, out / "model", "both", data.mean, data.std, data.support_paths)
    return Exported(module=module, data=data, collector=collector, logged=logged, paths=paths, written=written,
                    outputs={})  # fmt: skip


@pytest.fixture(scope="module")
def exported_membank(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "mvtec_ad" / "bottle").is_dir():
        pytest.skip("mvtec_ad/bottle not in the shared data")
    return run_and_export("membank", SHARED_DATA / "mvtec_ad", tmp_path_factory.mktemp("membank"))


@pytest.fixture(scope="module")
def exported_promptad(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "mvtec_ad" / "bottle").is_dir():
        pytest.skip("mvtec_ad/bottle not in the shared data")
    return run_and_export("promptad", SHARED_DATA / "mvtec_ad", tmp_path_factory.mktemp("promptad"))


def uint8_batches(paths: list[str], size: int = 8):
    for start in range(0, len(paths), size):
        yield np.stack([load_rgb(p).transpose(2, 0, 1) for p in paths[start : start + size]])


def onnx_outputs(exported: Exported) -> tuple[np.ndarray, np.ndarray]:
    if "onnx" in exported.outputs:
        return exported.outputs["onnx"]
    session = onnxruntime.InferenceSession(str(exported.written["onnx"]), providers=["CPUExecutionProvider"])
    maps, scores = [], []
    for images in uint8_batches(exported.paths):
        anomaly_map, pred_score = session.run(["anomaly_map", "pred_score"], {"image": images})
        maps.append(anomaly_map)
        scores.append(pred_score)
    exported.outputs["onnx"] = np.concatenate(maps), np.concatenate(scores)
    return exported.outputs["onnx"]


def program_outputs(exported: Exported) -> tuple[np.ndarray, np.ndarray]:
    if "pt2" in exported.outputs:
        return exported.outputs["pt2"]
    program = torch.export.load(str(exported.written["pt2"])).module()
    maps, scores = [], []
    with torch.no_grad():
        for images in uint8_batches(exported.paths, size=5):  # another batch size than the recorded one
            anomaly_map, pred_score = program(torch.from_numpy(images))[:2]
            maps.append(anomaly_map.numpy())
            scores.append(pred_score.numpy())
    exported.outputs["pt2"] = np.concatenate(maps), np.concatenate(scores)
    return exported.outputs["pt2"]


@pytest.mark.parametrize("fixture", ["exported_membank", "exported_promptad"])
@pytest.mark.parametrize("backend", ["onnx", "pt2"])
def test_export_matches_the_lightning_module_on_real_bottle_images(request, fixture: str, backend: str) -> None:
    exported = request.getfixturevalue(fixture)
    reference_maps = torch.cat([m.view(-1, 128, 128) for m in exported.collector.maps]).numpy()
    reference_scores = torch.cat(exported.collector.scores).numpy()
    maps, scores = onnx_outputs(exported) if backend == "onnx" else program_outputs(exported)
    assert maps.shape == reference_maps.shape == (len(exported.paths), 128, 128)
    assert np.abs(maps - reference_maps).max() <= 1e-4
    assert np.abs(scores - reference_scores).max() <= 1e-4
    # the control: the scores vary across images by far more than the tolerance, so the check can fail
    assert reference_scores.max() - reference_scores.min() > 1e-2


@pytest.mark.parametrize("backend", ["onnx", "pt2"])
def test_exported_model_reproduces_fsad_test_auroc(exported_membank: Exported, backend: str) -> None:
    exported = exported_membank
    maps, scores = onnx_outputs(exported) if backend == "onnx" else program_outputs(exported)
    labels = torch.cat(exported.collector.labels).numpy()
    masks = torch.cat([m.view(-1, 128, 128) for m in exported.collector.masks]).numpy()
    image_auroc = roc_auc_score(labels, scores)
    pixel_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(image_auroc - exported.logged["image_AUROC"]) <= 1e-4
    assert abs(pixel_auroc - exported.logged["pixel_AUROC"]) <= 1e-4


def test_export_metadata_and_any_input_size(exported_membank: Exported) -> None:
    exported = exported_membank
    metadata = json.loads(exported.written["metadata"].read_text())
    assert metadata["support_files"] == exported.data.support_paths
    assert metadata["backbone"]["arch"] == "fsad-tiny" and metadata["image_size"] == 96
    assert metadata["thresholds"]["image_threshold"] is None and metadata["outputs"] == ["anomaly_map", "pred_score"]
    session = onnxruntime.InferenceSession(str(exported.written["onnx"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 50, 70), (3, 3, 333, 257)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        anomaly_map, pred_score = session.run(None, {"image": images})
        normalised = (torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=(96, 96), mode="bicubic",
                      antialias=True, align_corners=False).clamp(0, 255) / 255.0 - exported.module.thresholds.image_threshold.new_tensor(
                      exported.data.mean).view(1, 3, 1, 1)) / torch.tensor(exported.data.std).view(1, 3, 1, 1)  # fmt: skip
        with torch.no_grad():
            reference_map, reference_score = exported.module(normalised)
        assert anomaly_map.shape == (shape[0], 128, 128)
        assert np.abs(anomaly_map - reference_map.numpy()).max() <= 1e-4
        assert np.abs(pred_score - reference_score.numpy()).max() <= 1e-4
