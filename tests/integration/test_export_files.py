"""What an export folder holds and how a damaged one is refused.

``model.pt2`` (torch.export) carries only the tensors its graph reads, so it is about the size of ``model.onnx``;
recording it prints no warning. ``Inferencer.from_export`` on a corrupt ``model.onnx``, ``model.pt2`` or
``metadata.json`` raises one ``ExportError`` (an ``FsadError``) naming the file, never the reader's own exception.
Tiny random backbone, random support tokens: the files, not the scores, are under test here.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fsad import Inferencer
from fsad.errors import FsadError
from fsad.export import DeployedDetector, export_model
from fsad.lightning_modules.promptad.module import PromptAD

pytestmark = [pytest.mark.filterwarnings("ignore:backbone.pretrained is null")]
TINY = {"arch": "fsad-tiny", "pretrained": None, "taps": [2, 4]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A PromptAD module (it holds the whole CLIP model, text tower included) exported in both formats; the
    warnings raised while exporting are kept."""
    torch.manual_seed(0)
    module = PromptAD(backbone=TINY, image_size=96, eval_size=64, gaussian_sigma=2.0).eval()
    module.prepare_for_data(SimpleNamespace(category="bottle", dataset_name="mvtec"))
    with torch.no_grad():
        module.fit_support(module.backbone(torch.randn(2, 3, 96, 96)))
    out = tmp_path_factory.mktemp("export") / "model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = export_model(module, out, "both")
    return SimpleNamespace(module=module, out=out, written=written, warnings=caught)


def test_program_holds_only_what_inference_reads_and_is_the_size_of_the_onnx_file(exported) -> None:
    program = torch.export.load(str(exported.written["pt2"]))
    saved = set(program.state_dict)
    text_tower = [name for name, _ in exported.module.backbone.clip.transformer.named_parameters()]
    assert text_tower and not any(".clip.transformer." in name for name in saved)  # the text tower is gone
    assert any(".clip.visual." in name for name in saved)  # and the image tower is there
    size_ratio = exported.written["pt2"].stat().st_size / exported.written["onnx"].stat().st_size
    assert size_ratio <= 1.1
    images = torch.randint(0, 256, (3, 3, 70, 130), dtype=torch.uint8)  # another batch size and shape than recorded
    with torch.no_grad():
        expected = exported.module(
            (torch.nn.functional.interpolate(images.float(), size=(96, 96), mode="bicubic", antialias=True,
                                             align_corners=False).clamp(0, 255) / 255.0
             - torch.tensor(exported.module.backbone.image_mean).view(1, 3, 1, 1))
            / torch.tensor(exported.module.backbone.image_std).view(1, 3, 1, 1)
        )  # fmt: skip
        anomaly_map, pred_score = program.module()(images)
    assert torch.allclose(anomaly_map, expected[0], atol=1e-5) and torch.allclose(pred_score, expected[1], atol=1e-5)


def test_program_leaves_out_the_blocks_after_the_last_tap(tmp_path: Path) -> None:
    """The memory bank reads tokens after blocks 1 and 2 of fsad-tiny's 4: blocks 3 and 4 are computed by the
    backbone's forward but feed no output, so the program neither runs nor stores them."""
    from fsad.lightning_modules.membank.module import MemoryBankAD

    torch.manual_seed(0)
    module = MemoryBankAD(backbone={**TINY, "taps": [1, 2]}, image_size=96, eval_size=64).eval()
    with torch.no_grad():
        module.fit_support(module.backbone(torch.randn(2, 3, 96, 96)))
    written = export_model(module, tmp_path, "pt2")
    program = torch.export.load(str(written["pt2"]))
    blocks = {name.split(".resblocks.")[1].split(".")[0] for name in program.state_dict if ".visual." in name
              and ".resblocks." in name}  # fmt: skip
    assert len(module.backbone.clip.visual.transformer.resblocks) == 4 and blocks == {"0", "1"}
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        expected = DeployedDetector(module, module.backbone.image_mean, module.backbone.image_std)(images)
        anomaly_map, pred_score = program.module()(images)
    assert torch.allclose(anomaly_map, expected[0], atol=1e-5) and torch.allclose(pred_score, expected[1], atol=1e-5)


def test_exporting_prints_no_warning(exported) -> None:
    """Neither a deprecation nor torch.export's note on a tensor attribute assigned during the recorded forward
    (PromptAD kept its image-score parts on every call)."""
    assert not exported.warnings, [f"{w.category.__name__}: {str(w.message)[:200]}" for w in exported.warnings]
    assert exported.module.model.last_image_parts is None  # the recording left no traced tensor on the model


def damaged_copy(exported, tmp_path: Path, name: str, content: bytes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(exported.out, folder)
    (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    ("name", "backend", "damage"),
    [
        ("model.onnx", "onnx", "truncate"),
        ("model.onnx", "onnx", "text"),
        ("model.pt2", "pt2", "truncate"),
        ("model.pt2", "pt2", "text"),
        ("metadata.json", "auto", "truncate"),
        ("metadata.json", "auto", "binary"),
        ("metadata.json", "auto", "list"),
    ],
)
def test_from_export_names_the_damaged_file_in_one_line(exported, tmp_path: Path, name, backend, damage) -> None:
    original = (exported.out / name).read_bytes()
    content = {"truncate": original[: len(original) // 2], "text": b"<html>404 Not Found</html>\n",
               "binary": bytes(range(256)), "list": b"[1, 2, 3]\n"}[damage]  # fmt: skip
    folder = damaged_copy(exported, tmp_path, name, content)
    with pytest.raises(FsadError) as raised:
        Inferencer.from_export(folder, backend)
    message = str(raised.value)
    assert str(folder / name) in message and "\n" not in message
    error = raised.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no reader traceback


@pytest.mark.parametrize("backend", ["onnx", "pt2"])
def test_undamaged_export_loads_in_both_backends(exported, backend: str) -> None:
    """The control of the test above: the same folder, undamaged, loads and scores."""
    result = Inferencer.from_export(exported.out, backend).predict(np.zeros((50, 60, 3), np.uint8))
    assert result.anomaly_map.shape == (50, 60) and np.isfinite(result.score)


@pytest.mark.parametrize(
    ("method", "backbone"),
    [("finegrainedad.module.FineGrainedAD", TINY),
     ("aprilgan.module.AprilGan", {**TINY, "taps": [1, 2, 3, 4], "vv_attention": False})],
)  # fmt: skip
def test_exporting_the_other_image_part_recorders_prints_no_warning(tmp_path: Path, method: str, backbone) -> None:
    """FineGrainedAD and APRIL-GAN keep their image-score parts, as PromptAD, only while the paper protocol's
    callback asks, so recording their forward assigns no tensor attribute either."""
    import importlib

    module_path, name = f"fsad.lightning_modules.{method}".rsplit(".", 1)
    torch.manual_seed(0)
    module = getattr(importlib.import_module(module_path), name)(backbone=backbone, image_size=96, eval_size=64).eval()
    module.prepare_for_data(SimpleNamespace(category="bottle", dataset_name="mvtec"))
    with torch.no_grad():
        module.fit_support(module.backbone(torch.randn(2, 3, 96, 96)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(module, tmp_path / "model", "pt2")
    assert not caught, [f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught]
    assert module.model.last_image_parts is None
