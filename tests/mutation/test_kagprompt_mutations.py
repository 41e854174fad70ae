"""The mutation check of KAG-prompt's model.py runs in the suite: every listed one-line mutation must be caught."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutation.kagprompt_mutations import MUTATIONS

SCRIPT = Path(__file__).with_name("kagprompt_mutations.py")


def test_the_list_covers_every_equation_and_loss_term_in_both_variants() -> None:
    covered: dict[int, set[str]] = {}
    for mutation in MUTATIONS:
        for first, last, variant in re.findall(r"Eq\. (\d+)(?:[-/](\d+))?[^,]*? (paper|code|both)", mutation.target):
            for equation in range(int(first), int(last or first) + 1):
                covered.setdefault(equation, set()).update({"paper", "code"} if variant == "both" else {variant})
    assert set(covered) >= set(range(1, 18))
    paper_only = {3, 6}  # the authors' head has no self-loop edge (Eq. 3, 6)
    for equation in set(range(1, 18)) - paper_only:
        assert covered[equation] == {"paper", "code"}, f"Eq. {equation}: {covered[equation]}"
    terms = " ".join(m.target for m in MUTATIONS)
    for term in ("CE paper", "image term code", "focal paper", "focal code", "dice both"):
        assert f"Eq. 17 {term}" in terms


@pytest.mark.slow
def test_every_mutation_of_model_py_makes_a_kag_test_fail() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--workers", "2"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"{len(MUTATIONS)}/{len(MUTATIONS)} mutations killed" in run.stdout
