"""KAG-prompt ``variant: code`` against the authors' own head, stage by stage, to ≤ 1e-5.

The golden numbers come from ``tests/parity/kagprompt_golden.py``, which runs CVL-hub/KAG-prompt's modules and their
training (recovered) and test forward passes; ``meta.json`` records their commit and the sizes used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.kagprompt.model import KAGPromptModel, kag_loss

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures/parity/kagprompt"
TOLERANCE = 1e-5

# our parameter name -> the authors' (OpenLLAMAPEFTModel attribute paths)
AUTHORS_NAMES = {
    **{f"projections.{i}.0.{p}": f"image_decoder.fc.{i}.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"multi_kernel.convs.{i}.{p}": f"mmci.conv{i + 1}.{p}" for i in range(4) for p in ("weight", "bias")},
    "graph.inter.weight": "aGNN.linear_e.weight",
    "graph.gate.weight": "aGNN.gate.weight",
    "graph.mix.weight": "aGNN.conv_fusion.weight",
    "graph.mix.bias": "aGNN.conv_fusion.bias",
    **{f"graph.gru.{ours}.{p}": f"aGNN.ConvGRU.{theirs}.{p}" for ours, theirs in
       (("update", "update_gate"), ("reset", "reset_gate"), ("candidate", "out_gate")) for p in ("weight", "bias")},
    "graph.output_conv.weight": "aGNN.conv1.weight",
    "graph.output_conv.bias": "aGNN.conv1.bias",
    **{f"graph.output_norm.{p}": f"aGNN.bn1.{p}" for p in
       ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
    "image_head.weight": "adapter.linear1.weight",
    "image_head.bias": "adapter.linear1.bias",
}  # fmt: skip


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    with np.load(FIXTURES / "golden.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURES / "meta.json").read_text())


def authors_model(golden: dict[str, torch.Tensor], meta: dict) -> KAGPromptModel:
    model = KAGPromptModel(
        width=meta["width"], dim=meta["channels"], taps=[1, 2, 3, 4], variant="code", rounds=5, gamma=meta["gamma"],
        score_gamma=meta["gamma"], top_k=meta["top_k"], graph_dim=None, score_size=meta["score_size"],
    )  # fmt: skip
    state = model.state_dict()
    assert set(state) == set(AUTHORS_NAMES), "every parameter of ours has exactly one of the authors'"
    model.load_state_dict(
        {ours: golden[f"param/{theirs}"].reshape(state[ours].shape) for ours, theirs in AUTHORS_NAMES.items()}
    )
    return model


def features(golden: dict[str, torch.Tensor], meta: dict, taps_key: str, embed: torch.Tensor | None) -> BackboneOutput:
    taps = golden[taps_key]
    grid = (meta["grid"], meta["grid"])
    cls = embed if embed is not None else torch.zeros(taps.shape[1], meta["channels"])
    return BackboneOutput(cls=cls, vv_tokens=None, taps={i + 1: taps[i] for i in range(4)}, grid=grid)


def capture_stages(model: KAGPromptModel) -> dict[str, torch.Tensor]:
    stages: dict[str, torch.Tensor] = {}
    model.multi_kernel.register_forward_hook(lambda _m, _i, out: stages.__setitem__("multi_kernel", out))
    model.graph.register_forward_hook(lambda _m, _i, out: stages.__setitem__("graph", out))
    return stages


def layer_first(maps: torch.Tensor, batch: int) -> torch.Tensor:
    """Ours [B·L,C,h,w] or [B,L,C,h,w] → the authors' [L,B,C,h,w]."""
    return maps.reshape(batch, 4, *maps.shape[-3:]).transpose(0, 1)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, stage: str) -> None:
    difference = (ours.detach() - theirs).abs().max().item()
    assert difference <= TOLERANCE, f"{stage}: max |ours − authors'| = {difference:.2e}"


def test_fixture_records_the_authors_commit(meta: dict) -> None:
    assert len(meta["authors_commit"]) == 40 and meta["training_forward_from"].startswith("f7d19a9^")


def test_training_forward_and_loss_equal_the_authors(golden: dict[str, torch.Tensor], meta: dict) -> None:
    model = authors_model(golden, meta).train()
    stages = capture_stages(model)
    query = features(golden, meta, "input/query_taps", golden["input/query_embed"])
    outputs = model(query, golden["input/text"])
    batch = meta["batch"]
    assert_close(layer_first(stages["multi_kernel"], batch), golden["train/multi_kernel"], "multi-kernel (train)")
    assert_close(layer_first(stages["graph"], batch), golden["train/graph"], "graph (train)")
    assert_close(outputs["layer_maps"], golden["train/layer_maps"], "per-map text maps (train)")
    target = golden["input/masks"] > 0.3
    labels = target.flatten(1).amax(1).long()
    terms = kag_loss(outputs, target, labels, "code")
    assert_close(terms["focal"] / golden["train/focal_sum"], torch.tensor(1.0), "focal sum (relative)")
    assert_close(terms["dice"] / golden["train/dice_sum"], torch.tensor(1.0), "dice sum (relative)")
    assert_close(terms["loss"] / golden["train/loss"], torch.tensor(1.0), "loss (relative)")
    norm = model.graph.output_norm  # one running-statistics update per (sample, layer) node (C3)
    assert_close(norm.running_mean, golden["train/bn_running_mean"], "BN running mean")
    assert_close(norm.running_var, golden["train/bn_running_var"], "BN running var")


def test_test_time_maps_and_scores_equal_the_authors(golden: dict[str, torch.Tensor], meta: dict) -> None:
    model = authors_model(golden, meta).train()
    query = features(golden, meta, "input/query_taps", golden["input/query_embed"])
    model(query, golden["input/text"])  # the authors evaluate after their training step updated BN's statistics
    model.eval()
    stages = capture_stages(model)
    with torch.no_grad():
        textual = model(query, golden["input/text"])["layer_maps"].mean(1)
        assert_close(layer_first(stages["multi_kernel"], meta["batch"]), golden["eval/multi_kernel"], "multi-kernel")
        assert_close(layer_first(stages["graph"], meta["batch"]), golden["eval/graph"], "graph (eval)")
        assert_close(textual, golden["eval/textual"], "text map")
        model.fit(features(golden, meta, "input/support_taps", None))
        outputs = model(query, golden["input/text"])
    assert_close(outputs["image_logits"][:, 1], golden["eval/similarity"], "s1")
    assert_close(outputs["anomaly_map"], golden["eval/fused"], "fused map")
    assert_close(outputs["score"], golden["eval/score"], "image score")
