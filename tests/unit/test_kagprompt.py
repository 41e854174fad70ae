"""KAG-prompt paper variant, equation by equation, against direct computations written here from the paper's formulas
(Eq. 1–17); the loss on a hand-computed case; the ablation switches. ``variant: code`` is checked number for number
against the authors' head in test_kagprompt_parity.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fsad.batch import Batch
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec
from fsad.lightning_modules.kagprompt.model import (
    ConvGRUCell,
    KAGPromptModel,
    KernelAwareGraph,
    MultiKernelConv,
    image_score,
    kag_loss,
)
from fsad.lightning_modules.kagprompt.module import KAGPrompt

REPO = Path(__file__).resolve().parents[2]


def fake_features(batch: int = 2, width: int = 16, grid: tuple[int, int] = (6, 6), dim: int = 8) -> BackboneOutput:
    taps = {t: torch.randn(batch, grid[0] * grid[1], width) for t in (1, 2, 3, 4)}
    return BackboneOutput(cls=torch.randn(batch, dim), vv_tokens=None, taps=taps, grid=grid)


def randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (the authors' N(0, 0.01) init makes most terms vanishingly small)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def test_eq1_multi_kernel_is_the_normalised_sum_of_resized_convolutions() -> None:
    torch.manual_seed(0)
    block = MultiKernelConv(2, "paper", kernels=((1, 1), (2, 2)))
    randomise(block)
    x = torch.randn(1, 2, 3, 3)
    one = F.conv2d(x, block.convs[0].weight, block.convs[0].bias)  # 3×3 already
    two = F.conv2d(x, block.convs[1].weight, block.convs[1].bias)  # 2×2 → 3×3, align_corners=True by hand:
    rows = torch.stack([two[..., 0, :], (two[..., 0, :] + two[..., 1, :]) / 2, two[..., 1, :]], dim=-2)
    two_up = torch.stack([rows[..., 0], (rows[..., 0] + rows[..., 1]) / 2, rows[..., 1]], dim=-1)
    total = one + two_up
    mean, var = total.mean(), total.var(unbiased=False)  # Norm: one group over C, H, W
    weight, bias = block.norm.weight.view(1, -1, 1, 1), block.norm.bias.view(1, -1, 1, 1)
    expected = (total - mean) / torch.sqrt(var + block.norm.eps) * weight + bias
    torch.testing.assert_close(block(x), expected)


def test_conv_gru_step_equals_its_equations() -> None:
    torch.manual_seed(0)
    cell = ConvGRUCell(3)
    randomise(cell)
    x, h = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)

    def conv1x1(conv: torch.nn.Conv2d, inp: torch.Tensor) -> torch.Tensor:  # W·v + b at every pixel
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], inp) + conv.bias.view(1, -1, 1, 1)

    z = torch.sigmoid(conv1x1(cell.update, torch.cat([x, h], 1)))
    r = torch.sigmoid(conv1x1(cell.reset, torch.cat([x, h], 1)))
    candidate = torch.tanh(conv1x1(cell.candidate, torch.cat([x, r * h], 1)))
    torch.testing.assert_close(cell(x, h), (1 - z) * h + z * candidate)


def conv1x1(conv: torch.nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution W * N on tokens [HW, C]: N Wᵀ + b."""
    out = tokens @ conv.weight[:, :, 0, 0].T
    return out if conv.bias is None else out + conv.bias


def paper_graph_reference(
    graph: KernelAwareGraph, nodes: torch.Tensor, gate: bool = True, gru: bool = True, reverse: str = "transpose"
) -> torch.Tensor:
    """Eq. 2–11 for one sample, node by node and edge by edge, written from the paper (T rounds).

    gate=False: every message weight 1 ("w/o gate"); gru=False: the aggregate is the next state ("w/o ConvGRU");
    reverse="same": the reverse edge reuses W_c instead of Eq. 5's W_cᵀ.
    """
    layers, c, h, w = nodes.shape
    flat = [nodes[i].reshape(c, h * w).T for i in range(layers)]  # N_i as [HW, C]
    wc = graph.inter.weight.T  # W_c of Eq. 4 (nn.Linear computes x Wᵀ)

    def weight(message: torch.Tensor) -> torch.Tensor | float:  # Eq. 8: σ(GAP(W_GAP * h + b))
        return torch.sigmoid(conv1x1(graph.gate, message).mean(0)) if gate else 1.0

    def update(message: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # Eq. 10, on [HW, C]
        if not gru:
            return message
        z = torch.sigmoid(conv1x1(graph.gru.update, torch.cat([message, state], 1)))
        r = torch.sigmoid(conv1x1(graph.gru.reset, torch.cat([message, state], 1)))
        candidate = torch.tanh(conv1x1(graph.gru.candidate, torch.cat([message, r * state], 1)))
        return (1 - z) * state + z * candidate

    state = flat
    for _ in range(graph.rounds):
        new_state = []
        for i in range(layers):
            q, k = conv1x1(graph.intra_query, state[i]), conv1x1(graph.intra_key, state[i])
            value = conv1x1(graph.intra_value, state[i])
            e_ii = graph.alpha * torch.softmax(q @ k.T, dim=1) @ value + state[i]  # Eq. 3
            total = weight(e_ii) * e_ii  # h_ii = e_ii (Eq. 6), gated as every message (Eq. 9)
            for j in range(layers):
                if j == i:
                    continue
                if j > i or reverse == "same":
                    edge = state[i] @ wc @ state[j].T  # Eq. 4 for the pair i < j (no 1/√d)
                else:
                    # Eq. 5 for the pair j < i: N_i W_cᵀ N_jᵀ, the transpose of that pair's Eq. 4 edge N_j W_c N_iᵀ
                    edge = state[i] @ wc.T @ state[j].T
                message = torch.softmax(edge, dim=1) @ state[j]  # Eq. 7, row softmax
                total = total + weight(message) * message  # Eq. 8–9
            new_state.append(update(total, state[i]))
        state = new_state
    return torch.stack([state[i].T.reshape(c, h, w) + nodes[i] for i in range(layers)])  # Eq. 11


def test_eq2_to_eq11_paper_graph_equals_the_node_by_node_formula() -> None:
    torch.manual_seed(0)
    graph = KernelAwareGraph(3, 3, rounds=2, variant="paper")
    randomise(graph)
    nodes = torch.randn(2, 3, 3, 2, 2)
    out = graph(nodes)
    for b in range(2):
        torch.testing.assert_close(out[b], paper_graph_reference(graph, nodes[b]), atol=1e-5, rtol=1e-5)


def test_eq5_reverse_edge_is_an_option_and_changes_the_messages() -> None:
    torch.manual_seed(0)
    printed = KernelAwareGraph(3, 3, rounds=2, variant="paper")
    randomise(printed)
    same = KernelAwareGraph(3, 3, rounds=2, variant="paper", reverse_edge="same")
    same.load_state_dict(printed.state_dict())
    nodes = torch.randn(1, 3, 3, 2, 2)
    reference = paper_graph_reference(same, nodes[0], reverse="same")
    torch.testing.assert_close(same(nodes)[0], reference, atol=1e-5, rtol=1e-5)
    assert (printed(nodes)[0] - reference).abs().max() > 1e-3  # W_cᵀ one way is not W_c both ways


def paper_nodes_reference(model: KAGPromptModel, features: BackboneOutput, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, V) [L,D,h,w] of sample b from the paper: Linear projection, Eq. 1, then Eq. 2–11 (or O = V without the
    graph)."""
    h, w = features.grid
    nodes = []
    for projection, tap in zip(model.projections, model.taps, strict=True):
        tokens = features.taps[tap][b] @ projection.weight.T + projection.bias  # Linear(P_i), [HW, D]
        x = tokens.T.reshape(1, -1, h, w)
        total = sum(  # Eq. 1: Σ_k C_k(x), each resized back to the grid (align_corners=True)
            F.interpolate(F.conv2d(x, conv.weight, conv.bias), size=(h, w), mode="bilinear", align_corners=True)
            for conv in model.multi_kernel.convs
        )
        norm = model.multi_kernel.norm  # Norm: one group over C, H, W
        normalised = (total - total.mean()) / torch.sqrt(total.var(unbiased=False) + norm.eps)
        nodes.append((normalised * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))[0])
    kernels = torch.stack(nodes)
    if model.graph is None:
        return kernels, kernels
    return paper_graph_reference(model.graph, kernels), kernels


def paper_scores_reference(
    model: KAGPromptModel, features: BackboneOutput, text: torch.Tensor, support: BackboneOutput | None,
    gamma: float, score_gamma: float, top_k: int,
) -> dict[str, list[torch.Tensor]]:  # fmt: skip
    """Eq. 12–16 per sample from the formulas; Up = bilinear to the score size, align_corners=True."""
    size = model.score_size

    def up(grid: torch.Tensor) -> torch.Tensor:
        return F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]

    cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # noqa: E731
    h, w = features.grid
    banks = None
    if support is not None:
        outs = [paper_nodes_reference(model, support, s)[0] for s in range(support.cls.shape[0])]
        banks = [torch.cat([o[i].flatten(1).T for o in outs]) for i in range(4)]  # R_i: every support O_i token
    result: dict[str, list[torch.Tensor]] = {"layer_maps": [], "textual": [], "visual": [], "fused": [], "score": []}
    for b in range(features.cls.shape[0]):
        graph_out, _ = paper_nodes_reference(model, features, b)
        per_layer, distances = [], []
        for i in range(4):
            tokens = graph_out[i].flatten(1).T  # O_i [HW, D]
            probabilities = torch.softmax(model.text_scale * cos(tokens, text[b]), dim=1)  # Eq. 12, on the grid
            per_layer.append(probabilities[:, 1].reshape(h, w))
            if banks is not None:
                distances.append(1 - cos(tokens, banks[i]).max(dim=1).values.reshape(h, w))  # Eq. 13 per layer
        m_p = up(torch.stack(per_layer).mean(0))  # Eq. 12: Up(Norm Σ_i), Norm = the mean of the 4 layers
        fused = m_p
        if banks is not None:
            m_v = up(torch.stack(distances).sum(0))  # Eq. 13: Up(Σ_i), the sum as printed
            fused = gamma * m_p + (1 - gamma) * m_v  # Eq. 14
            result["visual"].append(m_v)
        s1 = cos(features.cls[b : b + 1] @ model.image_head.weight.T + model.image_head.bias, text[b])[0, 1]  # Eq. 15
        score = score_gamma * s1 + (1 - score_gamma) * fused.flatten().topk(top_k).values.mean()  # Eq. 16
        result["layer_maps"].append(torch.stack([up(m) for m in per_layer]))
        result["textual"].append(m_p)
        result["fused"].append(fused)
        result["score"].append(score)
    return result


def assert_matches(outputs: dict[str, torch.Tensor], reference: dict[str, list[torch.Tensor]]) -> None:
    names = {"layer_maps": "layer_maps", "textual": "textual_map", "visual": "visual_map", "fused": "anomaly_map",
             "score": "score"}  # fmt: skip
    for ours, theirs in names.items():
        if reference[ours]:
            torch.testing.assert_close(outputs[theirs], torch.stack(reference[ours]), atol=2e-5, rtol=1e-5)


def test_eq12_to_eq16_maps_fusion_and_score_equal_the_formulas() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", rounds=1, gamma=0.2, score_gamma=0.3, top_k=5, score_size=11)
    randomise(model)
    features, text = fake_features(), torch.randn(2, 2, 8)
    support = fake_features(batch=3)
    model.fit(support)
    outputs = model(features, text)
    assert outputs["anomaly_map"].shape == (2, 11, 11)  # the 6×6 grid upsampled: Up is exercised
    assert_matches(outputs, paper_scores_reference(model, features, text, support, 0.2, 0.3, 5))


def test_eq13_mean_reduction_is_the_sum_over_four() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", rounds=1, score_size=9)
    averaged = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", rounds=1, score_size=9, visual_reduction="mean")
    randomise(model)
    averaged.load_state_dict(model.state_dict())
    features, support, text = fake_features(), fake_features(batch=2), torch.randn(2, 2, 8)
    model.fit(support)
    averaged.fit(support)
    torch.testing.assert_close(averaged(features, text)["visual_map"], model(features, text)["visual_map"] / 4)


def test_image_score_is_gamma_mix_of_cls_and_top_k_mean() -> None:
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, :5] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    # top 3 pixels: mean(0.9, 0.8, 0.7) = 0.8; s = 0.1·0.4 + 0.9·0.8 = 0.76
    assert abs(float(image_score(torch.tensor([0.4]), maps, 0.1, 3)) - 0.76) < 1e-6


def hand_outputs() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two identical maps of two pixels, M = [0.8, 0.3], G = [1, 0], c = 1, s = [s_n, s₁] = [0.2, 0.5]."""
    maps = torch.tensor([[[[0.8, 0.3]], [[0.8, 0.3]]]])
    outputs = {"layer_maps": maps, "normal_maps": 1 - maps, "image_logits": torch.tensor([[0.2, 0.5]])}
    return outputs, torch.tensor([[[1.0, 0.0]]]), torch.tensor([1])


def test_eq17_paper_loss_on_a_hand_computed_case() -> None:
    outputs, target, labels = hand_outputs()
    image = -math.log(1 / (1 + math.exp(-0.5)))  # CE(s₁, c) with c = 1
    focal = (-(0.2**2) * math.log(0.8) - (0.3**2) * math.log(0.7)) / 2  # p_t = 0.8 and 1 − 0.3, mean over pixels
    dice = (1 - (2 * 0.8 + 1) / (1.1 + 1 + 1)) + (1 - (2 * 0.7 + 1) / (0.9 + 1 + 1))  # Dice(M,G) + Dice(1−M,1−G)
    terms = kag_loss(outputs, target, labels, "paper")
    assert terms["image"].item() == pytest.approx(image, rel=1e-6)
    assert terms["focal"].item() == pytest.approx(2 * focal, rel=1e-6)  # summed over the 2 maps
    assert terms["dice"].item() == pytest.approx(2 * dice, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(image + 2 * focal + 2 * dice, rel=1e-6)


def test_code_loss_on_a_hand_computed_case() -> None:
    outputs, target, labels = hand_outputs()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    image = -(math.log(1 - sig(0.2)) + math.log(sig(0.5))) / 2  # BCE over both one-hot columns
    eps = 1e-5
    p_anomalous = eps * 0.2 + (1 - eps) * 0.8 + eps  # one-hot clamped to [1e-5, 1 − 1e-5], + 1e-5
    p_normal = (1 - eps) * 0.7 + eps * 0.3 + eps
    focal = (-((1 - p_anomalous) ** 2) * math.log(p_anomalous) - (1 - p_normal) ** 2 * math.log(p_normal)) / 2
    dice = (1 - (2 * 0.8 + 1) / (1.1 + 1 + 1)) + (1 - (2 * 0.7 + 1) / (0.9 + 1 + 1))
    terms = kag_loss(outputs, target, labels, "code")
    assert terms["image"].item() == pytest.approx(image, rel=1e-6)
    assert terms["focal"].item() == pytest.approx(2 * focal, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(2 * dice, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(image + 2 * focal + 0.3 * 2 * dice, rel=1e-6)


def test_r1_code_focal_loss_on_saturated_maps_clamps_both_one_hot_columns() -> None:
    """The authors' float32 arithmetic: one_hot = clamp([1 − G, G], 1e-5, 1 − 1e-5), p_t = Σ one_hot·p + 1e-5."""
    abnormal = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.999]])  # saturated softmax outputs
    normal = 1 - abnormal
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    smooth = 1e-5
    one_hot = torch.stack([1 - target, target], dim=1).clamp(smooth, 1.0 - smooth)  # [B,2,N], float32
    p_true = (one_hot * torch.stack([normal, abnormal], dim=1)).sum(1) + smooth
    expected = (-torch.pow(1 - p_true, 2.0) * p_true.log()).mean()
    outputs = {"layer_maps": abnormal[:, None, None], "normal_maps": normal[:, None, None],
               "image_logits": torch.zeros(1, 2)}  # fmt: skip
    focal = kag_loss(outputs, target[:, None], torch.tensor([1]), "code")["focal"]
    assert abs(focal.item() - expected.item()) <= 1e-6


def test_no_graph_ablation_passes_the_multi_kernel_nodes_straight_through() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", use_graph=False, score_size=9, top_k=4)
    randomise(model)
    assert model.graph is None
    features, support, text = fake_features(), fake_features(batch=2), torch.randn(2, 2, 8)
    model.fit(support)
    assert_matches(model(features, text), paper_scores_reference(model, features, text, support, 0.1, 0.1, 4))


def test_no_gate_ablation_weighs_every_message_one() -> None:
    torch.manual_seed(0)
    gated = KernelAwareGraph(4, 4, 2, "paper")
    randomise(gated)
    ungated = KernelAwareGraph(4, 4, 2, "paper", use_gate=False)
    ungated.load_state_dict(gated.state_dict())
    nodes = torch.randn(1, 4, 4, 3, 3)
    expected = paper_graph_reference(ungated, nodes[0], gate=False)
    torch.testing.assert_close(ungated(nodes)[0], expected, atol=1e-5, rtol=1e-5)
    assert (gated(nodes)[0] - expected).abs().max() > 1e-3  # the gates do something in the full model


def test_no_gru_ablation_makes_the_aggregate_the_next_state() -> None:
    torch.manual_seed(0)
    graph = KernelAwareGraph(4, 4, 2, "paper", use_gru=False)
    randomise(graph)
    assert graph.gru is None
    nodes = torch.randn(1, 4, 4, 3, 3)
    torch.testing.assert_close(graph(nodes)[0], paper_graph_reference(graph, nodes[0], gru=False), atol=1e-5, rtol=1e-5)


def test_single_kernel_and_no_memory_ablations() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", kernels=((3, 3),), use_memory=False, score_size=9, top_k=4)
    randomise(model)
    assert len(model.multi_kernel.convs) == 1 and model.multi_kernel.convs[0].kernel_size == (3, 3)
    model.fit(fake_features())
    assert not model.memory.is_fitted
    features, text = fake_features(), torch.randn(2, 2, 8)
    outputs = model(features, text)  # scores without a memory bank: M = M_p
    assert "visual_map" not in outputs
    assert_matches(outputs, paper_scores_reference(model, features, text, None, 0.1, 0.1, 4))


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null", "ignore:.*self.log")
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_nsa_item_with_an_empty_mask_is_trained_as_normal(variant: str) -> None:
    """c = max G (the authors' label): an NSA item labelled anomalous whose mask came out empty counts as normal."""
    torch.manual_seed(0)
    module = KAGPrompt(
        BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[1, 2, 3, 4], vv_attention=False), image_size=96,
        eval_size=32, variant=variant, rounds=1, score_size=16,
    )  # fmt: skip
    randomise(module.model)
    mask = torch.zeros(2, 32, 32, dtype=torch.uint8)
    mask[1, 8:24, 8:24] = 1  # sample 0: anomalous by its label, but its mask is empty
    batch = Batch(
        image=torch.randn(2, 3, 96, 96), gt_mask=mask, gt_label=torch.tensor([1, 1]), image_path=["a.png", "b.png"],
        mask_path=[None, None], category=["bottle", "bottle"], index=torch.tensor([0, 1]),
    )  # fmt: skip
    loss = module.training_step(batch, 0)
    outputs = module.model(module.backbone(batch.image), module.batch_text(batch.category))
    target = F.interpolate(mask.float()[:, None], size=16, mode="bilinear")[:, 0] > 0.3
    expected = kag_loss(outputs, target, torch.tensor([0, 1]), variant)["loss"]
    as_labelled = kag_loss(outputs, target, torch.tensor([1, 1]), variant)["loss"]
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - as_labelled.item()) > 1e-4


ABLATIONS = {  # config → the settings it changes relative to configs/kagprompt/train_mvtec.yaml (Table 2 row 4)
    "table2_max": [("model", "use_graph", False), ("model", "score_gamma", 0.0), ("model", "top_k", 1)],  # row 1
    "table2_kahg_max": [("model", "score_gamma", 0.0), ("model", "top_k", 1)],  # row 2
    "table2_global_s1": [("model", "top_k", 1)],  # row 3
    "no_graph": [("model", "use_graph", False)],  # fsad's own from here on
    "no_gate": [("model", "use_gate", False)],
    "no_gru": [("model", "use_gru", False)],
    "single_kernel": [("model", "kernels", [[3, 3]])],
    "no_memory": [("model", "use_memory", False)],
    "no_nsa": [("data", "synthesis", False)],
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_config_changes_exactly_its_switches(name: str) -> None:
    base = yaml.safe_load((REPO / "configs/kagprompt/train_mvtec.yaml").read_text())
    path = REPO / f"configs/kagprompt/ablations/{name}.yaml"
    ablation = yaml.safe_load(path.read_text())
    for section, key, value in ABLATIONS[name]:
        assert ablation[section]["init_args"][key] == value
        assert base[section]["init_args"].get(key) != value
        ablation[section]["init_args"][key] = base[section]["init_args"].get(key)
        if key not in base[section]["init_args"]:
            del ablation[section]["init_args"][key]
    assert ablation == base
    paper_row = name.startswith("table2_")
    assert ("Table 2 row" in path.read_text().splitlines()[0]) == paper_row  # the header says whose ablation it is
    assert ("fsad's own ablation, not in the paper" in path.read_text().splitlines()[0]) != paper_row


def test_every_shipped_ablation_is_listed() -> None:
    assert {p.stem for p in (REPO / "configs/kagprompt/ablations").glob("*.yaml")} == set(ABLATIONS)
