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
    torch.testing.assert_close(embeddings[0, 1:5], learner.normal_context[0])
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


def test_several_normal_context_sets_follow_the_authors_expand_order(backbone: ClipBackbone) -> None:
    """n_pro = 3, n_pro_ab = 4 (the authors' classification model): NHP/AHP once per normal set; ALP row r pairs
    normal set r mod 3 with abnormal set r mod 4, which is what their ``expand(...).reshape(-1, ...)`` produces."""
    learner = PromptLearner(backbone.text_width, n_ctx=2, n_ctx_ab=1, n_pro_ab=4, n_pro=3)
    learner.build(backbone, {"image": PromptGroupTexts(["bottle."], ["a.", "b."], ["bottle."])})
    embeddings, eot = learner.prompt_embeddings()
    assert embeddings.shape[0] == 3 + 2 * 3 + 12
    for p in range(3):
        torch.testing.assert_close(embeddings[p, 1:3], learner.normal_context[p])
        for body in range(2):
            torch.testing.assert_close(embeddings[3 + body * 3 + p, 1:3], learner.normal_context[p])
    normal_rows = (
        learner.normal_context.unsqueeze(0).expand(4, -1, -1, -1).reshape(-1, 2, learner.normal_context.shape[-1])
    )
    abnormal_rows = (
        learner.abnormal_context.unsqueeze(0).expand(3, -1, -1, -1).reshape(-1, 1, learner.normal_context.shape[-1])
    )
    torch.testing.assert_close(embeddings[9:, 1:3], normal_rows)
    torch.testing.assert_close(embeddings[9:, 3:4], abnormal_rows)
    assert len({(r % 3, r % 4) for r in range(12)}) == 12 and len(eot) == 21


def test_prototype_rules_against_a_hand_computation() -> None:
    from fsad.lightning_modules.components.prompts import GroupFeatures

    normal = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    handcrafted, learnable = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, -2.0]])
    raw = GroupFeatures(normal, handcrafted, learnable, prototype_rule="raw_mean")
    normalised = GroupFeatures(normal, handcrafted, learnable)
    # raw mean of (3,0),(0,1) is (1.5,0.5) → /√2.5; mean of unit vectors (1,0),(0,1) is (.5,.5) → (1,1)/√2
    torch.testing.assert_close(raw.normal_prototype, torch.tensor([1.5, 0.5]) / 2.5**0.5)
    torch.testing.assert_close(normalised.normal_prototype, torch.tensor([1.0, 1.0]) / 2**0.5)
    # abnormal: raw mean (0.5,-0.5) → (1,-1)/√2; unit mean ((1,1)/√2 + (0,-1))/2 normalised
    torch.testing.assert_close(raw.abnormal_prototype, torch.tensor([1.0, -1.0]) / 2**0.5)
    unit_mean = (torch.tensor([1.0, 1.0]) / 2**0.5 + torch.tensor([0.0, -1.0])) / 2
    torch.testing.assert_close(normalised.abnormal_prototype, unit_mean / unit_mean.norm())


def test_overlong_prompt_is_refused(backbone: ClipBackbone) -> None:
    learner = PromptLearner(backbone.text_width)
    with pytest.raises(ValueError, match="prompt too long"):
        learner.build(backbone, {"x": PromptGroupTexts([" ".join(["word"] * 80)], ["a."])})


def test_placeholder_is_the_gated_learnable_vector_at_the_value_position(backbone: ClipBackbone) -> None:
    """Built by hand from the tokenizer and the embedding table: NHP ``a grey <g·v_color> pad.`` and ALP set s
    ``N N A_s a <g·u_s,color> pad.``, with the Attr-MoE weight g = σ(logit) of the side; the rest is the caption."""
    from fsad.lightning_modules.components.prompts import SLOT_KINDS, slot

    learner = PromptLearner(backbone.text_width, n_ctx=2, n_ctx_ab=1, n_pro_ab=2)
    texts = PromptGroupTexts(
        normal=[f"a grey {slot('color')} pad."], abnormal=["a cracked pad."],
        learnable_abnormal=[f"a {slot('color')} pad."], gated=True,
    )  # fmt: skip
    learner.build(backbone, {"component:pad": texts})
    color = SLOT_KINDS.index("color")
    with torch.no_grad():
        learner.slot_gate_logits[0, 0, color], learner.slot_gate_logits[1, 0, color] = 0.3, -1.2
    embeddings, eot = learner.prompt_embeddings()
    assert embeddings.shape[0] == 1 + 1 + 2

    nhp_tokens = backbone.tokenize(["a grey * pad."])[0]  # "*" marks where the placeholder goes
    nhp_words = backbone.token_embedding(nhp_tokens)
    at = int((nhp_tokens == backbone.tokenize(["*"])[0, 1]).nonzero())
    expected = torch.cat([nhp_words[:1], learner.normal_context[0], nhp_words[1:]])[: len(nhp_words)].clone()
    expected[at + 2] = torch.sigmoid(torch.tensor(0.3)) * learner.normal_placeholders[color]
    torch.testing.assert_close(embeddings[0], expected)

    alp_tokens = backbone.tokenize(["a * pad."])[0]
    alp_words = backbone.token_embedding(alp_tokens)
    at = int((alp_tokens == backbone.tokenize(["*"])[0, 1]).nonzero())
    for s in range(2):
        contexts = torch.cat([learner.normal_context[0], learner.abnormal_context[s]])
        expected = torch.cat([alp_words[:1], contexts, alp_words[1:]])[: len(alp_words)].clone()
        expected[at + 3] = torch.sigmoid(torch.tensor(-1.2)) * learner.abnormal_placeholders[s, color]
        torch.testing.assert_close(embeddings[2 + s], expected)
    assert eot[0] == nhp_tokens.argmax() + 2 and eot[2] == alp_tokens.argmax() + 3


def test_placeholder_shapes_come_from_a_checkpoint_before_build(backbone: ClipBackbone) -> None:
    """A state dict sizes the placeholders and Attr-MoE weights, so loading works before (and survives) build."""
    from fsad.lightning_modules.components.prompts import slot

    texts = {"component:pad": PromptGroupTexts([f"a grey {slot('color')} pad."], ["a cracked pad."],
                                               [f"a {slot('color')} pad."], gated=True)}  # fmt: skip
    trained = PromptLearner(backbone.text_width)
    trained.build(backbone, texts)
    fresh = PromptLearner(backbone.text_width)
    fresh.load_state_dict(trained.state_dict())
    fresh.build(backbone, texts)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


def test_truncated_text_tower_runs_to_the_longest_prompt_not_to_77(backbone: ClipBackbone) -> None:
    """P2: the longest sequence the text tower sees while encoding FineGrainedAD's bottle prompts (paper variant:
    placeholders and Attr-MoE weights included) is the longest prompt's token count — SOS, contexts, body tokens (a
    placeholder is one), EOT — counted here from the tokenizer alone, and below CLIP's 77."""
    from fsad.lightning_modules.components.prompts import SLOT_PATTERN
    from fsad.lightning_modules.finegrainedad.mfsc import mllp_texts, packaged_record
    from fsad.lightning_modules.finegrainedad.model import FineGrainedADModel

    model = FineGrainedADModel(backbone.text_width, backbone.embed_dim, variant="paper")
    texts = mllp_texts(packaged_record("mvtec", "bottle"), placeholders=True)
    model.build(backbone, texts)
    lengths: list[int] = []
    hook = backbone.clip.transformer.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        model.encode_levels(backbone)
    finally:
        hook.remove()

    def token_count(body: str, contexts: int) -> int:
        return int((backbone.tokenize([SLOT_PATTERN.sub(" * ", body)])[0] != 0).sum()) + contexts

    encoded = {name: group for name, group in texts.groups().items() if not name.startswith("attribute:")}
    longest = max(
        max([token_count(b, model.prompts.n_ctx) for b in [*group.normal, *group.abnormal]]
            + [token_count(b, model.prompts.n_ctx + model.prompts.n_ctx_ab) for b in group.learnable_abnormal])
        for group in encoded.values()
    )  # fmt: skip
    assert max(lengths) == longest < 77
