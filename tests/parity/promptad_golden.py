"""Golden outputs of the authors' PromptAD code (FuNz-0/PromptAD), stage by stage, for fsad's ``variant: code``.

Runs *their* code, from a checkout the user points at, on the ``fsad-parity`` architecture (12 blocks, so their
hooks on blocks 3 and 8 behave as on ViT-B-16-plus-240) with weights filled by name (:mod:`tests.parity.weights`),
on three real MVTec-AD bottle test images and two support shots. It calls their ``PromptAD`` model, their dataset
class, their transforms and their ``fit`` loops of ``train_seg.py`` and ``train_cls.py``, and records what their
methods return. Only numbers are written. Three adjustments are made to run it here, none of which changes what is
computed:

* ``create_model_and_transforms`` is replaced by a call of their own ``create_model`` without a download, followed
  by :func:`fill_by_name`; ``fsad-parity`` is added to their list of valid backbones;
* their ``PromptAD.__init__`` hard-codes fp16; the fixtures are the fp32 computation, so the prompt learner is
  rebuilt with their own class at ``pre='fp32'`` and the model cast with ``.float()``;
* their fp32 training branch reads ``model.model.logit_scalef`` (a typo that only fp16 runs never hit); that name
  is pointed at ``logit_scale``.

``fp16.npz`` holds their own fp16 computation, unchanged (their factory's mixed precision: low-precision linear,
convolution and attention weights, LayerNorms in fp32): the backbone outputs for the same test tensors, the raw
text features at their initial fp16 contexts, and their fp16 scoring (maps and image scores) at those contexts. ``fp16_train.npz`` holds their fp16 segmentation ``fit`` at their own
lr 0.002: the fp16 contexts before training and after every optimiser step, and each step's gradients.

Usage (needs the authors' requirements: loguru, scikit-image, matplotlib, seaborn, pandas)::

    python tests/parity/make_golden.py promptad --authors /path/to/PromptAD --data /path/to/mvtec_ad
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tests.parity.weights import fill_by_name

HERE = Path(__file__).resolve().parent
ARCH_CONFIG = HERE.parent / "fixtures" / "parity" / "fsad-parity.json"
ARCH = "fsad-parity"
IMAGE_SIZE = 96
EVAL_SIZE = 128
EPOCHS = 3
#: Larger than the authors' 0.002 so that three epochs move the contexts far beyond the test tolerance.
LEARNING_RATE = 0.5
#: fp16 training runs at the authors' own lr: there, fp16 rounding decides which context updates survive.
FP16_LEARNING_RATE = 0.002
WEIGHT_SEED = 0
AUTHORS_SEED = 111
SUPPORT = ["bottle/train/good/000.png", "bottle/train/good/001.png"]
TEST = ["bottle/test/good/000.png", "bottle/test/broken_large/000.png", "bottle/test/contamination/000.png"]


def mask_of(relative: str) -> str | None:
    """MVTec's ground-truth file of a test image, or None for a good one."""
    parts = relative.split("/")
    if parts[-2] == "good":
        return None
    return "/".join([parts[0], "ground_truth", parts[-2], parts[-1].replace(".png", "_mask.png")])


def import_authors(repo: Path):
    """Their modules use top-level imports (``from datasets import *``), so their folder goes on ``sys.path``."""
    sys.path.insert(0, str(repo))
    import datasets as authors_datasets  # noqa: PLC0415
    import train_cls  # noqa: PLC0415
    import train_seg  # noqa: PLC0415
    from PromptAD import CLIPAD  # noqa: PLC0415
    from PromptAD import model as authors_model  # noqa: PLC0415

    return authors_datasets, authors_model, CLIPAD, train_seg, train_cls


def use_name_filled_weights(authors_model, clipad, arch: str, precision: str, seed: int = WEIGHT_SEED) -> None:
    """Their model factory without a download: their ``create_model`` at ``precision`` (whatever their call asks
    for), then :func:`fill_by_name` from ``seed``; ``arch`` joins their list of valid backbones."""

    def create_without_download(model_name, pretrained=None, **_):
        model = clipad.create_model(model_name, pretrained=None, precision=precision)
        fill_by_name(model, seed)
        return model, None, None

    clipad.create_model_and_transforms = create_without_download
    if arch not in authors_model.valid_backbones:
        authors_model.valid_backbones.append(arch)


def build_authors_model(authors_model, clipad, n_pro: int, precision: str = "fp32"):
    """Their ``PromptAD`` on ``fsad-parity`` with name-filled weights, as fp32 (see the module docstring) or, with
    ``precision="fp16"``, exactly as they build it."""

    use_name_filled_weights(authors_model, clipad, ARCH, precision)
    kwargs = dict(
        out_size_h=EVAL_SIZE, out_size_w=EVAL_SIZE, device="cpu", backbone=ARCH, pretrained_dataset="laion400m_e32",
        n_ctx=4, n_pro=n_pro, n_ctx_ab=1, n_pro_ab=4, class_name="bottle", k_shot=len(SUPPORT),
        img_resize=IMAGE_SIZE, img_cropsize=IMAGE_SIZE,
    )  # fmt: skip
    model = authors_model.PromptAD(**kwargs)
    if precision == "fp16":  # their default: nothing to adjust
        return model
    model.precision = "fp32"
    model.prompt_learner = authors_model.PromptLearner(4, n_pro, 1, 4, "bottle", model.model, "fp32")
    model.float()
    model.model.logit_scalef = model.model.logit_scale
    return model


def authors_model_and_data(modules, data_root: Path, n_pro: int, precision: str = "fp32"):
    """Their ``PromptAD`` (built right after their ``setup_seed``, as their scripts do) and their dataset's train and
    test ``(loader, dataset)`` pairs over the golden shots and test images."""
    authors_datasets, authors_model, clipad, train_seg, _ = modules
    authors_datasets.load_function_dict["golden"] = golden_split(data_root)
    train_seg.setup_seed(AUTHORS_SEED)
    model = build_authors_model(authors_model, clipad, n_pro=n_pro, precision=precision)
    loader_kwargs = dict(dataset="golden", class_name="bottle", k_shot=len(SUPPORT), batch_size=len(TEST))
    train = authors_datasets.get_dataloader_from_args(phase="train", **loader_kwargs)
    test = authors_datasets.get_dataloader_from_args(phase="test", **loader_kwargs)
    return model, train, test


def record_calls(model, names: list[str], store: dict[str, list]) -> None:
    """Wrap methods of one instance so that every return value is kept (the last epoch's is what we compare)."""
    for name in names:
        original = getattr(model, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            store.setdefault(_name, []).append(out)
            return out

        setattr(model, name, wrapper)


def as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy().copy()
    return np.asarray(value, dtype=np.float32)


def authors_text_features(model) -> dict[str, np.ndarray]:
    """Raw text features of the fixed and learnable prompts at the current contexts (their encode path)."""
    with torch.no_grad():
        normal, handcrafted, learned = model.prompt_learner()
        return {
            "raw_normal": as_array(model.encode_text_embedding(normal, model.tokenized_normal_prompts)),
            "raw_handcrafted": as_array(
                model.encode_text_embedding(handcrafted, model.tokenized_abnormal_prompts_handle)
            ),
            "raw_learnable": as_array(model.encode_text_embedding(learned, model.tokenized_abnormal_prompts_learned)),
        }


def golden_split(data_root: Path):
    """A loader for their ``load_function_dict``: the golden support shots and test images (with masks) in their
    (paths, masks, labels, types) format."""

    def load_golden(category, k_shot):
        train = ([str(data_root / p) for p in SUPPORT], [0] * len(SUPPORT), [0] * len(SUPPORT), ["good"] * len(SUPPORT))
        masks = [str(data_root / m) if (m := mask_of(p)) else 0 for p in TEST]
        test = (
            [str(data_root / p) for p in TEST],
            masks,
            [int(m != 0) for m in masks],
            [p.split("/")[-2] for p in TEST],
        )
        return train, test

    return load_golden


def authors_commit(repo: Path) -> str:
    """The checkout's commit, or an empty string when it is not a git checkout."""
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def run_task(task: str, data_root: Path, modules, workdir: Path) -> dict[str, np.ndarray]:
    """One of the authors' two models (``seg``: maps, ``cls``: image score) through their own ``fit``."""
    _, _, _, train_seg, train_cls = modules
    from PIL import Image  # noqa: PLC0415

    model, (train_loader, train_set), (test_loader, test_set) = authors_model_and_data(
        modules, data_root, n_pro=1 if task == "seg" else 3
    )

    out: dict[str, np.ndarray] = {
        "initial_normal_context": as_array(model.prompt_learner.normal_ctx),
        "initial_abnormal_context": as_array(model.prompt_learner.abnormal_ctx),
    }
    out.update({f"initial_{k}": v for k, v in authors_text_features(model).items()})
    # their preprocessing: support shots BGR→RGB before the transform, test images fed as read (BGR)
    import cv2  # noqa: PLC0415

    support = [
        model.transform(Image.fromarray(cv2.cvtColor(train_set[i][0], cv2.COLOR_BGR2RGB))) for i in range(len(SUPPORT))
    ]
    test = [model.transform(Image.fromarray(test_set[i][0])) for i in range(len(TEST))]
    out["support_images"] = as_array(torch.stack(support))
    out["test_images"] = as_array(torch.stack(test))
    out["test_masks"] = np.stack(
        [cv2.resize(test_set[i][1].astype(np.uint8), (EVAL_SIZE, EVAL_SIZE), interpolation=cv2.INTER_NEAREST) > 0
         for i in range(len(TEST))]
    ).astype(np.uint8)  # fmt: skip
    with torch.no_grad():
        cls, vv, tap3, tap8 = model.encode_image(torch.stack(test))
    out.update(test_cls=as_array(cls), test_vv=as_array(vv), test_tap3=as_array(tap3), test_tap8=as_array(tap8))

    calls: dict[str, list] = {}
    record_calls(model, ["calculate_textual_anomaly_score", "calculate_visual_anomaly_score", "forward"], calls)
    args = argparse.Namespace(
        lr=LEARNING_RATE,
        momentum=0.9,
        weight_decay=0.0005,
        Epoch=EPOCHS,
        lambda1=0.001,
        resolution=EVAL_SIZE,
        vis=False,
    )
    if task == "seg":
        result = train_seg.fit(model, args, test_loader, "cpu", img_dir=str(workdir), check_path=str(workdir / "s.pt"),
                               train_data=train_loader)  # fmt: skip
        out["textual_grid"] = as_array(calls["calculate_textual_anomaly_score"][-1])[:, 0]
        out["visual_grid"] = as_array(calls["calculate_visual_anomaly_score"][-1])[:, 0]
        out["anomaly_map"] = np.stack(calls["forward"][-1]).astype(np.float32)
        out["best_pixel_auroc"] = np.float32(result["p_roc"])
    else:
        result = train_cls.fit(
            model, args, test_loader, "cpu", check_path=str(workdir / "c.pt"), train_data=train_loader
        )
        text_score = as_array(calls["calculate_textual_anomaly_score"][-1])
        visual_maps = np.stack(calls["forward"][-1][1]).astype(np.float32)
        visual_max = visual_maps.reshape(len(TEST), -1).max(axis=1)
        out["image_text_score"] = text_score
        out["image_visual_max"] = visual_max
        # utils/metrics.py::metric_cal_img: 1 / (1/max(upsampled M_v) + 1/text score)
        out["image_score"] = (1.0 / (1.0 / visual_max + 1.0 / text_score)).astype(np.float32)
        out["best_image_auroc"] = np.float32(result["i_roc"])
    out["final_normal_context"] = as_array(model.prompt_learner.normal_ctx)
    out["final_abnormal_context"] = as_array(model.prompt_learner.abnormal_ctx)
    out["final_text_features"] = as_array(model.text_features)
    return out


def run_fp16(modules, test_images: np.ndarray, support_images: np.ndarray) -> dict[str, np.ndarray]:
    """Their fp16 models as shipped: backbone outputs of the fp32 run's test tensors and initial text features; then,
    at those initial contexts and with their galleries built from the fp32 run's support tensors, their fp16 scoring:
    the segmentation model's text and visual grids and its anomaly map (``forward(..., 'seg')``), and the
    classification model's (three normal context sets) text score and image score (``forward(..., 'cls')``)."""
    _, authors_model, clipad, train_seg, _ = modules
    train_seg.setup_seed(AUTHORS_SEED)
    model = build_authors_model(authors_model, clipad, n_pro=1, precision="fp16")
    test, support = torch.from_numpy(test_images), torch.from_numpy(support_images)
    with torch.no_grad():
        cls, vv, tap3, tap8 = model.encode_image(test)
    out = dict(test_cls=as_array(cls), test_vv=as_array(vv), test_tap3=as_array(tap3), test_tap8=as_array(tap8))
    out["initial_normal_context"] = as_array(model.prompt_learner.normal_ctx)
    out["initial_abnormal_context"] = as_array(model.prompt_learner.abnormal_ctx)
    out.update({f"initial_{k}": v for k, v in authors_text_features(model).items()})

    def build_galleries(authors) -> None:  # what their fit does before testing: support gallery, text prototypes
        with torch.no_grad():
            _, _, support3, support8 = authors.encode_image(support)
            authors.build_image_feature_gallery(support3, support8)
            authors.build_text_feature_gallery()

    calls: dict[str, list] = {}
    record_calls(model, ["calculate_textual_anomaly_score", "calculate_visual_anomaly_score"], calls)
    build_galleries(model)
    with torch.no_grad():
        maps = model(test, "seg")
    out["scoring_textual_grid"] = as_array(calls["calculate_textual_anomaly_score"][-1])[:, 0]
    out["scoring_visual_grid"] = as_array(calls["calculate_visual_anomaly_score"][-1])[:, 0]
    out["scoring_anomaly_map"] = np.stack(maps).astype(np.float32)
    train_seg.setup_seed(AUTHORS_SEED)
    cls_model = build_authors_model(authors_model, clipad, n_pro=3, precision="fp16")
    out["cls_initial_normal_context"] = as_array(cls_model.prompt_learner.normal_ctx)
    out["cls_initial_abnormal_context"] = as_array(cls_model.prompt_learner.abnormal_ctx)
    build_galleries(cls_model)
    with torch.no_grad():
        text_scores, visual_maps = cls_model(test, "cls")
    text_score = np.asarray(text_scores)  # their fp16 softmax, as numpy returns it
    visual_max = np.stack(visual_maps).reshape(len(TEST), -1).max(axis=1)
    out["scoring_image_text_score"] = text_score.astype(np.float32)
    # utils/metrics.py::metric_cal_img, on their arrays as their test returns them
    out["scoring_image_score"] = (1.0 / (1.0 / visual_max + 1.0 / text_score)).astype(np.float32)
    return out


def run_fp16_training(data_root: Path, modules, workdir: Path) -> dict[str, np.ndarray]:
    """Their segmentation ``fit`` on their fp16 model as shipped, at their own lr 0.002 (where fp16 rounding decides
    which updates survive): their prompt learner holds fp16 contexts and their SGD updates them in fp16. Recorded:
    the contexts before training and after every optimiser step, and each step's gradients."""
    train_seg = modules[3]
    model, (train_loader, _), (test_loader, _) = authors_model_and_data(modules, data_root, n_pro=1, precision="fp16")
    learner = model.prompt_learner
    out: dict[str, np.ndarray] = {
        "initial_normal_context": as_array(learner.normal_ctx),
        "initial_abnormal_context": as_array(learner.abnormal_ctx),
        "context_dtype": np.array(str(learner.normal_ctx.dtype)),
    }
    contexts = {"normal": learner.normal_ctx, "abnormal": learner.abnormal_ctx}
    steps: dict[str, list[np.ndarray]] = {
        f"step_{kind}_{what}": [] for kind in contexts for what in ("context", "gradient")
    }
    step = torch.optim.SGD.step

    def recording_step(optimizer, *args, **kwargs):
        for kind, context in contexts.items():
            steps[f"step_{kind}_gradient"].append(as_array(context.grad))
        result = step(optimizer, *args, **kwargs)
        for kind, context in contexts.items():
            steps[f"step_{kind}_context"].append(as_array(context))
        return result

    args = argparse.Namespace(lr=FP16_LEARNING_RATE, momentum=0.9, weight_decay=0.0005, Epoch=EPOCHS, lambda1=0.001,
                              resolution=EVAL_SIZE, vis=False)  # fmt: skip
    torch.optim.SGD.step = recording_step
    try:
        train_seg.fit(model, args, test_loader, "cpu", img_dir=str(workdir), check_path=str(workdir / "h.pt"),
                      train_data=train_loader)  # fmt: skip
    finally:
        torch.optim.SGD.step = step
    out.update({name: np.stack(values) for name, values in steps.items()})
    return out


def generate(authors_repo: Path, data_root: Path, out_dir: Path) -> None:
    """Write ``seg.npz``, ``cls.npz``, ``fp16.npz``, ``fp16_train.npz`` and ``meta.json`` for the PromptAD parity tests."""
    authors_repo, data_root = authors_repo.resolve(), data_root.resolve()
    modules = import_authors(authors_repo)
    modules[2].add_model_config(ARCH_CONFIG)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("seg", "cls"):
            np.savez_compressed(out_dir / f"{task}.npz", **run_task(task, data_root, modules, Path(tmp)))
    with np.load(out_dir / "seg.npz") as seg:
        np.savez_compressed(out_dir / "fp16.npz", **run_fp16(modules, seg["test_images"], seg["support_images"]))
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(out_dir / "fp16_train.npz", **run_fp16_training(data_root, modules, Path(tmp)))
    commit = authors_commit(authors_repo)
    meta = {
        "authors_repository": "FuNz-0/PromptAD",
        "authors_commit": commit or "unknown (not a git checkout)",
        "arch": ARCH, "image_size": IMAGE_SIZE, "eval_size": EVAL_SIZE, "epochs": EPOCHS, "lr": LEARNING_RATE,
        "fp16_lr": FP16_LEARNING_RATE, "weight_seed": WEIGHT_SEED, "authors_seed": AUTHORS_SEED, "support": SUPPORT, "test": TEST,
        "precision": "fp32", "torch": torch.__version__,
    }  # fmt: skip
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
