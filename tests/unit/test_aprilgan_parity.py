"""APRIL-GAN against numbers the authors' own test.py and train.py wrote (``tests/parity/aprilgan_golden.py``).

The fixture holds their preprocessed bottle images, text features, per-layer maps, zero- and few-shot maps and
scores, and one training step's losses and adapter gradients, all computed by their code on the ``fsad-parity``
architecture with weights filled by name. Here fsad computes the same stages with its own backbone wrapper, module
and model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch

from fsad.lightning_modules.aprilgan.model import aprilgan_loss
from fsad.lightning_modules.aprilgan.module import AprilGan
from tests.parity.weights import fill_by_name

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
GOLDEN = FIXTURES / "aprilgan"
TOLERANCE = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


def assert_close(ours: torch.Tensor, theirs: np.ndarray, what: str, tolerance: float = TOLERANCE) -> None:
    difference = float((ours.detach().float() - torch.from_numpy(np.asarray(theirs, dtype=np.float32))).abs().max())
    assert difference <= tolerance, f"{what}: max |Δ| = {difference:.3g} > {tolerance}"


@pytest.fixture(scope="module")
def meta() -> dict:
    open_clip.add_model_config(FIXTURES / "fsad-parity.json")
    return json.loads((GOLDEN / "meta.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "golden.npz"))


def load_adapters(module: AprilGan, golden: dict[str, np.ndarray], prefix: str) -> None:
    """The authors' ``fc.<i>`` weights into fsad's ``adapters.<i>``."""
    state = {f"adapters.{k[len(prefix) + 3 :]}": torch.from_numpy(v) for k, v in golden.items() if k.startswith(prefix)}
    module.model.load_state_dict(state, strict=False)


@pytest.fixture()
def module(meta: dict, golden: dict[str, np.ndarray]) -> AprilGan:
    spec = {"arch": "fsad-parity", "pretrained": None, "taps": meta["taps"], "vv_attention": False}
    module = AprilGan(backbone=spec, image_size=meta["image_size"], eval_size=meta["image_size"])
    fill_by_name(module.backbone.clip, meta["seed"])
    load_adapters(module, golden, "adapters/")
    module.prepare_for_data(SimpleNamespace(category="bottle"))
    return module.eval()


def test_the_backbone_has_the_authors_parameter_names(module: AprilGan, meta: dict) -> None:
    """Weights are filled by name, so equal names mean equal weights on both sides."""
    assert sorted(n for n, _ in module.backbone.clip.named_parameters()) == meta["authors_parameter_names"]


def test_text_features_and_backbone_stages(module: AprilGan, golden: dict[str, np.ndarray]) -> None:
    assert_close(module.text_features("bottle"), golden["text"], "prompt-ensemble text features")
    features = module.backbone(torch.from_numpy(golden["query_images"]))
    assert_close(features.cls, golden["query_cls"], "CLS embedding")
    assert_close(torch.stack([features.taps[t] for t in sorted(features.taps)], dim=1), golden["query_taps"], "taps")


def test_zero_shot_maps_and_scores(module: AprilGan, golden: dict[str, np.ndarray]) -> None:
    features = module.backbone(torch.from_numpy(golden["query_images"]))
    text = module.text_features("bottle").expand(2, -1, -1)
    outputs = module.model(features, text)
    assert set(outputs) == {"layer_probabilities", "text_map", "image_probability", "anomaly_map", "score"}
    assert_close(outputs["layer_probabilities"][:, :, 1], golden["layer_probabilities"], "per-layer anomalous maps")
    assert_close(outputs["text_map"], golden["zero_shot_map"], "zero-shot map (Σ over layers)")
    assert_close(outputs["image_probability"], golden["zero_shot_score"], "zero-shot image score")
    anomaly_map, score = module(torch.from_numpy(golden["query_images"]))  # the module end to end (eval_size 96)
    assert_close(anomaly_map, golden["zero_shot_map"], "module zero-shot map")
    assert_close(score, golden["zero_shot_score"], "module zero-shot score")


def test_few_shot_maps_and_the_image_score_rule(module: AprilGan, golden: dict[str, np.ndarray]) -> None:
    module.fit_support(module.backbone(torch.from_numpy(golden["support_images"])))
    features = module.backbone(torch.from_numpy(golden["query_images"]))
    outputs = module.model(features, module.text_features("bottle").expand(2, -1, -1))
    memory_term = golden["few_shot_map"] - golden["zero_shot_map"]  # their Σ_l (1 − max cos_l)
    assert_close(outputs["memory_map"], memory_term, "few-shot memory map (Σ over layers of 1 − cos)")
    assert_close(outputs["anomaly_map"], golden["few_shot_map"], "few-shot map")
    # their image score: ½(text probability + the map maxima min-max normalised over the test set)
    maxima = golden["few_shot_map"].reshape(2, -1).max(axis=1)
    normalised = (maxima - maxima.min()) / (maxima.max() - maxima.min())
    np.testing.assert_allclose(golden["few_shot_score"], 0.5 * (golden["zero_shot_score"] + normalised), atol=1e-6)
    # fsad's per-image rule (README, deviation 1): ½(text probability + max of the map), without the normalisation
    expected = 0.5 * (golden["zero_shot_score"] + maxima)
    assert_close(outputs["score"], expected, "few-shot image score, per image")
    _, score = module(torch.from_numpy(golden["query_images"]))
    assert_close(score, expected, "module few-shot score")


def test_one_training_step_loss_and_gradients(module: AprilGan, golden: dict[str, np.ndarray]) -> None:
    load_adapters(module, golden, "train/initial/")
    features = module.backbone(torch.from_numpy(golden["train/images"]))
    text = module.text_features("bottle").expand(2, -1, -1)
    probabilities = module.model.layer_probabilities(features, text)
    terms = aprilgan_loss(probabilities, torch.from_numpy(golden["train/target"]) > 0.5)
    assert_close(terms["focal"], golden["train/focal_sum"], "focal loss (Σ over layers)")
    assert_close(terms["dice"], golden["train/dice_sum"], "Dice loss (Σ over layers)")
    terms["loss"].backward()
    for name, value in golden.items():
        if name.startswith("train/grad/"):
            index, kind = name.removeprefix("train/grad/fc.").split(".")
            assert_close(getattr(module.model.adapters[int(index)], kind).grad, value, f"gradient of {name}")
