"""data.support_preset: the authors' published picks, read in their formats (PromptAD indices, FineGrainedAD paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsad.datamodules.kshot import preset_support, read_promptad_picks
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.transforms import DataError


def test_promptad_indices_pick_from_the_sorted_file_list(tmp_path: Path) -> None:
    picks = tmp_path / "seeds_mvtec/widget/selected_samples_per_run.txt"
    picks.parent.mkdir(parents=True)
    picks.write_text("#1: 3\n#2: 004 000\n#4: 1 2 3 4\n")
    candidates = [f"/data/widget/train/good/{i:03d}.png" for i in (4, 2, 0, 3, 1)]  # a filesystem's glob order
    assert preset_support("promptad", tmp_path, "mvtec", "widget", candidates, 2) == [
        "/data/widget/train/good/004.png", "/data/widget/train/good/000.png"
    ]  # fmt: skip
    assert preset_support("promptad", picks, "mvtec", "widget", candidates, 1) == ["/data/widget/train/good/003.png"]
    with pytest.raises(DataError, match=r"indices \[5\] are outside the 5 normal training images"):
        picks.write_text("#1: 5\n")
        preset_support("promptad", tmp_path, "mvtec", "widget", candidates, 1)
    with pytest.raises(DataError, match=r"no '#4:' line \(data.k_shot=4\)"):
        read_promptad_picks(picks, 4)
    with pytest.raises(DataError, match="publishes picks for .*not 'realiad'"):
        preset_support("promptad", tmp_path, "realiad", "widget", candidates, 1)


def test_packaged_promptad_bottle_picks_are_the_published_ones() -> None:
    """methods.md §4: bottle `#1: 131`, `#4: 029 045 192 127`."""
    candidates = [f"bottle/train/good/{i:03d}.png" for i in range(209)]
    assert preset_support("promptad", None, "mvtec", "bottle", candidates, 1) == ["bottle/train/good/131.png"]
    assert [Path(p).name for p in preset_support("promptad", None, "mvtec", "bottle", candidates, 4)] == [
        "029.png", "045.png", "192.png", "127.png"
    ]  # fmt: skip


def test_finegrainedad_lines_filter_category_and_view_then_take_the_first_k(tmp_path: Path) -> None:
    shots = tmp_path / "seeds_realiad/2_shot.txt"
    shots.parent.mkdir(parents=True)
    shots.write_text(
        "toy/OK/S0001/toy_0001_OK_C1_1.jpg\ntoy/OK/S0001/toy_0001_OK_C1_1.jpg\ntoy/OK/S0002/toy_0002_OK_C2_2.jpg\n"
        "toy_brick/OK/S0009/toy_brick_0009_OK_C1_9.jpg\ntoy/OK/S0003/toy_0003_OK_C1_3.jpg\n"
    )  # a duplicate line and a category whose name starts like another, as in the published files
    root = "/r/realiad_256/toy"
    candidates = [f"{root}/OK/S000{i}/toy_000{i}_OK_C{v}_{i}.jpg" for i, v in ((1, 1), (2, 2), (3, 1), (4, 1))]
    assert preset_support("finegrainedad", tmp_path, "realiad", "toy", candidates, 2, views=["C1"]) == [
        f"{root}/OK/S0001/toy_0001_OK_C1_1.jpg", f"{root}/OK/S0003/toy_0003_OK_C1_3.jpg"
    ]  # fmt: skip
    assert preset_support("finegrainedad", tmp_path, "realiad", "toy", candidates, 2) == [
        f"{root}/OK/S0001/toy_0001_OK_C1_1.jpg", f"{root}/OK/S0002/toy_0002_OK_C2_2.jpg"
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"1 picks for category 'toy_brick' in views \['C1'\], data.k_shot=2"):
        preset_support("finegrainedad", tmp_path, "realiad", "toy_brick", candidates, 2, views=["C1"])
    with pytest.raises(DataError, match=r"seeds_realiad/4_shot.txt not found in data.support_preset_root"):
        preset_support("finegrainedad", tmp_path, "realiad", "toy", candidates, 4)


def test_datamodule_uses_the_preset_and_refuses_two_choices(mvtec_root: Path, tmp_path: Path) -> None:
    picks = tmp_path / "seeds_mvtec/bottle/selected_samples_per_run.txt"
    picks.parent.mkdir(parents=True)
    picks.write_text("#1: 5\n#2: 9 0\n")
    data = MVTecDataModule(root=str(mvtec_root), category="bottle", k_shot=2, seed=3, support_preset="promptad",
                           support_preset_root=str(tmp_path))  # fmt: skip
    data.setup()
    normal = sorted(str(p) for p in (mvtec_root / "bottle/train/good").glob("*.png"))
    assert [str(Path(p)) for p in data.support_paths] == [normal[9], normal[0]]
    with pytest.raises(ValueError, match="support_files and data.support_preset both"):
        MVTecDataModule(root=str(mvtec_root), category="bottle", support_files=["000.png"], support_preset="promptad")
