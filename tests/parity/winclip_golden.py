"""Golden outputs of anomalib's WinCLIP torch model, stage by stage, for fsad's WinCLIP (both variants).

anomalib is an existing, maintained implementation of WinCLIP / WinCLIP+. It must NOT be a dependency of fsad, so
this script runs in its own virtual environment and imports nothing from fsad::

    python3 -m venv /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    /tmp/anomalib-venv/bin/python tests/parity/winclip_golden.py --data /path/to/mvtec_ad

It builds anomalib's ``WinClipModel`` on a random backbone whose weights are filled by parameter name
(:mod:`tests.parity.weights`; fsad fills its own open_clip model the same way), feeds it real MVTec-AD bottle images,
and records what anomalib's own methods return. Two adjustments are made to run it here:

* ``open_clip.create_model_and_transforms`` is wrapped so that anomalib's model is created without a download
  (``pretrained=None``, then :func:`fill_by_name`) and, for ``parity240``, on the ``fsad-parity-240`` architecture;
* ``paper_*`` fixtures: anomalib passes the masked window tokens to open_clip's transformer sequence-first
  (``permute(1, 0, 2)``), but open_clip 3.3.0 builds that transformer batch-first, so every token position attends
  across all windows of the batch. For the ``paper`` fixtures the transformer is wrapped to undo that transposition,
  so each window attends to its own tokens only, as the paper describes. ``code_*`` fixtures are anomalib unchanged.

Cases (files under ``tests/fixtures/parity/winclip/``):

* ``parity240``: ``fsad-parity-240`` (12 blocks, 240 px, 15×15 grid, width 64), 3 test images, 2 support shots;
  every stage (text embeddings, window embeddings of both scales, class scores, zero- and few-shot maps, scores,
  final maps) for both variants;
* ``vitb16plus``: ViT-B-16-plus-240 itself (random weights), 2 test images, 1 support shot, ``code`` variant; text
  embeddings, class scores, grid maps, scores and final maps (window embeddings omitted to keep the file small).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.parity.weights import fill_by_name  # noqa: E402

ARCH_CONFIG = REPO / "tests" / "fixtures" / "parity" / "fsad-parity-240.json"
IMAGE_SIZE = 240
WEIGHT_SEED = 0
WEIGHT_STD = 0.2
"""Ten times :func:`fill_by_name`'s default: at 0.02 a random tower's window embeddings hardly depend on the pixels,
so the WinCLIP+ window distances sit at float-rounding level (±6e-8) and their harmonic mean is noise."""
MAP_STRIDE = 8
"""Final 240×240 maps are stored at every 8th row and column (30×30 samples) to keep the fixtures small."""
CATEGORY = "bottle"
SUPPORT = ["bottle/train/good/000.png", "bottle/train/good/001.png"]
TEST = ["bottle/test/good/000.png", "bottle/test/broken_large/000.png", "bottle/test/contamination/000.png"]
CASES = {
    "parity240": {"arch": "fsad-parity-240", "support": 2, "test": 3, "variants": ("paper", "code"), "windows": True},
    "vitb16plus": {"arch": "ViT-B-16-plus-240", "support": 1, "test": 2, "variants": ("code",), "windows": False},
}


def load_pixels(data: Path, relatives: list[str]) -> np.ndarray:
    """RGB uint8 [N,240,240,3]: PIL bicubic resize of each file (the fixture stores these exact pixels)."""
    pictures = [Image.open(data / r).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC) for r in relatives]
    return np.stack([np.asarray(p, dtype=np.uint8) for p in pictures])


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] → CLIP-normalised float [N,3,H,W] (the same formula the parity test applies)."""
    import open_clip

    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class BatchFirstWindows(torch.nn.Module):
    """Wraps open_clip's batch-first transformer: while anomalib computes window embeddings, its sequence-first
    input is read as it meant it; the full-image pass is left alone."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.inner = transformer
        self.in_window_pass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.in_window_pass:
            return self.inner(x)
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


def fix_window_transposition(model) -> None:
    """The ``paper`` fixtures: each window attends to its own tokens (see the module docstring)."""
    wrapper = BatchFirstWindows(model.clip.visual.transformer)
    model.clip.visual.transformer = wrapper
    window_pass = model._get_window_embeddings

    def windows_batch_first(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        wrapper.in_window_pass = True
        try:
            return window_pass(feature_map, masks)
        finally:
            wrapper.in_window_pass = False

    model._get_window_embeddings = windows_batch_first


def build(arch: str):
    """anomalib's WinClipModel on ``arch`` with weights filled by name, no download."""
    import open_clip
    from anomalib.models.image.winclip import torch_model

    original = open_clip.create_model_and_transforms

    def offline(name, pretrained=None, **kwargs):
        model, preprocess_train, preprocess_val = original(arch, pretrained=None, **kwargs)
        fill_by_name(model, WEIGHT_SEED, std=WEIGHT_STD)
        return model, preprocess_train, preprocess_val

    open_clip.create_model_and_transforms = offline
    try:
        model = torch_model.WinClipModel(scales=(2, 3)).eval()
    finally:
        open_clip.create_model_and_transforms = original
    return model


def record(model, support: torch.Tensor, test: torch.Tensor, windows: bool) -> dict[str, np.ndarray]:
    """Every stage anomalib computes, zero-shot first, then with the support shots."""
    from anomalib.models.image.winclip.utils import class_scores

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        model.setup(CATEGORY)
        out["text_embeddings"] = model.text_embeddings.numpy()
        zero = model(test)
        out["zero_shot_pred_score"] = zero.pred_score.numpy()
        out["zero_shot_anomaly_map"] = zero.anomaly_map[:, ::MAP_STRIDE, ::MAP_STRIDE].numpy()
        image_embeddings, window_embeddings, patch_embeddings = model.encode_image(test)
        scores = class_scores(image_embeddings, model.text_embeddings, model.temperature, target_class=1)
        out["class_score"] = scores.numpy()
        out["zero_shot_map"] = model._compute_zero_shot_scores(scores, window_embeddings).numpy()
        if windows:
            for scale, embedding in zip(model.scales, window_embeddings, strict=True):
                out[f"window_embeddings_{scale}"] = embedding.numpy()
            out["patch_embeddings"] = patch_embeddings.numpy()
        model.setup(reference_images=support)
        out["few_shot_map"] = model._compute_few_shot_scores(patch_embeddings, window_embeddings).numpy()
        if windows:
            for scale, embedding in zip(model.scales, model.visual_embeddings, strict=True):
                out[f"support_window_embeddings_{scale}"] = embedding.numpy()
        few = model(test)
        out["few_shot_pred_score"] = few.pred_score.numpy()
        out["few_shot_anomaly_map"] = few.anomaly_map[:, ::MAP_STRIDE, ::MAP_STRIDE].numpy()
    return out


def generate(data: Path, out: Path, cases: list[str]) -> None:
    import anomalib
    import open_clip

    open_clip.add_model_config(ARCH_CONFIG)
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "meta.json"
    previous = json.loads(meta_file.read_text())["cases"] if meta_file.is_file() else {}
    meta = {
        "anomalib": anomalib.__version__, "open_clip": open_clip.__version__, "torch": torch.__version__,
        "weight_seed": WEIGHT_SEED, "weight_std": WEIGHT_STD, "category": CATEGORY, "image_size": IMAGE_SIZE, "cases": previous,
    }  # fmt: skip
    for name in cases:
        case = CASES[name]
        support_files, test_files = SUPPORT[: case["support"]], TEST[: case["test"]]
        support_pixels, test_pixels = load_pixels(data, support_files), load_pixels(data, test_files)
        arrays = {"support_pixels": support_pixels, "test_pixels": test_pixels}
        for variant in case["variants"]:
            model = build(case["arch"])
            if variant == "paper":
                fix_window_transposition(model)
            stages = record(model, normalise(support_pixels), normalise(test_pixels), case["windows"])
            arrays.update({f"{variant}_{key}": value for key, value in stages.items()})
        np.savez_compressed(out / f"{name}.npz", **arrays)
        meta["cases"][name] = {
            "arch": case["arch"],
            "support": support_files,
            "test": test_files,
            "variants": list(case["variants"]),
        }
        print(f"wrote {out / (name + '.npz')}")
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-AD root holding bottle/")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "parity" / "winclip")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    args = parser.parse_args(argv)
    generate(args.data, args.out, args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
