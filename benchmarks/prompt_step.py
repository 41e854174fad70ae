"""P2: one prompt-training step with text encoding truncated to the longest prompt ÷ the full 77-token step.

ViT-B-16-plus-240 with random weights on the CPU, 64 prompts of FineGrainedAD-like lengths (image captions,
components, background), forward and backward through the text tower, SGD step on the contexts. Timed as this
process's CPU time on one thread, the two settings alternating over rounds: wall time on a shared machine measures
the other processes (it printed ratios of 0.79–0.90 under load where the CPU-time ratio was 0.29). Prints, last,
``prompt_step ratio=<median truncated/full> loss_abs_diff=<...>`` (budget: ratio ≤ 0.4, losses equal to 1e-5).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from fsad.lightning_modules.components.clip import BackboneSpec, ClipBackbone
from fsad.lightning_modules.components.losses import (
    explicit_anomaly_margin_loss,
    prompt_contrastive_loss,
    prompt_mean_loss,
)
from fsad.lightning_modules.components.prompts import PromptGroupTexts, PromptLearner

CAPTION = "a brown glass bottle seen from above with a round mouth and a dark interior on a black background."
GROUPS = {
    "image": PromptGroupTexts(
        normal=[CAPTION],
        abnormal=[CAPTION.replace("bottle", f"bottle with {d}") for d in
                  ("a large breakage", "a small breakage", "contamination", "a crack", "a scratch", "a stain",
                   "a chip", "a hole", "dirt", "a dent", "a missing piece", "a deformation", "a burn", "a spot")]
                 + [CAPTION.replace("brown", colour) for colour in ("green", "white", "blue", "red", "grey")],
        learnable_abnormal=[CAPTION],
    ),
    "mouth": PromptGroupTexts(
        normal=["a round bottle mouth in the centre with a smooth glossy rim."],
        abnormal=[f"a round bottle mouth with {d} in the centre." for d in
                  ("a crack", "a chip", "dirt", "a stain", "a scratch", "a dent", "a hole", "a burn")],
        learnable_abnormal=["a round bottle mouth in the centre with a smooth glossy rim."],
    ),
    "shoulder": PromptGroupTexts(
        normal=["a smooth brown glass ring of the bottle shoulder around the mouth."],
        abnormal=[f"a brown glass shoulder ring with {d}." for d in
                  ("a crack", "a chip", "a bubble", "a scratch", "a stain", "a dent")],
        learnable_abnormal=["a smooth brown glass ring of the bottle shoulder around the mouth."],
    ),
    "background": PromptGroupTexts(
        normal=["black background."],
        abnormal=[f"black background with {d}." for d in
                  ("a stain", "dust", "a scratch", "a spot", "a hair", "a fibre", "oil", "a fingerprint", "a smear",
                   "debris", "a glare")],
        learnable_abnormal=["black background."],
    ),
}  # fmt: skip


def make_step(backbone: ClipBackbone, truncate: bool):
    """A fresh learner (same seed, same contexts, for both settings) and a function running one training step;
    the step returns its loss."""
    torch.manual_seed(0)
    learner = PromptLearner(backbone.text_width)
    learner.build(backbone, GROUPS)
    tokens = F.normalize(torch.randn(4, 225, backbone.embed_dim), dim=-1)
    optimizer = torch.optim.SGD(learner.parameters(), lr=2e-3, momentum=0.9)

    def step() -> float:
        features = learner.encode(backbone, truncate=truncate)
        loss = sum(
            prompt_contrastive_loss(tokens, g.normal_prototype, g.abnormal, 4.6)
            + explicit_anomaly_margin_loss(tokens, g.normal_prototype, g.abnormal_prototype, 1.0)
            + 0.001 * prompt_mean_loss(g.handcrafted, g.learnable)
            for g in features.values()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


def cpu_seconds(step) -> float:
    """CPU time of one call of ``step`` in this process (one thread): unlike wall time it does not grow when other
    processes share the cores."""
    start = time.process_time()
    step()
    return time.process_time() - start


def main(rounds: int = 3) -> None:
    warnings.filterwarnings("ignore", message="backbone.pretrained is null")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = ClipBackbone(BackboneSpec(arch="ViT-B-16-plus-240", pretrained=None))
    count = sum(len(g.normal) + len(g.abnormal) + 4 * len(g.learnable_abnormal) for g in GROUPS.values())
    truncated_step, full_step = make_step(backbone, truncate=True), make_step(backbone, truncate=False)
    loss_truncated, loss_full = truncated_step(), full_step()  # first steps: equal losses, and warm-up
    ratios, truncated_times, full_times = [], [], []
    for _ in range(rounds):  # alternate, so a slow phase of the machine hits both settings
        truncated_times.append(cpu_seconds(truncated_step))
        full_times.append(cpu_seconds(full_step))
        ratios.append(truncated_times[-1] / full_times[-1])
    truncated, full = statistics.median(truncated_times), statistics.median(full_times)
    print(f"{count} prompts; CPU time per step (1 thread, median of {rounds}): truncated {truncated:.2f} s, "
          f"full 77-token {full:.2f} s; round ratios {', '.join(f'{r:.3f}' for r in ratios)}")  # fmt: skip
    ratio = statistics.median(ratios)
    print(f"prompt_step ratio={ratio:.3f} loss_abs_diff={abs(loss_truncated - loss_full):.2e}")


if __name__ == "__main__":
    main()
