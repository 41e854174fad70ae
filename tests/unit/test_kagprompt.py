"""KAG-prompt pieces: NSA synthesis, ConvGRU, the graph, the two variants, the image score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsad.datamodules.synthesis import nsa_synthesize
from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.kagprompt.model import (
    ConvGRUCell,
    KAGPromptModel,
    KernelAwareGraph,
    MultiKernelConv,
    image_score,
)


def images(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = np.full((80, 96, 3), 20, dtype=np.uint8)
    target[15:65, 20:76] = rng.integers(100, 200, (50, 56, 3))  # an object on a dark background
    source = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    return target, source


def test_nsa_mask_is_exactly_the_changed_pixels_and_reproducible() -> None:
    target, source = images(0)
    image, mask = nsa_synthesize(target, source, np.random.default_rng(7))
    assert mask.dtype == np.uint8 and mask.any()
    assert np.array_equal(mask.astype(bool), np.any(image != target, axis=2))
    again, again_mask = nsa_synthesize(target, source, np.random.default_rng(7))
    assert np.array_equal(image, again) and np.array_equal(mask, again_mask)
    other, _ = nsa_synthesize(target, source, np.random.default_rng(8))
    assert not np.array_equal(image, other)
    ys, xs = np.nonzero(mask)
    assert ys.min() >= 10 and ys.max() <= 70  # the patch is centred inside the object (rows 15..64), plus blending


def test_conv_gru_step_equals_its_equations() -> None:
    torch.manual_seed(0)
    cell = ConvGRUCell(3)
    x, h = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)

    def conv1x1(conv: torch.nn.Conv2d, inp: torch.Tensor) -> torch.Tensor:  # W·v + b at every pixel
        weight = conv.weight[:, :, 0, 0]
        return torch.einsum("oc,bchw->bohw", weight, inp) + conv.bias.view(1, -1, 1, 1)

    z = torch.sigmoid(conv1x1(cell.update, torch.cat([x, h], 1)))
    r = torch.sigmoid(conv1x1(cell.reset, torch.cat([x, h], 1)))
    candidate = torch.tanh(conv1x1(cell.candidate, torch.cat([x, r * h], 1)))
    torch.testing.assert_close(cell(x, h), (1 - z) * h + z * candidate)


def fake_features(batch: int = 2, width: int = 16, grid: tuple[int, int] = (6, 6)) -> BackboneOutput:
    taps = {t: torch.randn(batch, grid[0] * grid[1], width) for t in (1, 2, 3, 4)}
    return BackboneOutput(cls=torch.randn(batch, 8), vv_tokens=None, taps=taps, grid=grid)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_graph_shapes_and_gradients_reach_every_parameter(variant: str) -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(width=16, dim=8, taps=[1, 2, 3, 4], variant=variant, rounds=2, graph_dim=6)
    text = torch.randn(2, 2, 8)
    outputs = model(fake_features(), text)
    maps = 4 if variant == "paper" else 8
    assert outputs["layer_maps"].shape == (2, maps, 6, 6) and outputs["image_probability"].shape == (2,)
    (outputs["layer_maps"] * torch.randn_like(outputs["layer_maps"])).sum().add(outputs["image_probability"].sum()).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_variants_differ_exactly_where_specified() -> None:
    paper, code = KernelAwareGraph(8, 4, 2, "paper"), KernelAwareGraph(8, 4, 2, "code")
    assert paper.intra is not None and code.intra is None  # Eq. 3 self-loop edge only in the paper
    assert isinstance(paper.gate, torch.nn.Linear) and isinstance(code.gate, torch.nn.Conv2d)  # GAP vs per-pixel gate
    assert not hasattr(paper, "mix") and code.mix.in_channels == 3 * 8  # summed vs concatenated messages
    assert not hasattr(paper, "output") and isinstance(code.output[1], torch.nn.BatchNorm2d)  # N^T+V vs BN-ReLU-conv
    assert MultiKernelConv(8, "paper").norm is not None and MultiKernelConv(8, "code").norm is None
    # the shared parts behave identically: same ConvGRU weights give the same update
    code.gru.load_state_dict(paper.gru.state_dict())
    x, h = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(paper.gru(x, h), code.gru(x, h))
    # the memory bank: post-graph outputs (paper) vs raw backbone tokens (code)
    torch.manual_seed(0)
    features = fake_features()
    paper_model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", rounds=1, graph_dim=None)
    code_model = KAGPromptModel(16, 8, [1, 2, 3, 4], "code", rounds=1, graph_dim=None)
    paper_model.fit(features)
    code_model.fit(features)
    assert paper_model.memory.banks[0].shape[-1] == 8 and code_model.memory.banks[1].shape[-1] == 16


def test_image_score_is_gamma_mix_of_cls_and_top_k_mean() -> None:
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, :5] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    # top 3 pixels: mean(0.9, 0.8, 0.7) = 0.8; s = 0.1·0.4 + 0.9·0.8 = 0.76
    assert abs(float(image_score(torch.tensor([0.4]), maps, 0.1, 3)) - 0.76) < 1e-6
