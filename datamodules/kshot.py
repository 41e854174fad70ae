"""Reproducible k-shot support sampling: a pure function of (seed, sorted file names, k)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fsad.datamodules.transforms import DataError


def sample_support(candidates: Sequence[str], k: int, seed: int) -> list[str]:
    """Pick ``k`` of ``candidates`` without replacement; the same seed and names always give the same picks.

    The candidates are sorted first, so the result does not depend on the order a filesystem lists them in
    (the cause of PromptAD issues #10/#17/#21 and KAG-prompt issue #2). The picks are returned sorted.
    """
    names = sorted(candidates)
    if k <= 0:
        raise DataError(f"data.k_shot must be a positive number of support images, got k_shot={k}")
    if k > len(names):
        raise DataError(f"data.k_shot={k} exceeds the {len(names)} normal training images available")
    picks = np.random.default_rng(seed).choice(len(names), size=k, replace=False)
    return sorted(names[i] for i in picks)


def resolve_support_files(candidates: Sequence[str], requested: Sequence[str]) -> list[str]:
    """Map explicit ``support_files`` entries (full paths, paths relative to the pool, or file names) to candidates.

    Used for the papers' fixed picks, e.g. PromptAD's MVTec bottle 4-shot list ``[029.png, 045.png, 192.png, 127.png]``.
    """
    by_path = {str(Path(c)): c for c in candidates}
    by_name: dict[str, list[str]] = {}
    for c in candidates:
        by_name.setdefault(Path(c).name, []).append(c)
    chosen, unknown = [], []
    for entry in requested:
        entry_path = str(Path(entry))
        if entry_path in by_path:
            chosen.append(by_path[entry_path])
            continue
        suffix_matches = [c for c in candidates if str(Path(c)).endswith("/" + entry_path)]
        matches = suffix_matches or by_name.get(Path(entry).name, [])
        if len(matches) == 1:
            chosen.append(matches[0])
        else:
            unknown.append(entry if not matches else f"{entry} (ambiguous: {len(matches)} matches)")
    if unknown:
        raise DataError(
            f"data.support_files: {unknown} not found among the {len(candidates)} normal training images "
            f"(e.g. {sorted(Path(c).name for c in candidates)[:5]})"
        )
    if len(set(chosen)) != len(chosen):
        raise DataError(f"data.support_files lists an image twice: {list(requested)}")
    return chosen


def write_support_list(paths: Sequence[str], destination: Path) -> Path:
    """Write one support path per line to ``destination`` atomically (``support.txt`` in the run directory)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(destination.suffix + ".tmp")
    tmp.write_text("".join(f"{p}\n" for p in paths))
    tmp.replace(destination)
    return destination
