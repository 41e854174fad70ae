"""P1: test time per image of each method ÷ the bare OpenCLIP ``encode_image``, at batch 8.

ViT-B-16-plus-240 with random weights on the CPU. Support and text features are computed once before timing, as in
a test run; the timed step is the module's ``predict_batch`` (one backbone pass, scoring, upsampling to 256 and
Gaussian smoothing). The reference and the method are timed alternately, ``--rounds`` times, and the median of the
per-round ratios is printed (with the range), so a slow spell of the machine hits both sides of a ratio. Prints one
line per method; budgets: FineGrainedAD ≤ 1.35, KAG-prompt ≤ 2.5 at the paper's full text width and ≤ 1.5 with
``--graph-dim 256``.

    python benchmarks/inference_overhead.py [--method kagprompt|finegrainedad|all] [--graph-dim 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from fsad.batch import Batch
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.finegrainedad.mfsc import mllp_texts, packaged_record

BATCH, REPEATS = 8, 3


def seconds_per_call(call: Callable[[], object], repeats: int = REPEATS) -> float:
    call()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def make_batch(images: torch.Tensor, eval_size: int) -> Batch:
    count = images.shape[0]
    return Batch(
        image=images, gt_mask=torch.zeros(count, eval_size, eval_size, dtype=torch.uint8),
        gt_label=torch.zeros(count, dtype=torch.long), image_path=[""] * count, mask_path=[None] * count,
        category=["bottle"] * count, index=torch.arange(count),
    )  # fmt: skip


def finegrainedad_step(images: torch.Tensor, support: torch.Tensor) -> Callable[[], object]:
    """FineGrainedAD (paper variant) predict_batch on the batch, with support and text features cached first."""
    from fsad.lightning_modules.finegrainedad.module import FineGrainedAD

    module = FineGrainedAD(BackboneSpec(arch="ViT-B-16-plus-240", pretrained=None), image_size=240, eval_size=256)
    module.model.build(module.backbone, mllp_texts(packaged_record("mvtec", "bottle"), placeholders=True))
    module.model.cache_text(module.backbone)
    module.fit_support(module.backbone(support))
    return lambda: module.predict_batch(make_batch(images.clone(), 256))


def kagprompt_step(images: torch.Tensor, support: torch.Tensor, graph_dim: int | None = None) -> Callable[[], object]:
    """KAG-prompt predict_batch on the batch (eval 224, no smoothing), support and text features cached first."""
    from fsad.lightning_modules.kagprompt.module import KAGPrompt

    spec = BackboneSpec(arch="ViT-B-16-plus-240", pretrained=None, taps=[3, 6, 9, 12], vv_attention=False)
    module = KAGPrompt(spec, graph_dim=graph_dim).eval()
    module.text_features("bottle")
    module.fit_support(module.backbone(support))
    module.score = lambda features: (  # the module reads the category from its datamodule; here it is fixed
        lambda out: (out["anomaly_map"], out["score"])
    )(module.model(features, module.text_features("bottle").expand(features.cls.shape[0], -1, -1)))
    return lambda: module.predict_batch(make_batch(images.clone(), 224))


def median_ratio(
    step: Callable[[], object], reference: Callable[[], object], rounds: int
) -> tuple[float, float, float]:
    """Median, min and max over ``rounds`` of (step time ÷ reference time), the two timed back to back."""
    ratios = []
    with torch.inference_mode():
        for _ in range(rounds):
            ratios.append(seconds_per_call(step) / seconds_per_call(reference))
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description="test-time overhead of each method over the bare backbone")
    parser.add_argument("--method", choices=["all", "kagprompt", "finegrainedad"], default="all")
    parser.add_argument("--graph-dim", type=int, default=None, help="KAG-prompt graph_dim (default: text width)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating reference/method timings (median)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="backbone.pretrained is null")
    torch.manual_seed(0)
    images, support = torch.randn(BATCH, 3, 240, 240), torch.randn(4, 3, 240, 240)
    from fsad.lightning_modules.components.clip import ClipBackbone

    bare = ClipBackbone(BackboneSpec(arch="ViT-B-16-plus-240", pretrained=None, vv_attention=False, taps=[]))
    reference = lambda: bare.clip.encode_image(images)  # noqa: E731
    with torch.inference_mode():
        print(f"bare encode_image: {seconds_per_call(reference) / BATCH * 1000:.1f} ms/image at batch {BATCH}")
    steps = {}
    if args.method in ("all", "finegrainedad"):
        steps["finegrainedad"] = finegrainedad_step(images, support)
    if args.method in ("all", "kagprompt"):
        steps[f"kagprompt graph_dim={args.graph_dim or 'text width'}"] = kagprompt_step(images, support, args.graph_dim)
    for name, step in steps.items():
        median, low, high = median_ratio(step, reference, args.rounds)
        print(f"inference_overhead {name} ratio={median:.3f} (range {low:.3f}-{high:.3f} over {args.rounds} rounds)")


if __name__ == "__main__":
    main()
