"""Datamodules on generated trees in the published formats, on the real shared data, and on bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fsad.datamodules.folder import FolderDataModule
from fsad.datamodules.mvtec import MVTecDataModule
from fsad.datamodules.realiad import RealIADDataModule, camera_view
from fsad.datamodules.transforms import AugmentSpec, DataError, load_mask, load_rgb, resize_image
from fsad.datamodules.visa import VisADataModule
from tests.fixtures.trees import make_realiad, make_visa_raw, write_image, write_mask

REPO = Path(__file__).resolve().parents[2]


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    masks, labels, paths = [], [], []
    for batch in loader:
        masks.append(batch.gt_mask)
        labels.append(batch.gt_label)
        paths += batch.image_path
    return torch.cat(masks), torch.cat(labels), paths


def make_mvtec(root: Path, category: str = "widget", mode: str = "RGB", n_train: int = 5) -> Path:
    for i in range(n_train):
        write_image(root / category / "train" / "good" / f"{i:03d}.png", (40, 40), seed=i, mode=mode)
    write_image(root / category / "test" / "good" / "000.png", (40, 40), seed=50, mode=mode)
    for i in range(2):
        write_image(root / category / "test" / "crack" / f"{i:03d}.png", (40, 40), seed=60 + i, mode=mode)
        write_mask(root / category / "ground_truth" / "crack" / f"{i:03d}_mask.png", (40, 40), (0, 0, 20, 40))
    return root


# ----------------------------------------------------------------------------- formats
def test_visa_raw_layout_counts_labels_and_binarised_masks(tmp_path: Path) -> None:
    root = make_visa_raw(tmp_path / "visa")
    data = VisADataModule(root=str(root), category="pcb1", k_shot=2, image_size=32, eval_size=30)
    data.setup()
    assert data.available_categories() == ["candle", "pcb1"]
    assert len(data.normal_pool) == 5 and len(data.test_samples) == 5
    masks, labels, paths = all_batches(data.test_dataloader())
    assert labels.tolist() == [0, 0, 1, 1, 1] and all("/pcb1/" in p for p in paths)
    # 90x60 images are resized, not centre-cropped. Nearest-neighbour picks source pixel floor(dst * 90/30) in x
    # and floor(dst * 60/30) in y, so the box x 10..29, y 10..19 covers x 4..9 (3*4=12 .. 3*9=27), y 5..9.
    assert masks.dtype == torch.uint8 and set(masks.unique().tolist()) == {0, 1}
    expected = np.zeros((30, 30), dtype=np.uint8)
    expected[5:10, 4:10] = 1
    for m in masks[2:]:
        assert np.array_equal(m.numpy(), expected)


def test_visa_prepared_layout_is_accepted(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "visa_pytorch", "candle")
    data = VisADataModule(root=str(root), category="candle", k_shot=1)
    data.setup()
    assert len(data.test_samples) == 3


def test_realiad_json_splits_views_and_single_view(tmp_path: Path) -> None:
    root = make_realiad(tmp_path / "realiad")
    multi = RealIADDataModule(root=str(root), category="audiojack", k_shot=2, resolution=256, image_size=32)
    multi.setup()
    assert len(multi.normal_pool) == 10 and len(multi.test_samples) == 20
    assert sum(s.label for s in multi.test_samples) == 10 and all(s.mask_path for s in multi.test_samples if s.label)
    c1 = RealIADDataModule(root=str(root), category="audiojack", k_shot=2, resolution=256, views=["C1"])
    c1.setup()
    assert {camera_view(s.image_path) for s in c1.normal_pool + c1.test_samples} == {"C1"}
    assert len(c1.test_samples) == 4
    single = RealIADDataModule(root=str(root), category="audiojack", k_shot=1, resolution=256, single_view=True)
    single.setup()
    assert len(single.normal_pool) == 2 and len(single.test_samples) == 4
    masks, labels, _ = all_batches(c1.test_dataloader())
    assert labels.tolist() == [0, 0, 1, 1] and masks[2:].sum() > 0 and masks[:2].sum() == 0
    with pytest.raises(DataError, match="realiad_512"):
        RealIADDataModule(root=str(root), category="audiojack", resolution=512).setup()
    with pytest.raises(ValueError, match="data.views"):
        RealIADDataModule(root=str(root), category="audiojack", views=["C7"])


def test_grayscale_rgba_palette_and_16bit_inputs(tmp_path: Path) -> None:
    for mode in ("L", "RGBA", "P"):
        path = tmp_path / f"img_{mode}.png"
        write_image(path, (20, 10), seed=1, mode=mode)
        assert load_rgb(path).shape == (10, 20, 3)
    sixteen = tmp_path / "img16.png"
    Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).save(sixteen)
    image = load_rgb(sixteen)
    assert image.dtype == np.uint8 and image.shape == (10, 20, 3) and image.max() > 200
    mask16 = tmp_path / "mask16.png"
    Image.fromarray(np.where(np.arange(200).reshape(10, 20) > 150, 65535, 0).astype(np.uint16)).save(mask16)
    assert load_mask(mask16).sum() == 49
    palette = Image.fromarray(np.where(np.arange(200).reshape(10, 20) > 190, 2, 0).astype(np.uint8)).convert("P")
    palette.save(tmp_path / "mask_p.png")
    assert load_mask(tmp_path / "mask_p.png").sum() == 9
    root = make_mvtec(tmp_path / "gray", "screw", mode="L")
    data = MVTecDataModule(root=str(root), category="screw", k_shot=2, image_size=16, eval_size=16)
    assert next(iter(data.test_dataloader())).image.shape[1] == 3


# ----------------------------------------------------------------------------- real files
def test_real_mvtec_bottle_counts(mvtec_root: Path) -> None:
    data = MVTecDataModule(root=str(mvtec_root), category="bottle", k_shot=4, image_size=32, eval_size=32)
    data.setup()
    masks = [load_mask(s.mask_path) for s in data.test_samples if s.mask_path]
    assert len(data.test_samples) == 83
    assert len(masks) == 63 and all(m.any() for m in masks)
    assert sum(s.mask_path is None for s in data.test_samples) == 20


def test_hazelnut_toy_as_folder_dataset(shared_data: Path) -> None:
    root = shared_data / "hazelnut_toy"
    data = FolderDataModule(
        normal_dir=str(root / "train/good"), abnormal_dir=str(root / "test/colour"),
        mask_dir=str(root / "ground_truth/colour"), normal_test_dir=str(root / "test/good"),
        category="hazelnut_toy", k_shot=28, image_size=32, eval_size=32,
    )  # fmt: skip
    data.setup()
    with_masks = [s for s in data.test_samples if s.mask_path]
    assert len(with_masks) == 17 and all(Path(s.mask_path).stem == Path(s.image_path).stem for s in with_masks)
    odd = [p for p in data.support_paths if Path(p).name == "01.jpg"]
    assert odd and load_rgb(odd[0]).shape[:2] == (522, 512)
    support = next(iter(data.support_dataloader()))
    assert support.image.shape[1:] == (3, 32, 32)


def test_folder_without_normal_test_dir_never_tests_on_support(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "f", "x", n_train=6)
    data = FolderDataModule(normal_dir=str(root / "x/train/good"), k_shot=2, category="x")
    data.setup()
    assert len(data.test_samples) == 4 and not set(data.support_paths) & {s.image_path for s in data.test_samples}


def test_masks_stay_aligned_under_flips_and_rotation(mvtec_root: Path) -> None:
    """After the paired augmentation, the defect pixels still cover the same image content (same pixel values)."""
    data = MVTecDataModule(
        root=str(mvtec_root), category="bottle", k_shot=1, image_size=64, eval_size=64,
        augment=AugmentSpec(hflip_p=1.0, vflip_p=1.0),
    )  # fmt: skip
    data.setup()
    sample = next(s for s in data.test_samples if s.mask_path)
    image, mask = load_rgb(sample.image_path), load_mask(sample.mask_path)
    transform = data.make_transform(data.augment)
    out = transform.augment(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask[::-1, ::-1])
    assert np.array_equal(np.sort(out["image"][out["mask"] == 1], axis=0), np.sort(image[mask == 1], axis=0))
    tensor_image, tensor_mask = transform(image, mask)
    assert tensor_mask.sum() > 0 and tensor_mask.shape == (64, 64) and tensor_image.shape == (3, 64, 64)


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_same_support_in_two_processes(tmp_path: Path) -> None:
    """Each process lists the files in a different order; the picks depend only on (seed, sorted names, k)."""
    root = make_mvtec(tmp_path / "m", "widget", n_train=12)
    code = (
        "import sys, os; from fsad.datamodules.kshot import sample_support;"
        f"names = os.listdir({str(root / 'widget/train/good')!r});"
        "names = names[::-1] if sys.argv[2] == 'reverse' else names;"
        "print(sample_support(names, 3, int(sys.argv[1])))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def support(seed: int, order: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", code, str(seed), order], env=env, capture_output=True, text=True, check=True
        ).stdout

    assert support(7, "listed") == support(7, "reverse")
    data = MVTecDataModule(root=str(root), category="widget", k_shot=3, seed=7)
    data.setup()
    assert support(7, "listed").strip() == str([Path(p).name for p in data.support_paths])
    other = MVTecDataModule(root=str(root), category="widget", k_shot=3, seed=8)
    other.setup()
    assert other.support_paths != data.support_paths


def test_support_files_are_honoured(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", "widget", n_train=6)
    data = MVTecDataModule(root=str(root), category="widget", support_files=["004.png", "001.png"])
    data.setup()
    assert [Path(p).name for p in data.support_paths] == ["004.png", "001.png"]
    with pytest.raises(ValueError, match=r"data\.support_files: \['999\.png'\]"):
        MVTecDataModule(root=str(root), category="widget", support_files=["999.png"]).setup()


def test_augmentations_differ_across_workers(tmp_path: Path) -> None:
    """albumentations 2.0.8 repeats random draws across workers unless each worker's pipeline is reseeded."""
    root = make_mvtec(tmp_path / "m", "widget", n_train=8)
    data = MVTecDataModule(
        root=str(root), category="widget", k_shot=8, image_size=16, eval_size=16, num_workers=2,
        augment=AugmentSpec(color_jitter_p=1.0, brightness=0.5, contrast=0.5, rotate_p=1.0, rotate_limit=45),
    )  # fmt: skip
    data.setup()
    dataset = data.train_dataloader().dataset
    dataset.samples = [dataset.samples[0]] * 8  # the same image everywhere: only augmentation can differ
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, collate_fn=data.train_dataloader().collate_fn,
        worker_init_fn=data.train_dataloader().worker_init_fn,
    )  # fmt: skip
    images = [b.image for b in loader]  # workers alternate: items 0,2,4,6 from worker 0 and 1,3,5,7 from worker 1
    for first, second in zip(images[0::2], images[1::2], strict=True):
        assert not torch.allclose(first, second)


# ----------------------------------------------------------------------------- bad input
def test_missing_root_and_category_list_what_exists(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        MVTecDataModule(root=str(tmp_path / "absent"), category="bottle").setup()
    root = make_mvtec(tmp_path / "m", "widget")
    with pytest.raises(DataError, match=r"data\.category: 'bottle' not found .* categories found: \['widget'\]"):
        MVTecDataModule(root=str(root), category="bottle").setup()


@pytest.mark.parametrize("k", [-1, 6])
def test_bad_k_shot_gives_both_numbers(tmp_path: Path, k: int) -> None:
    """k = 0 is zero-shot (no support set, tests/unit/test_winclip.py); below 0 or above the pool is an error."""
    root = make_mvtec(tmp_path / "m", "widget", n_train=5)
    message = "0 \\(zero-shot\\) or a positive" if k < 0 else "k_shot=6 exceeds the 5 normal"
    with pytest.raises(ValueError, match=message):
        MVTecDataModule(root=str(root), category="widget", k_shot=k).setup()


def test_corrupt_image_is_named_or_skipped(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", "widget")
    corrupt = root / "widget" / "test" / "good" / "000.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    data = MVTecDataModule(root=str(root), category="widget", k_shot=2, image_size=16, eval_size=16)
    with pytest.raises(DataError, match=str(corrupt)):
        all_batches(data.test_dataloader())
    skipping = MVTecDataModule(root=str(root), category="widget", k_shot=2, skip_bad_files=True)
    with pytest.warns(UserWarning, match="skipping unreadable file"):
        skipping.setup()
    assert len(skipping.test_samples) == 2


def test_missing_or_mismatched_mask_names_both_files(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", "widget")
    mask = root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    write_mask(mask, (30, 40), (0, 0, 5, 5))
    data = MVTecDataModule(root=str(root), category="widget", k_shot=2, image_size=16, eval_size=16)
    with pytest.raises(DataError, match=rf"mask {mask} is 30x40 but image .*crack/001.png is 40x40"):
        all_batches(data.test_dataloader())
    mask.unlink()
    with pytest.raises(DataError, match=r"mask missing for defect image .*crack/001\.png: expected .*001_mask\.png"):
        MVTecDataModule(root=str(root), category="widget").setup()


def test_data_check_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fsad.cli import main

    root = make_mvtec(tmp_path / "m", "widget")
    shutil.copytree(root / "widget", root / "gadget")
    (root / "widget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    (root / "gadget" / "train" / "good" / "001.png").write_bytes(b"not an image")
    assert main(["data", "check", "--dataset", "mvtec", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 categories found: gadget, widget" in out
    assert "mask missing for defect image" in out and "crack/000.png" in out
    assert "cannot read image" in out and "gadget/train/good/001.png" in out
    assert "2 problem(s) in 2 categories" in out


def test_antialiased_resize_does_not_alias_fine_stripes() -> None:
    """Stripes of period 3 px downscaled 4×: a low-pass resize gives flat grey, a plain bicubic gives moiré."""
    columns = (np.arange(960) % 3 == 0).astype(np.uint8) * 255
    stripes = np.repeat(np.repeat(columns[None, :, None], 960, axis=0), 3, axis=2)
    resized = resize_image(stripes, 240, "antialias")
    assert abs(float(resized.mean()) - float(stripes.mean())) < 1.0
    assert float(resized[..., 0].std()) < 3.0
    aliased = cv2.resize(stripes, (240, 240), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    assert float(aliased[..., 0].std()) > 30.0  # the control: the previous resize aliases


def test_antialiased_resize_matches_pil_bicubic_on_a_real_image(mvtec_root: Path) -> None:
    """PIL's bicubic (anti-aliased when downscaling) is the independent reference, up to its fixed-point arithmetic."""
    path = next(iter(sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))))
    image = load_rgb(path)
    ours = resize_image(image, 240, "antialias")
    pil = np.asarray(Image.fromarray(image).resize((240, 240), Image.BICUBIC)).astype(np.float32)
    difference = np.abs(ours - pil)
    assert difference.mean() < 0.3 and difference.max() <= 4.0


def test_authors_resize_is_cv2_bilinear_1024_then_pil_bicubic(mvtec_root: Path) -> None:
    path = next(iter(sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))))
    image = load_rgb(path)
    by_hand = Image.fromarray(cv2.resize(image, (1024, 1024), interpolation=cv2.INTER_LINEAR)).resize((240, 240), 3)
    assert np.array_equal(resize_image(image, 240, "authors"), np.asarray(by_hand).astype(np.float32))
    with pytest.raises(DataError, match="data.resize"):
        resize_image(image, 240, "nearest")


@pytest.mark.parametrize("layout", ["nested", "side_by_side"])
def test_realiad_both_json_layouts_and_the_datasets_own_mask_rules(tmp_path: Path, layout: str) -> None:
    root = make_realiad(tmp_path / "realiad", layout=layout, quirks=True)
    if layout == "side_by_side":
        assert (root / "realiad_jsons/audiojack.json").is_file() and (
            root / "realiad_jsons_sv/audiojack.json"
        ).is_file()
    data = RealIADDataModule(root=str(root), category="audiojack", k_shot=2, resolution=256, image_size=32)
    data.setup()
    assert data.available_categories() == ["audiojack"]
    # the NG view with a null mask_path is a normal test image; the all-zero mask keeps its NG label
    assert len(data.test_samples) == 20 and sum(s.label for s in data.test_samples) == 9
    null_view = next(s for s in data.test_samples if "0004_NG_AK_C3" in Path(s.image_path).name)
    assert null_view.label == 0 and data.notes == {"ng_without_mask": 1}
    single = RealIADDataModule(root=str(root), category="audiojack", k_shot=1, resolution=256, single_view=True)
    single.setup()
    assert len(single.normal_pool) == 2 and len(single.test_samples) == 4


def test_realiad_data_check_takes_views_and_counts_empty_and_null_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fsad.data_check import main

    root = make_realiad(tmp_path / "realiad", layout="side_by_side", quirks=True)
    check = ["check", "--dataset", "realiad", "--root", str(root), "--resolution", "256", "--k-shot", "1"]
    assert main(check) == 0  # neither quirk is a problem in Real-IAD
    out = capsys.readouterr().out
    assert "0 problem(s)" in out
    assert "1 NG test entries without mask_path" in out and "1 empty NG masks" in out
    assert main([*check, "--views", "C1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("audiojack"))
    assert row.split()[1:6] == ["2", "2", "2", "2", "1"]  # train, test ok, defect, masks, support: camera 1 only
    assert main([*check, "--single-view"]) == 0
    assert "0 NG test entries without mask_path" in capsys.readouterr().out
