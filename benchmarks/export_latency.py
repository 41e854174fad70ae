"""Exported model latency: onnxruntime (CPU) per image ÷ the Lightning module's, and the exported file sizes.

The last line is the size budget: ``model.pt2`` (torch.export) ÷ ``model.onnx``, at most 1.1 (the torch file holds
only what inference runs). Warnings stay visible: an export that prints a deprecation warning shows it here.

Both sides start from the same uint8 RGB images (900×900, the MVTec size) at batch 8: the Lightning side runs the
datamodule's transform (anti-aliased resize, normalisation) and ``module(images)``; the ONNX side runs the exported
graph, which holds the same steps. Random weights (no download); the memory-bank method by default.

    python benchmarks/export_latency.py [--arch ViT-B-16-plus-240] [--image_size 240] [--method membank|promptad]
                                        [--taps 3 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import onnxruntime
import torch

from fsad.datamodules.transforms import PairedTransform
from fsad.export import export_model

BATCH, REPEATS, SIDE = 8, 3, 900


def seconds_per_call(call, repeats: int = REPEATS) -> float:
    call()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--image_size", type=int, default=240)
    parser.add_argument("--method", default="membank", choices=["membank", "promptad"])
    parser.add_argument("--taps", type=int, nargs="+", default=None, help="backbone taps (ViT-B: 3 8, else 2 4)")
    args = parser.parse_args()
    torch.manual_seed(0)
    taps = args.taps or ([3, 8] if args.arch.startswith("ViT-B") else [2, 4])
    backbone = {"arch": args.arch, "pretrained": None, "taps": taps}
    if args.method == "membank":
        from fsad.lightning_modules.membank.module import MemoryBankAD as Method
    else:
        from fsad.lightning_modules.promptad.module import PromptAD as Method
    module = Method(backbone=backbone, image_size=args.image_size, eval_size=256).eval()
    module.prepare_for_data(SimpleNamespace(category="bottle", dataset_name="mvtec"))
    transform = PairedTransform(args.image_size, 256, module.backbone.image_mean, module.backbone.image_std)
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (BATCH, SIDE, SIDE, 3), dtype=np.uint8)
    blank = np.zeros((SIDE, SIDE), np.uint8)
    with torch.no_grad():
        module.fit_support(module.backbone(torch.stack([transform(p, blank)[0] for p in pictures[:4]])))

    def lightning_call() -> None:
        with torch.no_grad():
            module(torch.stack([transform(p, blank)[0] for p in pictures]))

    with tempfile.TemporaryDirectory() as folder:
        written = export_model(module, folder, "both")
        sizes = {kind: written[kind].stat().st_size / 1e6 for kind in ("onnx", "pt2")}
        session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
        batch = np.ascontiguousarray(pictures.transpose(0, 3, 1, 2))
        onnx_seconds = seconds_per_call(lambda: session.run(None, {"image": batch}))
    lightning_seconds = seconds_per_call(lightning_call)
    print(
        f"export latency ({args.method}, {args.arch}, {torch.get_num_threads()} threads): onnxruntime/lightning = "
        f"{onnx_seconds / lightning_seconds:.2f} ({1e3 * onnx_seconds / BATCH:.1f} ms vs "
        f"{1e3 * lightning_seconds / BATCH:.1f} ms per image)"
    )
    print(
        f"export size ({args.method}, {args.arch}): model.pt2/model.onnx = {sizes['pt2'] / sizes['onnx']:.3f} "
        f"({sizes['pt2']:.1f} MB vs {sizes['onnx']:.1f} MB; budget <= 1.1)"
    )


if __name__ == "__main__":
    main()
