"""Reproducible k-shot support sampling: a pure function of (seed, sorted file names, k); and the papers' published
support picks (``data.support_preset``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from fsad.datamodules.transforms import DataError
from fsad.run_folder import write_text_atomically


def sample_support(candidates: Sequence[str], k: int, seed: int) -> list[str]:
    """Pick ``k`` of ``candidates`` without replacement; the same seed and names always give the same picks.
    ``k = 0`` (zero-shot methods) picks nothing.

    The candidates are sorted first, so the result does not depend on the order a filesystem lists them in
    (the cause of PromptAD issues #10/#17/#21 and KAG-prompt issue #2). The picks are returned sorted.
    """
    names = sorted(candidates)
    if k == 0:  # zero-shot: no support set
        return []
    if k < 0:
        raise DataError(f"data.k_shot must be 0 (zero-shot) or a positive number of support images, got k_shot={k}")
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


ZERO_SHOT_NOTE = "# zero-shot (data.k_shot: 0): no support images\n"
"""What ``support.txt`` holds for a zero-shot run: a comment line, since an empty file reads as a failed write."""


def write_support_list(paths: Sequence[str], destination: Path) -> Path:
    """Write one support path per line to ``destination`` atomically (``support.txt`` in the run directory); for no
    paths (zero-shot), :data:`ZERO_SHOT_NOTE`."""
    write_text_atomically(destination, "".join(f"{p}\n" for p in paths) or ZERO_SHOT_NOTE)
    return destination


def read_support_list(path: Path) -> list[str]:
    """The support paths a run recorded in ``support.txt`` (one per line, as :func:`write_support_list` wrote them);
    none for a zero-shot run's :data:`ZERO_SHOT_NOTE`."""
    text = path.read_text()
    paths = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not paths and text != ZERO_SHOT_NOTE:
        raise DataError(f"{path} lists no support image")
    return paths


SupportPreset = Literal["promptad", "finegrainedad"]
PRESET_DATASETS = {"promptad": ("mvtec", "visa"), "finegrainedad": ("realiad",)}
PACKAGED_PRESETS = Path(__file__).parent / "support_presets"


def preset_file(preset: SupportPreset, root: str | Path | None, dataset: str, category: str, k: int) -> Path:
    """Where the authors keep one category's picks, under ``root`` (their ``datasets/`` folder) or the packaged copy.

    PromptAD: ``seeds_<dataset>/<category>/selected_samples_per_run.txt``; FineGrainedAD:
    ``seeds_realiad/<k>_shot.txt``. ``root`` may also name the file itself.
    """
    if dataset not in PRESET_DATASETS[preset]:
        raise DataError(
            f"data.support_preset: {preset!r} publishes picks for {PRESET_DATASETS[preset]}, not {dataset!r}"
        )
    if root is not None and Path(root).is_file():
        return Path(root)
    if preset == "promptad":
        relative = Path(f"seeds_{dataset}") / category / "selected_samples_per_run.txt"
    else:
        relative = Path(f"seeds_{dataset}") / f"{k}_shot.txt"
    base = Path(root).expanduser() if root is not None else PACKAGED_PRESETS / preset
    path = base / relative
    if not path.is_file():
        where = (
            "data.support_preset_root" if root is not None else "the packaged presets (set data.support_preset_root)"
        )
        raise DataError(f"data.support_preset: {path} not found in {where}")
    return path


def read_promptad_picks(path: Path, k: int) -> list[int]:
    """The indices of the ``#<k>: i j ...`` line of a PromptAD ``selected_samples_per_run.txt``."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        head, _, indices = line.partition(":")
        if head.strip() == f"#{k}":
            try:
                picks = [int(token) for token in indices.split()]
            except ValueError:
                raise DataError(f"{path}:{number}: expected '#{k}: <index> ...', got {line!r}") from None
            if len(picks) != k:
                raise DataError(f"{path}:{number}: the #{k} line lists {len(picks)} indices, not {k}")
            return picks
    raise DataError(f"{path}: no '#{k}:' line (data.k_shot={k})")


def read_finegrainedad_picks(path: Path, category: str, k: int, views: Sequence[str] | None) -> list[str]:
    """The first ``k`` distinct ``<category>/OK/S####/<file>.jpg`` lines of a FineGrainedAD ``<k>_shot.txt`` whose
    camera view is in ``views`` (all views when ``None``), in file order."""
    picks: list[str] = []
    for line in path.read_text().splitlines():
        entry = line.strip()
        parts = Path(entry).parts
        if not entry or parts[0] != category or entry in picks:
            continue
        if views is not None and not any(f"_{view}_" in parts[-1] for view in views):
            continue
        picks.append(entry)
    if len(picks) < k:
        shown = f" in views {list(views)}" if views is not None else ""
        raise DataError(f"{path}: {len(picks)} picks for category {category!r}{shown}, data.k_shot={k} needs {k}")
    return picks[:k]


def preset_support(
    preset: SupportPreset,
    root: str | Path | None,
    dataset: str,
    category: str,
    candidates: Sequence[str],
    k: int,
    views: Sequence[str] | None = None,
) -> list[str]:
    """The authors' published support picks for one (category, k), as paths among ``candidates``.

    PromptAD's indices index an *unsorted* ``glob`` of ``train/good`` in the authors' loader, so the image they
    name depends on the filesystem; here index ``i`` is the ``i``-th of the **sorted** candidate paths (what
    FineGrainedAD's MVTec loader does; on MVTec-AD index ``i`` is then the file ``{i:03d}.png``). FineGrainedAD's
    Real-IAD lists name files, matched by their path relative to the category.
    """
    path = preset_file(preset, root, dataset, category, k)
    if preset == "promptad":
        names = sorted(candidates)
        indices = read_promptad_picks(path, k)
        outside = [i for i in indices if not 0 <= i < len(names)]
        if outside:
            raise DataError(f"{path}: indices {outside} are outside the {len(names)} normal training images")
        return [names[i] for i in indices]
    return resolve_support_files(candidates, read_finegrainedad_picks(path, category, k, views))
