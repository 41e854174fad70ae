"""fsad's WinCLIP against golden numbers written by anomalib's WinCLIP torch model (``tests/parity/winclip_golden.py``).

anomalib ran in its own virtual environment on the same real bottle pixels (stored in the fixture) and the same
weights filled by name; here fsad computes every stage with its own backbone wrapper, window gather, prompt
ensemble, harmonic aggregation, memory bank and post-processing. ``code`` fixtures are anomalib unchanged;
``paper`` fixtures are anomalib with its window transposition undone (see the generator's docstring).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from fsad.lightning_modules.winclip.module import WinCLIP
from tests.parity.weights import fill_by_name

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
GOLDEN = FIXTURES / "winclip"
TOLERANCE = 1e-5
MAP_STRIDE = 8
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] → CLIP-normalised [N,3,H,W], the formula the generator applies."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def assert_close(ours: torch.Tensor, theirs: np.ndarray, what: str, tolerance: float = TOLERANCE) -> None:
    difference = float((ours.detach().float() - torch.from_numpy(np.asarray(theirs, dtype=np.float32))).abs().max())
    assert difference <= tolerance, f"{what}: max |Δ| = {difference:.3g} > {tolerance}"


def winclip_on(arch: str, variant: str, layers: int) -> WinCLIP:
    module = WinCLIP(
        backbone={"arch": arch, "pretrained": None, "taps": [0, layers], "vv_attention": False},
        image_size=240, eval_size=240, gaussian_sigma=0.0, variant=variant,
    )  # fmt: skip
    meta = json.loads((GOLDEN / "meta.json").read_text())
    fill_by_name(module.backbone.clip, meta["weight_seed"], std=meta["weight_std"])
    module.model.build_text(module.backbone, "bottle")
    return module


def check_case(case: str, arch: str, layers: int, variant: str, windows: bool) -> None:
    with np.load(GOLDEN / f"{case}.npz") as data:
        golden = {key: data[key] for key in data.files}
    theirs = {key[len(variant) + 1 :]: value for key, value in golden.items() if key.startswith(variant + "_")}
    module = winclip_on(arch, variant, layers)
    support, test = normalise(golden["support_pixels"]), normalise(golden["test_pixels"])
    # fsad encodes the prompts up to their end-of-text token (13 positions), anomalib all 77: on ViT-B-16-plus-240 the
    # embeddings (up to 12.3 in size) then differ by 1.05e-5, 8.5e-7 of their scale (a listed deviation, README)
    scale = max(1.0, float(np.abs(theirs["text_embeddings"]).max()))
    assert_close(module.model.text_embeddings, theirs["text_embeddings"], "text embeddings", TOLERANCE * scale)

    features = module.backbone(test)
    zero = module.model.stages(features, module.backbone)
    assert_close(zero["class_score"], theirs["class_score"], "class score (Eq. 1)")
    assert_close(zero["zero_shot_map"].reshape(-1, 15, 15), theirs["zero_shot_map"], "zero-shot map")
    maps, scores = module(test)
    assert_close(scores, theirs["zero_shot_pred_score"], "zero-shot image score")
    assert_close(maps[:, ::MAP_STRIDE, ::MAP_STRIDE], theirs["zero_shot_anomaly_map"], "zero-shot final map")
    if windows:
        for scale in (2, 3):
            assert_close(
                zero[f"window_embeddings_{scale}"], theirs[f"window_embeddings_{scale}"], f"{scale}×{scale} windows"
            )
        patches = module.model.patch_embeddings(features, module.backbone)
        assert_close(patches, theirs["patch_embeddings"], "patch embeddings")
        support_windows = module.model.window_embeddings(module.backbone(support), module.backbone)
        for scale, embedding in zip((2, 3), support_windows, strict=True):
            assert_close(embedding, theirs[f"support_window_embeddings_{scale}"], f"support {scale}×{scale} windows")

    module.fit_support(module.backbone(support))
    few = module.model.stages(features, module.backbone)
    assert_close(few["few_shot_map"].reshape(-1, 15, 15), theirs["few_shot_map"], "few-shot map (Eq. 4)")
    maps, scores = module(test)
    assert_close(scores, theirs["few_shot_pred_score"], "WinCLIP+ image score")
    assert_close(maps[:, ::MAP_STRIDE, ::MAP_STRIDE], theirs["few_shot_anomaly_map"], "WinCLIP+ final map")


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_every_stage_matches_anomalib_on_a_15x15_grid(variant: str) -> None:
    open_clip.add_model_config(FIXTURES / "fsad-parity-240.json")
    check_case("parity240", "fsad-parity-240", 12, variant, windows=True)


@pytest.mark.slow
def test_vit_b_16_plus_240_matches_anomalib() -> None:
    """The paper's backbone itself (random weights): text, scores and maps of two images, anomalib unchanged."""
    if not (GOLDEN / "vitb16plus.npz").is_file():
        pytest.skip("vitb16plus.npz not generated")
    check_case("vitb16plus", "ViT-B-16-plus-240", 12, "code", windows=False)


def test_the_two_variants_really_differ() -> None:
    """The transposition anomalib inherits changes the window embeddings far beyond the tolerance."""
    with np.load(GOLDEN / "parity240.npz") as data:
        difference = np.abs(data["paper_window_embeddings_2"] - data["code_window_embeddings_2"]).max()
    assert difference > 100 * TOLERANCE
