"""Frozen OpenCLIP backbone: one forward pass gives CLS, V-V patch tokens and raw tapped tokens.

Weights load in this order (docs/architecture.md, "Backbone loading"): ``checkpoint`` (a local file), the ``pretrained`` open_clip
tag, then random initialisation when ``pretrained`` is ``None``. Offline with no weights, one
:class:`BackboneWeightsError` says which file to get and which key to set.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from fsad.checkpoints import read_checkpoint
from fsad.errors import FsadError
from fsad.network import hub_reachable

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackboneWeightsError(FsadError, RuntimeError):
    """No usable weights for the requested backbone."""


class BackboneConfigError(FsadError, ValueError):
    """A ``backbone`` field that names no architecture, tag, tap or precision open_clip knows."""


def register_model_configs() -> None:
    """Make the architectures shipped in ``model_configs/`` (e.g. ``fsad-tiny``) known to open_clip."""
    shipped = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if not shipped.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class BackboneSpec:
    """How to build the backbone.

    Args:
        arch: open_clip architecture name, e.g. ``ViT-B-16-plus-240`` or the test architecture ``fsad-tiny``.
        pretrained: open_clip pretrained tag (``laion400m_e32``); ``None`` means random weights (tests, demo).
        checkpoint: local open_clip checkpoint file; takes precedence over ``pretrained``.
        taps: 1-based transformer blocks whose raw patch tokens are returned (PromptAD uses blocks 3 and 8); tap 0 is
            the transformer's input (patch tokens after ``ln_pre``), which WinCLIP re-runs through the transformer
            window by window.
        vv_attention: also compute the V-V attention path (PromptAD/FineGrainedAD patch tokens).
        precision: ``fp32``, ``fp16`` or ``bf16`` for the frozen weights, as open_clip's ``precision`` (and the
            authors' code) apply it: linear, convolution and attention weights in low precision, LayerNorms computed
            in fp32 (``LayerNormFp32``), embeddings kept in fp32 and cast at use.
        cache_dir: where open_clip looks for (and would download) tagged weights.
        authors_tap_hook: return what the PromptAD/FineGrainedAD forward hooks really hold for a tap: their hook
            keeps a view of block L's output, into which block L+1 then adds its attention output in place, so
            "layer L" is ``x_L + attn_{L+1}(ln_1(x_L))`` (``variant: code`` sets it; methods.md §1).
    """

    arch: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e32"
    checkpoint: str | None = None
    taps: list[int] = field(default_factory=lambda: [3, 8])
    vv_attention: bool = True
    precision: str = "fp32"
    cache_dir: str | None = None
    authors_tap_hook: bool = False

    def __post_init__(self) -> None:
        # jsonargparse turns a command-line `null` inside subclass init_args into the string "None".
        for name in ("pretrained", "checkpoint", "cache_dir"):
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in ("none", "null", ""):
                setattr(self, name, None)
        if self.precision not in _PRECISIONS:
            raise BackboneConfigError(f"backbone.precision: {self.precision!r} is not one of {sorted(_PRECISIONS)}")

    @classmethod
    def coerce(cls, spec: BackboneSpec | dict | None) -> BackboneSpec:
        """A spec from a spec, a dict of its fields (``backbone={"arch": ...}``) or ``None`` (the defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(
                    f"backbone: unknown field(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}"
                )
            return cls(**spec)
        raise TypeError(f"backbone: expected a BackboneSpec or a dict, got {type(spec).__name__}")


@dataclass
class BackboneOutput:
    """Everything one image pass produces. Patch tokens exclude CLS and are in row-major grid order.

    cls: [B,D] projected CLS embedding (``ln_post`` then ``proj``), unnormalised.
    vv_tokens: [B,N,D] projected V-V attention patch tokens, unnormalised (``None`` if disabled).
    taps: block number -> [B,N,W] raw original-path patch tokens after that block (no LN, no projection).
    grid: (rows, cols) of the patch grid, N = rows * cols.
    """

    cls: torch.Tensor
    vv_tokens: torch.Tensor | None
    taps: dict[int, torch.Tensor]
    grid: tuple[int, int]

    @staticmethod
    def cat(outputs: list[BackboneOutput]) -> BackboneOutput:
        """Concatenate outputs of several batches along the batch axis."""
        if not outputs:
            raise ValueError("no backbone outputs to concatenate")
        first = outputs[0]
        return BackboneOutput(
            cls=torch.cat([o.cls for o in outputs]),
            vv_tokens=None if first.vv_tokens is None else torch.cat([o.vv_tokens for o in outputs]),
            taps={k: torch.cat([o.taps[k] for o in outputs]) for k in first.taps},
            grid=first.grid,
        )


def _weights_help(arch: str, tag: str | None) -> str:
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    hub = cfg.get("hf_hub")
    source = f"https://huggingface.co/{hub.rstrip('/')}" if hub else cfg.get("url") or "the open_clip model zoo"
    return (
        f"Download the open_clip weights for {arch!r}" + (f" (tag {tag!r})" if tag else "") + f" from {source} "
        "(file open_clip_pytorch_model.bin or open_clip_model.safetensors) on a machine with internet, "
        "then set `model.init_args.backbone.checkpoint: /path/to/that/file`. "
        "Alternatively fill the Hugging Face cache (HF_HOME) and keep `backbone.pretrained`, "
        "or set `backbone.pretrained: null` for random weights (tests and the demo only)."
    )


HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def tagged_weights_available(spec: BackboneSpec) -> bool:
    """False only when the tag's Hugging Face files are not cached and the hub cannot be reached (fails in ~3 s
    instead of after the hub client's retries); True for tags served from plain URLs, which open_clip handles."""
    hub = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained).get("hf_hub")
    if not hub:
        return True
    repo = hub.rstrip("/")
    cached = any(
        isinstance(huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=spec.cache_dir), str)
        for name in HUB_FILES
    )
    return cached or hub_reachable()


def _create_clip(spec: BackboneSpec, image_size: int | None) -> nn.Module:
    register_model_configs()
    if spec.arch not in open_clip.list_models():
        raise BackboneConfigError(f"backbone.arch: unknown open_clip architecture {spec.arch!r}")
    force_size = image_size if image_size else None
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(
                f"backbone.checkpoint: file not found: {path}. " + _weights_help(spec.arch, spec.pretrained)
            )
        model = open_clip.create_model(
            spec.arch, pretrained=None, force_image_size=force_size, precision=spec.precision
        )
        read_checkpoint(path, field="backbone.checkpoint", mmap=True)  # a bad file is one line, never torch's advice
        try:
            open_clip.load_checkpoint(model, str(path), weights_only=True)
        except (RuntimeError, KeyError, ValueError) as err:  # readable, but another architecture's weights
            reason = str(err).strip().splitlines()[0]
            raise BackboneWeightsError(
                f"backbone.checkpoint: {path} does not hold weights of {spec.arch!r} ({reason})"
            ) from None
        return model
    if spec.pretrained is not None:
        known = open_clip.list_pretrained_tags_by_model(spec.arch)
        if spec.pretrained not in known:
            raise BackboneConfigError(
                f"backbone.pretrained: {spec.pretrained!r} is not an open_clip tag for {spec.arch!r}; "
                + (
                    f"known tags: {known}"
                    if known
                    else "it has no published weights: set backbone.pretrained: null (random weights, tests only) "
                    "or backbone.checkpoint: <file>"
                )
            )
        if not tagged_weights_available(spec):
            raise BackboneWeightsError(
                f"No weights available for backbone {spec.arch!r} / {spec.pretrained!r}: not in the Hugging Face "
                "cache and huggingface.co is unreachable. " + _weights_help(spec.arch, spec.pretrained)
            )
        try:
            return open_clip.create_model(
                spec.arch, pretrained=spec.pretrained, force_image_size=force_size, cache_dir=spec.cache_dir,
                precision=spec.precision,
            )  # fmt: skip
        except Exception as err:  # hub offline, cache empty, partial download: all end in the same advice
            raise BackboneWeightsError(
                f"No weights available for backbone {spec.arch!r} / {spec.pretrained!r} ({type(err).__name__}: "
                f"{err}). " + _weights_help(spec.arch, spec.pretrained)
            ) from None
    warnings.warn(
        f"backbone.pretrained is null: {spec.arch} has RANDOM weights. Use this for tests and the demo only; "
        "anomaly scores are meaningless for real inspection.",
        UserWarning,
        stacklevel=3,
    )
    return open_clip.create_model(spec.arch, pretrained=None, force_image_size=force_size, precision=spec.precision)


class ClipBackbone(nn.Module):
    """A frozen OpenCLIP model exposing image features in one pass and prompt-embedding text encoding."""

    def __init__(self, spec: BackboneSpec | dict, image_size: int | None = None) -> None:
        super().__init__()
        spec = BackboneSpec.coerce(spec)
        self.spec = spec
        model = _create_clip(spec, image_size)
        model.requires_grad_(False)
        self.clip = model.eval()
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        bad = [t for t in spec.taps if not 0 <= t <= len(blocks)]
        if bad:
            raise BackboneConfigError(f"backbone.taps: {bad} outside 0..{len(blocks)} for {spec.arch}")
        if spec.authors_tap_hook and (len(blocks) in spec.taps or 0 in spec.taps):
            raise BackboneConfigError(
                f"backbone.taps: the authors' tap hook needs a block after each tap, and has no tap 0; {len(blocks)} "
                "is last"
            )
        if not all(isinstance(b.attn, nn.MultiheadAttention) for b in blocks):
            raise BackboneConfigError(
                f"backbone.arch: {spec.arch} has no standard attention blocks; V-V path unsupported"
            )
        self.dtype = _PRECISIONS[spec.precision]
        self.grid: tuple[int, int] = tuple(visual.grid_size)
        self.image_size: tuple[int, int] = tuple(visual.image_size)
        self.embed_dim: int = int(visual.output_dim)
        self.width: int = int(visual.transformer.width)
        self.text_width: int = int(self.clip.token_embedding.embedding_dim)
        self.image_mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.image_std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.tokenizer = open_clip.get_tokenizer(spec.arch)

    def train(self, mode: bool = True) -> ClipBackbone:
        """The backbone stays in eval mode whatever the surrounding module does (frozen, no dropout)."""
        return super().train(False)

    @staticmethod
    def vv_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """PromptAD's V-V self-attention: ``out_proj(softmax(v·vᵀ·scale)·v)`` per head, v from the block's qkv."""
        attn: nn.MultiheadAttention = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        w_v = attn.in_proj_weight[2 * width :]
        b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        batch, length, _ = x.shape
        v = F.linear(x, w_v, b_v).reshape(batch, length, heads, width // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(v, v, v)  # softmax(v·vᵀ/√d_head)·v, fused
        return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """One pass over the image tower. Returns float32 features whatever the weight precision."""
        visual = self.clip.visual
        x = visual._embeds(images.to(self.dtype))
        vv = x if self.spec.vv_attention else None
        taps: dict[int, torch.Tensor] = {0: x[:, 1:].float()} if 0 in self.spec.taps else {}
        for number, block in enumerate(visual.transformer.resblocks, start=1):
            normalised = block.ln_1(x)
            if vv is not None:
                # Dual path (CLIP Surgery / PromptAD): the V-V stream adds V-V attention of the original
                # stream's normalised input and skips the FFN.
                vv = vv + block.ls_1(self.vv_attention(block, normalised))
            # the block's own two residual steps, so the attention half is at hand for the authors' tap hook
            attended = x + block.ls_1(block.attention(normalised))
            if self.spec.authors_tap_hook and number - 1 in self.spec.taps:
                taps[number - 1] = attended[:, 1:].float()
            x = attended + block.ls_2(block.mlp(block.ln_2(attended)))
            if number in self.spec.taps and not self.spec.authors_tap_hook:
                taps[number] = x[:, 1:].float()
        pooled, _ = visual._pool(x)
        cls = pooled @ visual.proj
        vv_tokens = None if vv is None else (visual.ln_post(vv[:, 1:]) @ visual.proj).float()
        return BackboneOutput(cls=cls.float(), vv_tokens=vv_tokens, taps=taps, grid=self.grid)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned log-temperature (``exp()`` of it is ≈100 for trained models)."""
        return self.clip.logit_scale.float()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenise to the full context length (77 for CLIP)."""
        return self.tokenizer(texts)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings of token ids, for prompt learners that splice learnable context vectors in."""
        return self.clip.token_embedding(tokens)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode token ids with the standard text tower (all 77 positions)."""
        return self.clip.encode_text(tokens.to(self.clip.token_embedding.weight.device)).float()

    def encode_text_embeddings(
        self, embeddings: torch.Tensor, eot_index: torch.Tensor, truncate: bool = True
    ) -> torch.Tensor:
        """Encode prompt token embeddings [P,L,W] whose end-of-text tokens sit at ``eot_index`` [P].

        With ``truncate`` only the first ``max(eot_index)+1`` positions go through the transformer. Under CLIP's
        causal mask no position attends to a later one, and pooling reads the end-of-text position, so the result
        is exactly that of the full context (README.md, budget P2).
        """
        length = int(eot_index.max()) + 1 if truncate else embeddings.shape[1]
        clip = self.clip
        x = embeddings[:, :length].to(self.dtype) + clip.positional_embedding[:length].to(self.dtype)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=mask)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        projection = clip.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return pooled.float()
