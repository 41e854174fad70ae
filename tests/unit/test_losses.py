"""Every loss against a case computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import torch

from fsad.lightning_modules.components.losses import (
    dice_loss,
    explicit_anomaly_margin_loss,
    focal_loss,
    image_cross_entropy,
    level_regulariser,
    prompt_contrastive_loss,
    prompt_mean_loss,
)


def close(value: torch.Tensor, expected: float) -> bool:
    return abs(float(value) - expected) < 1e-6


def test_prompt_contrastive_loss_by_hand() -> None:
    # v=[1,0], p̄ⁿ=[1,0], 𝒫ᵃ={[0,1]}, t=1: logits [1, 0]; −log(e/(e+1)) = log(1+e⁻¹) = 0.3132616875
    loss = prompt_contrastive_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0]]), 1.0
    )
    assert close(loss, math.log(1 + math.exp(-1)))
    # weight 2 doubles the logits: log(1+e⁻²) = 0.1269280110
    weighted = prompt_contrastive_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0]]), 1.0, torch.tensor([2.0])
    )
    assert close(weighted, math.log(1 + math.exp(-2)))


def test_eam_loss_by_hand() -> None:
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    normal, abnormal = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # token 1: ‖v−pⁿ‖²=0, ‖v−pᵃ‖²=2 → relu(0−2+0.5)=0; token 2: 2, 0 → relu(2.5)=2.5; mean 1.25
    assert close(explicit_anomaly_margin_loss(tokens, normal, abnormal, margin=0.5), 1.25)
    # quirk: [K=1,N=2,D=2], sums over tokens per channel: dⁿ=(1,1), dᵃ=(1,1) → relu(0.5) each, mean 0.5
    assert close(explicit_anomaly_margin_loss(tokens[None], normal, abnormal, 0.5, sum_over_tokens_quirk=True), 0.5)


def test_mean_and_regulariser_by_hand() -> None:
    # norm([2,0])=[1,0], norm([0,3])=[0,1]: ‖[1,−1]‖² = 2
    assert close(prompt_mean_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])), 2.0)
    # image ALPs (1,0),(0,1) → mean (.5,.5); components: rows (1,0)+(1,0)=(2,0)→(1,0) and (0,1)+(1,0)→(1,1)/√2, mean
    # ((1+1/√2)/2, (1/√2)/2); background NHP (0,1), λ = 0.5 → subtract (0,.5)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    components = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    value = level_regulariser(image, components, torch.tensor([[0.0, 1.0]]), weight=0.5)
    r = 1 / math.sqrt(2)
    assert close(value, math.hypot(0.5 - (1 + r) / 2, 0.5 - r / 2 - 0.5))
    # five copies of each component: the renormalised sums point the same way, so L_reg does not grow with N_c
    many = level_regulariser(image, components.repeat(5, 1, 1), torch.tensor([[0.0, 1.0]]), weight=0.5)
    assert close(many, float(value))


def test_focal_dice_and_image_cross_entropy_by_hand() -> None:
    # p=[0.8,0.3], g=[1,0]: p_t=[0.8,0.7]; −0.2²·ln0.8 = 0.0089257420, −0.3²·ln0.7 = 0.0321007445; mean 0.0205132433
    assert close(focal_loss(torch.tensor([0.8, 0.3]), torch.tensor([1, 0])), 0.0205132433)
    # p=[0.5,0.5], g=[1,0]: 1 − (2·0.5+1)/(1+1+1) = 1/3
    assert close(dice_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 0]])), 1 / 3)
    # −ln 0.9 = 0.1053605157
    assert close(image_cross_entropy(torch.tensor([0.9]), torch.tensor([1])), -math.log(0.9))
