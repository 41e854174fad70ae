"""FineGrainedAD stages that already reproduce the authors' released code, against their golden numbers.

The fixtures in ``tests/fixtures/parity/finegrainedad`` were written by ``tests/parity/make_golden.py
finegrainedad`` from RetoFan233/FineGrainedAD (commit in ``meta.json``): their ``FineGrainedPatchAD`` and the ``fit``
loop of ``train_seg_finegrained_patch.py`` ran on ``fsad-parity-240`` with name-filled weights. fsad computes each
stage with its own components (``tests/parity/compare_finegrainedad.py``, fed the authors' prompt texts, contexts,
Attr-MoE weights, Query Former weights and prototypes where they differ by construction). Only the stages that
match are asserted here; the ones that do not, and why, are listed in ``tests/parity/README.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.compare_finegrainedad import backbone, encode_level, golden, measure

TOLERANCE = 1e-5
#: Stages of compare_finegrainedad.py that match the authors' code today (prefixes of its stage names).
MATCHING = (
    "preprocess/", "text/", "query former", "memory bank/", "visual map", "textual map", "token → level matches",
    "anomaly map", "image text score", "image score", "regions/960-px images", "regions/cosine to level prompts",
)  # fmt: skip
#: Stages that differ, with their cause in tests/parity/README.md; listed so that a new stage cannot go unasserted.
DIFFERING = (
    "regions/component pixels assigned differently (fraction)", "regions/component weights (15×15)",
    "regions/background weights (15×15)",
)  # fmt: skip
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:backbone.pretrained is null")]


def test_matching_stages_reproduce_the_authors_finegrainedad(mvtec_root: Path) -> None:
    delta = measure(mvtec_root)
    unknown = [name for name in delta if not name.startswith(MATCHING) and name not in DIFFERING]
    assert not unknown, f"stages neither asserted nor documented as differing: {unknown}"
    matching = {name: value for name, value in delta.items() if name.startswith(MATCHING)}
    assert len(matching) >= 30  # every level × kind × stage of the text side, plus the visual and fused maps
    too_far = {name: value for name, value in matching.items() if value > TOLERANCE}
    assert not too_far, f"max |Δ| above {TOLERANCE}: {too_far}"


def test_the_text_comparison_can_fail() -> None:
    """Control: the trained contexts and Attr-MoE weights moved far beyond the tolerance, so encoding the final
    prompts with the initial parameters must miss the authors' final features by much more than 1e-5."""
    arrays, meta = golden()
    tower = backbone(meta)
    for level, kind in (("image", "normal"), ("background", "learnable"), ("entity0", "handcrafted")):
        stale = encode_level(tower, arrays, meta, "initial", level, kind)
        miss = (stale - torch.from_numpy(arrays[f"final_text/{level}/{kind}"])).abs().max()
        assert float(miss) > 1e-3, f"{level}/{kind}: initial parameters already give the final features"
