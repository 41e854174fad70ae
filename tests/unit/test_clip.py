"""The OpenCLIP wrapper: V-V tokens, taps, CLS, exact truncated text encoding, weight-loading rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsad.lightning_modules.components.clip import BackboneSpec, BackboneWeightsError, ClipBackbone

TINY = BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[1, 3])


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return ClipBackbone(TINY)


def test_cls_equals_open_clip_encode_image(tiny: ClipBackbone) -> None:
    images = torch.randn(2, 3, 96, 96)
    out = tiny(images)
    torch.testing.assert_close(out.cls, tiny.clip.encode_image(images), rtol=1e-5, atol=1e-5)
    assert out.grid == (12, 12) and out.vv_tokens.shape == (2, 144, 48)


def run_blocks(backbone: ClipBackbone, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's input and output through open_clip's own block forward (the reference for our manual loop)."""
    visual = backbone.clip.visual
    x = visual._embeds(images)
    inputs, outputs = [], []
    for block in visual.transformer.resblocks:
        inputs.append(x)
        x = block(x)
        outputs.append(x)
    return inputs, outputs


def test_taps_are_raw_block_outputs(tiny: ClipBackbone) -> None:
    images = torch.randn(2, 3, 96, 96)
    _, outputs = run_blocks(tiny, images)
    out = tiny(images)
    for n in (1, 3):
        torch.testing.assert_close(out.taps[n], outputs[n - 1][:, 1:], rtol=0, atol=0)


def test_authors_tap_hook_adds_the_next_blocks_attention(tiny: ClipBackbone) -> None:
    """methods.md §1: the authors' hooked "layer L" is x_L + attn_{L+1}(ln_1(x_L)), written with MHA directly."""
    spec = BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[1, 3], authors_tap_hook=True)
    hooked = ClipBackbone(spec)
    hooked.load_state_dict(tiny.state_dict())
    images = torch.randn(2, 3, 96, 96)
    _, outputs = run_blocks(tiny, images)
    out = hooked(images)
    blocks = tiny.clip.visual.transformer.resblocks
    for n in (1, 3):
        x = outputs[n - 1]
        nxt = blocks[n]
        y = nxt.ln_1(x)
        expected = x + nxt.attn(y, y, y, need_weights=False)[0]
        torch.testing.assert_close(out.taps[n], expected[:, 1:], rtol=1e-6, atol=1e-6)
        assert (out.taps[n] - x[:, 1:]).abs().max() > 1e-3  # differs from the plain block output
    with pytest.raises(ValueError, match="block after each tap"):
        ClipBackbone(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[4], authors_tap_hook=True))


def test_vv_tokens_equal_direct_computation(tiny: ClipBackbone) -> None:
    """V-V stream = embeddings + Σ_blocks out_proj(softmax(v·vᵀ·scale)·v) of each block's input; then ln_post, proj."""
    images = torch.randn(2, 3, 96, 96)
    visual = tiny.clip.visual
    block_inputs, _ = run_blocks(tiny, images)
    out = tiny(images)
    stream = block_inputs[0].clone()
    for block, x in zip(visual.transformer.resblocks, block_inputs, strict=True):
        attn = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        head_dim = width // heads
        y = block.ln_1(x)
        v = y @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        per_head = []
        for h in range(heads):
            vh = v[..., h * head_dim : (h + 1) * head_dim]
            weights = torch.softmax(vh @ vh.transpose(1, 2) / head_dim**0.5, dim=-1)
            per_head.append(weights @ vh)
        stream = stream + attn.out_proj(torch.cat(per_head, dim=-1))
    expected = visual.ln_post(stream[:, 1:]) @ visual.proj
    torch.testing.assert_close(out.vv_tokens, expected, rtol=1e-5, atol=1e-5)


def test_truncated_text_encoding_is_exact(tiny: ClipBackbone) -> None:
    """Causal mask + end-of-text pooling: cutting the context after the longest prompt changes nothing."""
    tokens = tiny.tokenize(["a photo of a flawless bottle.", "damaged", "a bottle with a small crack on its neck."])
    eot = tokens.argmax(dim=-1)
    embeddings = tiny.token_embedding(tokens)
    embeddings = embeddings + 0.1 * torch.randn_like(embeddings)  # learnable-context prompts are arbitrary vectors
    full = tiny.encode_text_embeddings(embeddings, eot, truncate=False)
    short = tiny.encode_text_embeddings(embeddings, eot, truncate=True)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.encode_text_embeddings(tiny.token_embedding(tokens), eot), tiny.encode_text(tokens))


def test_backbone_is_frozen_and_stays_in_eval(tiny: ClipBackbone) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.clip.training


def test_offline_without_weights_names_the_key_to_set(tmp_path: Path) -> None:
    spec = BackboneSpec(arch="ViT-B-16-plus-240", pretrained="laion400m_e32", cache_dir=str(tmp_path))
    with pytest.raises(BackboneWeightsError, match=r"backbone\.checkpoint") as err:
        ClipBackbone(spec)
    assert "huggingface.co" in str(err.value) and "open_clip_pytorch_model.bin" in str(err.value)


def test_offline_without_cached_weights_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cache and no route to the hub: one clear error at once, without starting the hub client's retries."""
    import fsad.lightning_modules.components.clip as clip_module

    monkeypatch.setattr(clip_module, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(clip_module.open_clip, "create_model", lambda *a, **k: pytest.fail("must not try to download"))
    spec = BackboneSpec(arch="ViT-B-16-plus-240", pretrained="laion400m_e32", cache_dir=str(tmp_path))
    with pytest.raises(BackboneWeightsError, match=r"huggingface\.co is unreachable.*backbone\.checkpoint"):
        ClipBackbone(spec)


def test_missing_checkpoint_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(BackboneWeightsError, match=r"backbone\.checkpoint: file not found"):
        ClipBackbone(BackboneSpec(arch="fsad-tiny", checkpoint=str(tmp_path / "absent.bin")))


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(ValueError, match="known tags"):
        ClipBackbone(BackboneSpec(arch="ViT-B-16-plus-240", pretrained="no_such_tag"))


def test_checkpoint_file_takes_precedence_and_loads_exactly(tiny: ClipBackbone, tmp_path: Path) -> None:
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(tiny.clip.state_dict(), path)
    loaded = ClipBackbone(BackboneSpec(arch="fsad-tiny", pretrained="no_such_tag", checkpoint=str(path), taps=[1, 3]))
    images = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(loaded(images).vv_tokens, tiny(images).vv_tokens)


def test_taps_outside_the_model_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"backbone\.taps"):
        ClipBackbone(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[5]))


def test_null_spellings_from_the_command_line_mean_none() -> None:
    spec = BackboneSpec(arch="fsad-tiny", pretrained="None", checkpoint="null")
    assert spec.pretrained is None and spec.checkpoint is None
    with pytest.raises(ValueError, match=r"backbone\.precision"):
        BackboneSpec(precision="fp8")
