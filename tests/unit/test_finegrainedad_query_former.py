"""The paper's Query Former must route: trained in the regime FineGrainedAD runs in (D = 640, CLIP-like correlated
prompt features, the shipped SGD settings), its intrinsic representations stay distinct and Eq. 4 sends tokens drawn
near a level to that level. The Query Former it replaced (two √D-scaled dot-product attention heads, trained to
maximise each query's cosines to its level's prototypes) is written here as the control, and must fail both."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fsad.lightning_modules.finegrainedad.model import CrossAttentionQueryFormer, query_former_loss
from fsad.lightning_modules.finegrainedad.module import FineGrainedAD

REPO = Path(__file__).resolve().parents[2]
DIM, LEVELS = 640, 5  # ViT-B-16-plus-240's embedding width; two components, foreground, image, background
SHARED, LEVEL, PROMPT, ABNORMAL = 3.0, 1.2, 0.6, 0.7  # weights of the parts of a prompt feature (unit directions)


def correlated_prompt_features(seed: int) -> dict[str, torch.Tensor]:
    """Prompt features as CLIP text features are: one direction shared by every prompt, one per level, one per
    prompt; abnormal prompts also share a per-level abnormal direction. 3 normal and 12 abnormal prompts a level."""
    generator = torch.Generator().manual_seed(seed)

    def direction(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, DIM, generator=generator) / math.sqrt(DIM)

    shared, level, abnormal = direction(), direction(LEVELS), direction(LEVELS)
    normal_features = F.normalize(SHARED * shared + LEVEL * level[:, None] + PROMPT * direction(LEVELS, 3), dim=-1)
    abnormal_features = F.normalize(
        SHARED * shared + LEVEL * level[:, None] + ABNORMAL * abnormal[:, None] + PROMPT * direction(LEVELS, 12), dim=-1
    )
    tokens_level = torch.arange(LEVELS).repeat_interleave(200)  # planted tokens: 200 drawn near each level
    tokens = F.normalize(SHARED * shared + LEVEL * level[tokens_level] + 1.0 * direction(len(tokens_level)), dim=-1)
    return {
        "normal_features": normal_features.flatten(0, 1),
        "abnormal_features": abnormal_features.flatten(0, 1),
        "normal": F.normalize(normal_features.mean(1), dim=-1),
        "abnormal": F.normalize(abnormal_features.mean(1), dim=-1),
        "tokens": tokens,
        "tokens_level": tokens_level,
    }


class PreviousQueryFormer(nn.Module):
    """The Query Former as first shipped: ``nn.MultiheadAttention`` heads (scores (qW_q)(kW_k)ᵀ/√D) over every
    level's normal and abnormal prompt features, a randomly initialised fusing projection."""

    def __init__(self, dim: int, levels: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(levels, dim) * dim**-0.5)
        self.normal_attention = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.abnormal_attention = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.project = nn.Linear(2 * dim, dim)

    def forward(self, normal, abnormal, normal_features, abnormal_features) -> torch.Tensor:
        queries, normal_kv, abnormal_kv = self.queries[None], normal_features[None], abnormal_features[None]
        from_normal = self.normal_attention(queries, normal_kv, normal_kv, need_weights=False)[0][0]
        from_abnormal = self.abnormal_attention(queries, abnormal_kv, abnormal_kv, need_weights=False)[0][0]
        return F.normalize(self.project(torch.cat([from_normal, from_abnormal], dim=-1)), dim=-1)


def previous_objective(queries: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """The objective as first implemented: 2 − cos(q_l, p̄ⁿ_l) − cos(q_l, p̄ᵃ_l), mean over levels."""
    return (2 - (queries * normal).sum(-1) - (queries * abnormal).sum(-1)).mean()


def shipped_sgd_settings() -> dict[str, float]:
    """lr and epochs of the shipped MVTec config, momentum, weight decay and eta_min of FineGrainedAD's defaults.
    4 shots in batches of 8 make one optimiser step per epoch."""
    config = yaml.safe_load((REPO / "configs/finegrainedad/mvtec.yaml").read_text())
    defaults = inspect.signature(FineGrainedAD.__init__).parameters
    return {
        "lr": float(config["model"]["init_args"]["lr"]),
        "steps": int(config["trainer"]["max_epochs"]),
        **{name: defaults[name].default for name in ("momentum", "weight_decay", "eta_min")},
    }


def train_and_measure(objective, seed: int, previous: bool = False) -> tuple[float, float]:
    """Train a fresh Query Former (``previous``: the first shipped one) with ``objective`` under the shipped SGD
    settings (cosine schedule, as the module); return (max pairwise cos of the intrinsic representations, Eq. 4's
    routing accuracy on the planted tokens)."""
    torch.manual_seed(seed)
    data = correlated_prompt_features(seed)
    if previous:
        former = PreviousQueryFormer(DIM, LEVELS)
    else:
        former = CrossAttentionQueryFormer(DIM)
        former.resize(LEVELS)
    settings = shipped_sgd_settings()
    optimiser = torch.optim.SGD(
        former.parameters(), lr=settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings["steps"], eta_min=settings["eta_min"])

    def queries() -> torch.Tensor:
        return former(
            data["normal"], data["abnormal"],
            normal_features=data["normal_features"], abnormal_features=data["abnormal_features"],
        )  # fmt: skip

    for _ in range(settings["steps"]):
        loss = objective(queries(), data["normal"], data["abnormal"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        unit = F.normalize(queries(), dim=-1)
    cosines = unit @ unit.T
    off_diagonal = cosines[~torch.eye(LEVELS, dtype=torch.bool)]
    chosen = (data["tokens"] @ unit.T).argmax(dim=-1)  # Eq. 4: l* = argmax_l cos(v_j, q_l)
    return float(off_diagonal.max()), float((chosen == data["tokens_level"]).float().mean())


def test_the_regime_is_correlated_and_solvable() -> None:
    """Level prototypes are as close as CLIP text features (pairwise cos ≥ 0.8), and the planted tokens can be
    routed: the nearest normal prototype is their level for ≥ 99 % of them."""
    data = correlated_prompt_features(0)
    cosines = data["normal"] @ data["normal"].T
    assert float(cosines[~torch.eye(LEVELS, dtype=torch.bool)].min()) >= 0.8
    nearest = (data["tokens"] @ data["normal"].T).argmax(dim=-1)
    assert float((nearest == data["tokens_level"]).float().mean()) >= 0.99


@pytest.mark.parametrize("seed", [0, 1])
def test_query_former_routes_tokens_to_their_level_and_the_previous_one_does_not(seed: int) -> None:
    """Distinct queries (max pairwise cos ≤ 0.9) and Eq. 4 picks the planted level for ≥ 90 % of tokens (chance
    20 %) after the shipped 100 SGD steps at lr 2e-3; the previous Query Former and objective fail both on the same
    data (measured: queries identical to 1e-6, routing 6–24 %; the new one 0.26–0.40 and 100 %)."""
    separation, routing = train_and_measure(query_former_loss, seed)
    assert separation <= 0.9, separation
    assert routing >= 0.9, routing
    control_separation, control_routing = train_and_measure(previous_objective, seed, previous=True)
    assert control_separation > 0.9, control_separation
    assert control_routing < 0.9, control_routing
