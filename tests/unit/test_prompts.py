"""Prompt learner: where the learnable vectors go, end-of-text indices, and exact truncated encoding."""

from __future__ import annotations

import pytest
import torch

from fsad.lightning_modules.components.clip import BackboneSpec, ClipBackbone
from fsad.lightning_modules.components.prompts import PromptGroupTexts, PromptLearner


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        return ClipBackbone(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[1]))


def test_contexts_are_spliced_after_sos_and_alps_get_every_abnormal_set(backbone: ClipBackbone) -> None:
    learner = PromptLearner(backbone.text_width, n_ctx=4, n_ctx_ab=1, n_pro_ab=3)
    texts = PromptGroupTexts(normal=["bottle."], abnormal=["broken bottle."], learnable_abnormal=["bottle."])
    learner.build(backbone, {"image": texts})
    embeddings, eot = learner.prompt_embeddings()
    assert embeddings.shape[0] == 1 + 1 + 3
    words = backbone.token_embedding(backbone.tokenize(["bottle.", "broken bottle."]))
    plain_eot = backbone.tokenize(["bottle.", "broken bottle."]).argmax(-1)
    torch.testing.assert_close(embeddings[0, 0], words[0, 0])  # [SOS]
    torch.testing.assert_close(embeddings[0, 1:5], learner.normal_context)
    torch.testing.assert_close(embeddings[0, 5 : 5 + plain_eot[0]], words[0, 1 : 1 + plain_eot[0]])
    for j in range(3):  # ALP j: N N N N A_j <body>
        torch.testing.assert_close(embeddings[2 + j, 5], learner.abnormal_context[j, 0])
        torch.testing.assert_close(embeddings[2 + j, 6], words[0, 1])
    assert eot.tolist() == [plain_eot[0] + 4, plain_eot[1] + 4] + [plain_eot[0] + 5] * 3


def test_truncated_encoding_equals_full_context_and_carries_gradients(backbone: ClipBackbone) -> None:
    learner = PromptLearner(backbone.text_width)
    learner.build(backbone, {
        "image": PromptGroupTexts(["bottle."], ["bottle with a crack."], ["bottle."]),
        "background": PromptGroupTexts(["black background."], ["black background with a stain."], []),
    })  # fmt: skip
    short = learner.encode(backbone, truncate=True)
    full = learner.encode(backbone, truncate=False)
    for name in ("image", "background"):
        torch.testing.assert_close(short[name].abnormal, full[name].abnormal, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(short[name].normal_prototype, full[name].normal_prototype, rtol=1e-5, atol=1e-5)
    short["image"].abnormal_prototype.sum().backward()
    assert learner.normal_context.grad is not None and learner.abnormal_context.grad.abs().sum() > 0


def test_overlong_prompt_is_refused(backbone: ClipBackbone) -> None:
    learner = PromptLearner(backbone.text_width)
    with pytest.raises(ValueError, match="prompt too long"):
        learner.build(backbone, {"x": PromptGroupTexts([" ".join(["word"] * 80)], ["a."])})
