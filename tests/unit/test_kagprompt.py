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

from fsad.lightning_modules.components.clip import BackboneOutput
from fsad.lightning_modules.kagprompt.model import (
    ConvGRUCell,
    KAGPromptModel,
    KernelAwareGraph,
    MultiKernelConv,
    image_score,
    kag_loss,
)

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


def paper_graph_reference(graph: KernelAwareGraph, nodes: torch.Tensor) -> torch.Tensor:
    """Eq. 2–11 for one sample, node by node and edge by edge, written from the paper (T rounds)."""
    layers, c, h, w = nodes.shape
    flat = [nodes[i].reshape(c, h * w).T for i in range(layers)]  # N_i as [HW, C]
    wc = graph.inter.weight.T  # W_c of Eq. 4 (nn.Linear computes x Wᵀ)

    def conv(conv: torch.nn.Conv2d, n: torch.Tensor) -> torch.Tensor:
        return n @ conv.weight[:, :, 0, 0].T + conv.bias

    def gate(message: torch.Tensor) -> torch.Tensor:  # Eq. 8: σ(GAP(W_GAP * h + b))
        return torch.sigmoid(conv(graph.gate, message).mean(0))

    def gru(message: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # Eq. 10, on [HW, C]
        z = torch.sigmoid(
            torch.cat([message, state], 1) @ graph.gru.update.weight[:, :, 0, 0].T + graph.gru.update.bias
        )
        r = torch.sigmoid(torch.cat([message, state], 1) @ graph.gru.reset.weight[:, :, 0, 0].T + graph.gru.reset.bias)
        cand = torch.tanh(
            torch.cat([message, r * state], 1) @ graph.gru.candidate.weight[:, :, 0, 0].T + graph.gru.candidate.bias
        )
        return (1 - z) * state + z * cand

    state = flat
    for _ in range(graph.rounds):
        new_state = []
        for i in range(layers):
            q, k = conv(graph.intra_query, state[i]), conv(graph.intra_key, state[i])
            e_ii = graph.alpha * torch.softmax(q @ k.T, dim=1) @ conv(graph.intra_value, state[i]) + state[i]  # Eq. 3
            total = gate(e_ii) * e_ii  # h_ii = e_ii (Eq. 6), gated as every message (Eq. 9)
            for j in range(layers):
                if j != i:
                    edge = state[i] @ wc @ state[j].T  # Eq. 4, no 1/√d (Eq. 5)
                    message = torch.softmax(edge, dim=1) @ state[j]  # Eq. 7, row softmax
                    total = total + gate(message) * message  # Eq. 8–9
            new_state.append(gru(total, state[i]))
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


def test_eq12_to_eq16_maps_fusion_and_score_equal_the_formulas() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", rounds=1, gamma=0.2, score_gamma=0.3, top_k=5, score_size=6)
    randomise(model)
    features, text = fake_features(), torch.randn(2, 2, 8)
    support = fake_features(batch=3)
    model.fit(support)
    outputs = model(features, text)
    graph_out, _ = model.adapt(features)
    support_out, _ = model.adapt(support)
    cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # noqa: E731
    for b in range(2):
        per_layer, distances = [], []
        for i in range(4):
            tokens = graph_out[b, i].flatten(1).T  # O_i [N, D]
            logits = 100.0 * cos(tokens, text[b])  # [N, 2]
            per_layer.append(torch.softmax(logits, dim=1)[:, 1].reshape(6, 6))  # Eq. 12 per layer
            bank = support_out[:, i].flatten(2).transpose(1, 2).reshape(-1, 8)
            distances.append(1 - cos(tokens, bank).max(dim=1).values.reshape(6, 6))  # Eq. 13 per layer
        m_p = torch.stack(per_layer).mean(0)  # Norm Σ: the mean of the 4 layers (Up is the identity at 6×6)
        m_v = torch.stack(distances).mean(0)
        fused = 0.2 * m_p + 0.8 * m_v  # Eq. 14
        s1 = cos(model.image_head(features.cls[b : b + 1]), text[b])[0, 1]  # Eq. 15
        score = 0.3 * s1 + 0.7 * fused.flatten().topk(5).values.mean()  # Eq. 16
        torch.testing.assert_close(outputs["textual_map"][b], m_p, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["visual_map"][b], m_v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["anomaly_map"][b], fused, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["score"][b], score, atol=1e-5, rtol=1e-5)
    summed = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", rounds=1, score_size=6, visual_reduction="sum")
    summed.load_state_dict(model.state_dict())
    summed.fit(support)
    torch.testing.assert_close(summed(features, text)["visual_map"], 4 * outputs["visual_map"])  # Σ as printed


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
    assert terms["loss"].item() == pytest.approx(image + 2 * focal + 2 * dice, rel=1e-6)  # summed over the 2 maps


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
    assert terms["loss"].item() == pytest.approx(image + 2 * focal + 0.3 * 2 * dice, rel=1e-6)


def test_no_graph_ablation_passes_the_multi_kernel_nodes_straight_through() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", use_graph=False)
    assert model.graph is None
    graph_out, kernels = model.adapt(fake_features())
    torch.testing.assert_close(graph_out, kernels)


def test_no_gate_ablation_leaves_messages_unscaled_and_changes_nothing_else() -> None:
    torch.manual_seed(0)
    gated = KernelAwareGraph(4, 4, 1, "paper")
    ungated = KernelAwareGraph(4, 4, 1, "paper", use_gate=False)
    ungated.load_state_dict(gated.state_dict())
    message = torch.randn(2, 4, 3, 9, 4)
    torch.testing.assert_close(ungated.gated(message), message)
    assert not torch.allclose(gated.gated(message), message)
    state = torch.randn(2, 4, 9, 4)
    torch.testing.assert_close(ungated.inter_messages(state), gated.inter_messages(state))
    torch.testing.assert_close(ungated.intra_message(state), gated.intra_message(state))


def test_no_gru_ablation_makes_the_aggregate_the_next_state() -> None:
    torch.manual_seed(0)
    graph = KernelAwareGraph(4, 4, 1, "paper", use_gru=False)
    randomise(graph)
    assert graph.gru is None
    nodes = torch.randn(1, 4, 4, 3, 3)
    state = nodes.flatten(3).transpose(-1, -2)
    aggregate = graph.gated(graph.inter_messages(state)).sum(2) + graph.gated(graph.intra_message(state))
    expected = nodes + aggregate.transpose(-1, -2).reshape(nodes.shape)  # O = N¹ + V with N¹ = h¹
    torch.testing.assert_close(graph(nodes), expected)


def test_single_kernel_and_no_memory_ablations() -> None:
    torch.manual_seed(0)
    model = KAGPromptModel(16, 8, [1, 2, 3, 4], "paper", kernels=((3, 3),), use_memory=False, score_size=6)
    assert len(model.multi_kernel.convs) == 1 and model.multi_kernel.convs[0].kernel_size == (3, 3)
    model.fit(fake_features())
    assert not model.memory.is_fitted
    outputs = model(fake_features(), torch.randn(2, 2, 8))  # scores without a memory bank: M = M_p
    torch.testing.assert_close(outputs["anomaly_map"], outputs["layer_maps"].mean(1))
    assert "visual_map" not in outputs


ABLATIONS = {  # config → the one setting it changes relative to configs/kagprompt/train_mvtec.yaml
    "no_graph": ("model", "use_graph", False),
    "no_gate": ("model", "use_gate", False),
    "no_gru": ("model", "use_gru", False),
    "single_kernel": ("model", "kernels", [[3, 3]]),
    "no_memory": ("model", "use_memory", False),
    "no_nsa": ("data", "synthesis", False),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_config_changes_exactly_its_switch(name: str) -> None:
    base = yaml.safe_load((REPO / "configs/kagprompt/train_mvtec.yaml").read_text())
    ablation = yaml.safe_load((REPO / f"configs/kagprompt/ablations/{name}.yaml").read_text())
    section, key, value = ABLATIONS[name]
    assert ablation[section]["init_args"][key] == value
    assert base[section]["init_args"].get(key) != value
    ablation[section]["init_args"][key] = base[section]["init_args"].get(key)
    if key not in base[section]["init_args"]:
        del ablation[section]["init_args"][key]
    assert ablation == base
