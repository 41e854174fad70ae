"""Golden outputs of the authors' FineGrainedAD code (RetoFan233/FineGrainedAD), stage by stage, for ``variant: code``.

Runs *their* code from a checkout the user points at: their dataset class, their ``FineGrainedPatchAD`` (the
segmentation model of ``train_seg_finegrained_patch.py``) with their MVTec ``bottle`` record of
``fine_grained_normal_prompts_v3``, and the ``fit`` loop of ``train_seg_finegrained_patch.py``, on three real bottle
test images and two support shots. Wrapped methods record what their code returns; only numbers and the prompt
strings their code built are written.

The architecture is ``fsad-parity-240`` (``fixtures/parity/fsad-parity-240.json``): the ``fsad-parity`` tower at
240 px, because their region aggregation hard-codes 240-px slices of a 960-px image, a 15×15 grid and a 60×60 label
map; 12 vision blocks, so their V-V surgery (``layers == 12``) and their hooks on blocks 3 and 8 behave as on
ViT-B-16-plus-240. Four adjustments let it run here; none changes what is computed:

* ``create_model_and_transforms`` is replaced by their own ``create_model`` without a download, followed by
  :func:`fill_by_name`; ``fsad-parity-240`` is added to their list of valid backbones;
* ``precision='fp32'`` is passed to their model (their default is bf16/fp16; the fp32 branch is their own code);
* ``torch.Tensor.cuda`` is a no-op during the run (``fit`` builds its region weights with ``.cuda()``);
* the learning rate is 0.5 instead of 0.002 and three epochs run, so the contexts and Attr-MoE weights move far
  beyond the test tolerance.

Other categories (``--category``) run the same segmentation ``fit`` on their record and write
``<category>/seg.npz`` and ``<category>/meta.json``: ``hazelnut`` on real images of the ``hazelnut_toy`` set
(``--data`` its root), ``transistor`` (four components, multi-valued attributes) on images :func:`draw_transistor`
paints in MVTec layout.

Usage (needs the authors' requirements: loguru, scikit-image, matplotlib, seaborn, pandas)::

    python tests/parity/make_golden.py finegrainedad --authors /path/to/FineGrainedAD --data /path/to/mvtec_ad
    python tests/parity/make_golden.py finegrainedad --authors ... --category hazelnut --data /path/to/hazelnut_toy
    python tests/parity/make_golden.py finegrainedad --authors ... --category transistor
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.parity.promptad_golden import (  # the same shots, images, seeds and schedule as the PromptAD fixtures
    AUTHORS_SEED,
    EPOCHS,
    EVAL_SIZE,
    LEARNING_RATE,
    SUPPORT,
    TEST,
    WEIGHT_SEED,
    as_array,
    authors_commit,
    mask_of,
    record_calls,
    use_name_filled_weights,
)

HERE = Path(__file__).resolve().parent
ARCH_CONFIG = HERE.parent / "fixtures" / "parity" / "fsad-parity-240.json"
ARCH = "fsad-parity-240"
IMAGE_SIZE = 240
#: Their prompt learner's attribute-weight parameters (the Attr-MoE scalars, squashed by a sigmoid in ``forward``).
ATTRIBUTE_WEIGHTS = [
    f"{side}_{kind}_w" for side in ("normal", "abnormal") for kind in ("relation", "color", "texture", "shape")
]
#: Tokenized prompt sets stored on their prompt learner, by the level/kind names we store them under.
TOKENIZED = {
    "image/normal": "tokenized_normal_prompts",
    "image/handcrafted": "tokenized_abnormal_prompts_handle",
    "image/learnable": "tokenized_abnormal_prompts_learned",
    "background/normal": "tokenized_normal_background_prompts",
    "background/handcrafted": "tokenized_abnormal_background_prompts_handle",
    "background/learnable": "tokenized_abnormal_background_prompts_learned",
}


@dataclass(frozen=True)
class GoldenCategory:
    """One category's golden run: their record's name, the support shots and test images (paths under the data
    root), each test image's mask (``None``: a good image) and the seed of the name-filled weights."""

    name: str
    support: list[str]
    test: list[str]
    masks: list[str | None]
    weight_seed: int = WEIGHT_SEED


CATEGORIES = {
    "bottle": GoldenCategory("bottle", SUPPORT, TEST, [mask_of(p) for p in TEST]),
    # real images of the hazelnut_toy set (its own layout: no category folder, masks named like their images)
    "hazelnut": GoldenCategory(
        "hazelnut",
        ["train/good/00.jpg", "train/good/02.jpg"],
        ["test/good/04.jpg", "test/colour/00.jpg", "test/colour/01.jpg"],
        [None, "ground_truth/colour/00.png", "ground_truth/colour/01.png"],
    ),  # fmt: skip
    # painted by draw_transistor in MVTec layout; weight seed 1: its four components claim three different clusters
    # (with seed 0 all five levels claim one, and every level's region weights would be alike)
    "transistor": GoldenCategory(
        "transistor",
        ["transistor/train/good/000.png", "transistor/train/good/001.png"],
        ["transistor/test/good/000.png", "transistor/test/bent_lead/000.png", "transistor/test/misplaced/000.png"],
        [None, "transistor/ground_truth/bent_lead/000_mask.png", "transistor/ground_truth/misplaced/000_mask.png"],
        weight_seed=1,
    ),  # fmt: skip
}


def draw_transistor(root: Path, size: int = 256) -> Path:
    """Paint the ``transistor`` golden images under ``root`` in MVTec layout and return ``root``: a brown board
    with a grid of dark brown holes, a black rectangular body, three silver legs running down into holes (what
    their record describes); defects: a bent lead, a body moved off centre. Seeded pixel noise makes the two
    shots differ; the same call paints the same files."""
    import cv2  # noqa: PLC0415

    board, hole, body, leg = (40, 75, 120), (20, 35, 60), (15, 15, 15), (190, 190, 195)  # BGR

    def paint(seed: int, body_x: int = 128, bend: bool = False) -> tuple[np.ndarray, np.ndarray]:
        image = np.full((size, size, 3), board, np.uint8)
        for y in range(16, size, 32):
            for x in range(16, size, 32):
                cv2.circle(image, (x, y), 6, hole, -1)
        before = image.copy()
        cv2.rectangle(image, (body_x - 40, 60), (body_x + 40, 130), body, -1)
        for i, x in enumerate((body_x - 24, body_x, body_x + 24)):
            end = (x + 40, 150) if bend and i == 2 else (x, 208)
            cv2.line(image, (x, 130), end, leg, 6)
        noise = np.random.default_rng(seed).integers(-6, 7, image.shape)
        image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
        return image, before

    files = {"train/good/000.png": paint(0)[0], "train/good/001.png": paint(1)[0], "test/good/000.png": paint(2)[0]}
    reference = paint(3)[0]
    for defect, kwargs in (("bent_lead", {"bend": True}), ("misplaced", {"body_x": 150})):
        image = paint(3, **kwargs)[0]
        files[f"test/{defect}/000.png"] = image
        mask = (np.abs(image.astype(int) - reference.astype(int)).max(axis=2) > 40).astype(np.uint8) * 255
        files[f"ground_truth/{defect}/000_mask.png"] = mask
    for relative, pixels in files.items():
        path = root / "transistor" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), pixels)
    return root


def category_split(data_root: Path, category: GoldenCategory):
    """A loader for their ``load_function_dict``: the category's support shots and test images (with masks) in
    their (paths, masks, labels, types) format."""

    def load_golden(_name, _k_shot):
        support = category.support
        train = ([str(data_root / p) for p in support], [0] * len(support), [0] * len(support), ["good"] * len(support))
        masks = [str(data_root / m) if m else 0 for m in category.masks]
        test = ([str(data_root / p) for p in category.test], masks, [int(m != 0) for m in masks],
                [p.split("/")[-2] for p in category.test])  # fmt: skip
        return train, test

    return load_golden


def import_authors(repo: Path):
    """Their modules use top-level imports (``from datasets import *``), so their folder goes on ``sys.path``."""
    sys.path.insert(0, str(repo))
    import datasets as authors_datasets  # noqa: PLC0415
    import train_seg_finegrained_patch as train_seg  # noqa: PLC0415
    from PromptAD import CLIPAD  # noqa: PLC0415
    from PromptAD import model as authors_model  # noqa: PLC0415

    return authors_datasets, authors_model, CLIPAD, train_seg


def level_features(model) -> dict[str, np.ndarray]:
    """Raw text features of every level's normal, handcrafted-abnormal and learnable-abnormal prompts (their encode
    path, ``encode_text_embedding``) at the current contexts and Attr-MoE weights."""
    learner = model.prompt_learner
    with torch.no_grad():
        (normal, handle, learned, entity_normal, entity_handle, entity_learned, background_normal, background_handle,
         background_learned) = learner()  # fmt: skip
        out = {
            "image/normal": model.encode_text_embedding(normal, model.tokenized_normal_prompts),
            "image/handcrafted": model.encode_text_embedding(handle, model.tokenized_abnormal_prompts_handle),
            "image/learnable": model.encode_text_embedding(learned, model.tokenized_abnormal_prompts_learned),
            "background/normal": model.encode_text_embedding(background_normal, model.tokenized_normal_background_prompts),
            "background/handcrafted": model.encode_text_embedding(
                background_handle, model.tokenized_abnormal_background_prompts_handle),
            "background/learnable": model.encode_text_embedding(
                background_learned, model.tokenized_abnormal_background_prompts_learned),
        }  # fmt: skip
        for index in range(learner.num_entity):
            out[f"entity{index}/normal"] = model.encode_text_embedding(
                entity_normal[index], model.tokenized_normal_entity_prompts_list[index]
            )
            out[f"entity{index}/handcrafted"] = model.encode_text_embedding(
                entity_handle[index], model.tokenized_abnormal_entity_prompts_handle_list[index]
            )
            out[f"entity{index}/learnable"] = model.encode_text_embedding(
                entity_learned[index], model.tokenized_abnormal_entity_prompts_learned_list[index])  # fmt: skip
    return {key: as_array(value) for key, value in out.items()}


def learner_state(model, stage: str) -> dict[str, np.ndarray]:
    learner = model.prompt_learner
    out = {
        f"{stage}_normal_context": as_array(learner.normal_ctx),
        f"{stage}_abnormal_context": as_array(learner.abnormal_ctx),
    }
    for name in ATTRIBUTE_WEIGHTS:
        out[f"{stage}_{name}"] = as_array(getattr(learner, name))
    out.update({f"{stage}_text/{key}": value for key, value in level_features(model).items()})
    return out


def prompt_texts(tokenize_calls: list[str], learner, tokenize) -> dict[str, list[str]]:
    """The strings behind each tokenized prompt set of their learner: the run of recorded ``tokenize`` inputs whose
    tokens equal the stored tensor (their construction draws random states and locations; these are its result)."""
    tokens = [tokenize(text)[0] for text in tokenize_calls]
    stored = {key: getattr(learner, attribute) for key, attribute in TOKENIZED.items()}
    for index in range(learner.num_entity):
        stored[f"entity{index}/normal"] = learner.tokenized_normal_entity_prompts_list[index]
        stored[f"entity{index}/handcrafted"] = learner.tokenized_abnormal_entity_prompts_handle_list[index]
        stored[f"entity{index}/learnable"] = learner.tokenized_abnormal_entity_prompts_learned_list[index]
    texts, ends = {}, {}
    for key, tensor in stored.items():
        rows = tensor.shape[0]
        for start in range(len(tokens) - rows + 1):
            if all(torch.equal(tokens[start + row], tensor[row]) for row in range(rows)):
                texts[key], ends[key] = tokenize_calls[start : start + rows], start + rows
                break
        else:
            raise RuntimeError(f"no recorded prompt strings tokenize to {key}")
    # the Attr-MoE attribute prompts are not kept tokenized; their learner tokenizes them right after the component
    # prompts and before the background ones: n_pro normal, n_ab_<attribute>_handle·n_pro handcrafted, n_pro_ab·n_pro
    # learnable each, in the order relation, color, texture, shape
    start = ends[f"entity{learner.num_entity - 1}/learnable"]
    for attribute in ("relation", "color", "texture", "shape"):
        counts = {"normal": learner.n_pro, "handcrafted": getattr(learner, f"n_ab_{attribute}_handle") * learner.n_pro,
                  "learnable": learner.n_pro_ab * learner.n_pro}  # fmt: skip
        for kind, count in counts.items():
            texts[f"{attribute}/{kind}"] = tokenize_calls[start : start + count]
            start += count
    if tokenize_calls[start : start + learner.n_pro] != texts["background/normal"]:
        raise RuntimeError("attribute prompts are not where their learner tokenizes them")
    return texts


def build_authors_model(
    authors_model, clipad, n_pro: int = 1, precision: str = "fp32", category: GoldenCategory = CATEGORIES["bottle"]
):
    """Their ``FineGrainedPatchAD`` on ``fsad-parity-240`` with name-filled weights, in fp32 (module docstring) or,
    with ``precision="bf16"``, as their segmentation script runs it; ``n_pro`` 1 is their segmentation model, 3
    their classification model."""

    use_name_filled_weights(authors_model, clipad, ARCH, precision, category.weight_seed)
    return authors_model.FineGrainedPatchAD(
        out_size_h=EVAL_SIZE, out_size_w=EVAL_SIZE, device="cpu", backbone=ARCH, pretrained_dataset="laion400m_e32",
        n_ctx=4, n_pro=n_pro, n_ctx_ab=1, n_pro_ab=4, class_name=category.name, precision=precision,
        k_shot=len(category.support),
        img_resize=IMAGE_SIZE, img_cropsize=IMAGE_SIZE,
    )  # fmt: skip


def seeded_model_and_texts(modules, n_pro: int = 1, category: GoldenCategory = CATEGORIES["bottle"]):
    """Their model built right after their ``setup_seed`` (its prompt construction draws states and locations),
    with the prompt strings behind every tokenized set."""
    _, authors_model, clipad, train_seg = modules
    tokenize_calls: list[str] = []
    original_tokenize = clipad.tokenize

    def recording_tokenize(texts, *args, **kwargs):
        tokenize_calls.extend([texts] if isinstance(texts, str) else list(texts))
        return original_tokenize(texts, *args, **kwargs)

    authors_model.CLIPAD.tokenize = recording_tokenize
    try:
        train_seg.setup_seed(AUTHORS_SEED)
        model = build_authors_model(authors_model, clipad, n_pro, category=category)
    finally:
        authors_model.CLIPAD.tokenize = original_tokenize
    return model, prompt_texts(tokenize_calls, model.prompt_learner, original_tokenize)


def golden_loaders(authors_datasets, data_root: Path, category: GoldenCategory = CATEGORIES["bottle"]):
    """Their train and test loaders (and datasets) over the category's golden shots and test images."""
    authors_datasets.load_function_dict["golden"] = category_split(data_root, category)
    loader_kwargs = dict(dataset="golden", class_name=category.name, k_shot=len(category.support),
                         batch_size=len(category.test))  # fmt: skip
    return (*authors_datasets.get_dataloader_from_args(phase="train", **loader_kwargs),
            *authors_datasets.get_dataloader_from_args(phase="test", **loader_kwargs))  # fmt: skip


def training_args(category: str = "bottle"):
    """Their ``fit`` arguments: SGD momentum 0.9, weight decay 5e-4, λ 0.001, with the golden lr and epochs."""
    return argparse.Namespace(
        lr=LEARNING_RATE, momentum=0.9, weight_decay=0.0005, Epoch=EPOCHS, lambda1=0.001, resolution=EVAL_SIZE,
        vis=False, class_name=category, k_shot=len(SUPPORT), precision="fp32",
    )  # fmt: skip


def image_scores(model, test_images: np.ndarray) -> dict[str, np.ndarray]:
    """Their ``cls`` forward on the test tensors: the text score, the max of the upsampled visual map, and the image
    score of ``utils/metrics.py::metric_cal_img``, 1 / (1/max + 1/text score)."""
    with torch.no_grad():
        text_scores, visual_maps = model(torch.from_numpy(test_images), "cls")
    text_score = np.asarray(text_scores, dtype=np.float32)
    visual_max = np.stack(visual_maps).reshape(len(test_images), -1).max(axis=1).astype(np.float32)
    return {"image_text_score": text_score, "image_visual_max": visual_max,
            "image_score": (1.0 / (1.0 / visual_max + 1.0 / text_score)).astype(np.float32)}  # fmt: skip


def run_cls(data_root: Path, modules, test_images: np.ndarray, seg_texts: dict) -> dict[str, np.ndarray]:
    """Their classification model (``n_pro`` 3) through the ``fit`` of ``train_cls_finegrained_patch.py``: its
    parameters, text features and gradients, its loss at every step, its prototypes and queries, and the image
    scores its ``cls`` forward gives on the same test tensors."""
    authors_datasets, _, _, _ = modules
    sys.path.insert(0, str(Path(authors_datasets.__file__).resolve().parents[1]))
    import train_cls_finegrained_patch as train_cls  # noqa: PLC0415

    model, texts = seeded_model_and_texts(modules, n_pro=3)
    if any(list(dict.fromkeys(v)) != list(dict.fromkeys(seg_texts[k])) for k, v in texts.items()):  # each ×n_pro
        raise RuntimeError("the classification model drew other prompt strings than the segmentation model")
    train_loader, _, test_loader, _ = golden_loaders(authors_datasets, data_root)
    out = learner_state(model, "initial")
    out.update({f"query_former/{k}": as_array(v) for k, v in model.q_former.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp, recorded_training(model.prompt_learner, train_loader) as training:
        train_cls.fit(model, training_args(), test_loader, "cpu", check_path=str(Path(tmp) / "check_point.pt"),
                      train_data=train_loader)  # fmt: skip
    out.update(learner_state(model, "final"))
    out.update(training["first_step_gradients"])
    out["step_losses"] = np.asarray(training["step_losses"], dtype=np.float32)
    out["training_batches"] = np.array([[name.rsplit("-", 1)[1] for name in batch] for batch in training["shots"]])
    out["final_image_prototypes"] = as_array(model.text_features)
    out["final_background_prototypes"] = as_array(model.background_features)
    out["final_entity_prototypes"] = as_array(model.entity_features_list)
    out.update(image_scores(model, test_images))
    return out


def hook_last(module: torch.nn.Module, store: dict, name: str) -> None:
    """Keep the last input token dict of one of their clustering modules (``CTM``) and what it returned."""

    def before(_, inputs):
        token_dict = inputs[0]
        store[f"{name}_x"] = as_array(token_dict["x"])
        store[f"{name}_mask"] = None if token_dict["mask"] is None else as_array(token_dict["mask"])

    def after(_, __, output):
        store[f"{name}_idx_token"] = output[0]["idx_token"].numpy().astype(np.int64)

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


@contextmanager
def recorded_training(learner: torch.nn.Module, loader) -> Iterator[dict]:
    """While their ``fit`` runs: ``Tensor.cuda`` is a no-op, and the record keeps the file names of every batch
    ``loader`` yields, every step's loss, and ``learner``'s gradients at the first optimiser step (a sharper check
    than the parameters after the last epoch)."""
    record: dict = {"shots": [], "step_losses": [], "first_step_gradients": {}}
    originals = (torch.Tensor.cuda, torch.Tensor.backward, torch.optim.SGD.step, type(loader).__iter__)
    cuda, backward, step, iterate = originals

    def recording_iter(this):
        for batch in iterate(this):
            if this is loader:
                record["shots"].append(list(batch[3]))
            yield batch

    def recording_backward(loss, *args, **kwargs):
        record["step_losses"].append(float(loss.detach()))
        return backward(loss, *args, **kwargs)

    def recording_step(optimizer, *args, **kwargs):
        if not record["first_step_gradients"]:
            record["first_step_gradients"] = {
                f"first_step_gradient/{name}": as_array(parameter.grad)
                for name, parameter in learner.named_parameters() if parameter.grad is not None
            }  # fmt: skip
        return step(optimizer, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.backward, torch.optim.SGD.step, type(loader).__iter__ = (
        recording_backward,
        recording_step,
        recording_iter,
    )
    try:
        yield record
    finally:
        torch.Tensor.cuda, torch.Tensor.backward, torch.optim.SGD.step, type(loader).__iter__ = originals


def run(
    data_root: Path, modules, workdir: Path, category: GoldenCategory = CATEGORIES["bottle"]
) -> tuple[dict[str, np.ndarray], dict]:
    """Their segmentation model through their own ``fit``; returns the arrays and the facts for ``meta.json``."""
    authors_datasets, authors_model, clipad, train_seg = modules
    import cv2  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    model, texts = seeded_model_and_texts(modules, category=category)
    train_loader, train_set, test_loader, test_set = golden_loaders(authors_datasets, data_root, category)

    out: dict[str, np.ndarray] = learner_state(model, "initial")
    out.update({f"query_former/{k}": as_array(v) for k, v in model.q_former.state_dict().items()})
    # their preprocessing: support shots BGR→RGB before the transforms, test images fed as read (BGR)
    support_rgb = [Image.fromarray(cv2.cvtColor(train_set[i][0], cv2.COLOR_BGR2RGB)) for i in range(len(train_set))]
    out["support_images"] = as_array(torch.stack([model.transform(image) for image in support_rgb]))
    cluster_images = torch.stack([model.cluster_transform(image) for image in support_rgb])
    out["cluster_images_mean"] = as_array(cluster_images.mean(dim=(2, 3)))  # a fingerprint; 2×3×960×960 is too big
    out["test_images"] = as_array(
        torch.stack([model.transform(Image.fromarray(test_set[i][0])) for i in range(len(test_set))])
    )
    out["test_masks"] = np.stack(
        [cv2.resize(test_set[i][1].astype(np.uint8), (EVAL_SIZE, EVAL_SIZE), interpolation=cv2.INTER_NEAREST) > 0
         for i in range(len(test_set))]
    ).astype(np.uint8)  # fmt: skip

    regions: dict = {}
    hook_last(model.ctm0, regions, "foreground_split")
    hook_last(model.ctm1, regions, "component_split")
    calls: dict[str, list] = {}
    record_calls(model, ["calculate_textual_patch_anomaly_score", "calculate_visual_anomaly_score",
                         "get_max_cosine_similarity_match", "forward"], calls)  # fmt: skip
    record_calls(model.q_former, ["forward"], calls.setdefault("q_former", {}))
    aggregation_inputs: list = []
    density_noise: list[np.ndarray] = []
    original_aggregation = model.language_guided_progressive_region_aggregation

    def aggregation(image_features, entity_features):
        """Keep the level prompts and every ``torch.rand`` draw of their clustering (the density noise)."""
        aggregation_inputs.append(as_array(entity_features))
        original_rand = torch.rand

        def recording_rand(*args, **kwargs):
            draw = original_rand(*args, **kwargs)
            density_noise.append(as_array(draw))
            return draw

        torch.rand = recording_rand
        try:
            return original_aggregation(image_features, entity_features)
        finally:
            torch.rand = original_rand

    model.language_guided_progressive_region_aggregation = aggregation
    rescale: dict[str, np.ndarray] = {}
    original_rescale = train_seg.scale_rescale_matrix_to_standard_shape

    def recording_rescale(matrix):
        rescale["region_weights_3600"] = as_array(matrix)
        result = original_rescale(matrix)
        rescale["region_weights"] = as_array(result)
        return result

    train_seg.scale_rescale_matrix_to_standard_shape = recording_rescale
    with tempfile.TemporaryDirectory() as tmp, recorded_training(model.prompt_learner, train_loader) as training:
        result = train_seg.fit(model, training_args(category.name), test_loader, "cpu", img_dir=str(workdir),
                               check_path=str(Path(tmp) / "check_point.pt"), train_data=train_loader)  # fmt: skip
    shots = training["shots"]

    out.update(learner_state(model, "final"))
    out.update(training["first_step_gradients"])
    out["step_losses"] = np.asarray(training["step_losses"], dtype=np.float32)  # their loss at every training step
    out["final_image_prototypes"] = as_array(model.text_features)
    out["final_background_prototypes"] = as_array(model.background_features)
    out["final_entity_prototypes"] = as_array(model.entity_features_list)
    out["gallery_tap3"] = as_array(model.feature_gallery1)
    out["gallery_tap8"] = as_array(model.feature_gallery2)
    # region aggregation on the 960-px support shots (first training batch, in the loader's order)
    out["aggregation_entity_features"] = aggregation_inputs[0]
    out["density_noise"] = np.stack(density_noise)  # [stage 1, stage 2] × [K, 3600]: their torch.rand draws
    out["cosine_to_levels"] = regions["foreground_split_x"]
    out["foreground_labels"] = regions["foreground_split_idx_token"]
    out["component_mask"] = regions["component_split_mask"]
    out["component_labels"] = regions["component_split_idx_token"]
    out["label_map_support0"] = regions["component_split_idx_token"][0].reshape(60, 60)
    out.update(rescale)
    bonus = rescale["region_weights_3600"][:, 0] > 1.0
    out["matched_cluster"] = np.array(
        [(np.unique(out["component_labels"][0][row]).tolist() or [-1])[0] for row in bonus], dtype=np.int64
    )  # the cluster each component (and, last, the background) was matched to; -1: none of support 0's tokens
    # evaluation of the last epoch: queries, token-wise textual map, visual map, fused map, image score
    query_calls = calls["q_former"]["forward"]
    out["queries"] = as_array(query_calls[-1])
    out["token_matches"] = np.array([[j for _, j in image] for image in calls["get_max_cosine_similarity_match"][-1]])
    out["textual_grid"] = as_array(calls["calculate_textual_patch_anomaly_score"][-1])[:, 0]
    out["visual_grid"] = as_array(calls["calculate_visual_anomaly_score"][-1])[:, 0]
    out["anomaly_map"] = np.stack(calls["forward"][-1]).astype(np.float32)
    out.update(image_scores(model, out["test_images"]))
    out["best_pixel_auroc"] = np.float32(result["p_roc"])
    # shots[0] is fit's memory-bank pass over the loader; its first training batch (which the clustering and the first
    # step see) is shots[1]: the loader reshuffles, so the two orders can differ
    facts = {"prompt_texts": texts, "training_batches": shots, "support_order_in_first_batch": shots[1]}
    return out, facts


@contextmanager
def bf16_numpy() -> Iterator[None]:
    """``Tensor.numpy`` of a bf16 tensor returns its exact fp32 values: numpy has no bf16, so their ``cls`` forward
    (``.numpy()`` on the bf16 CLS score) raises under their default precision; the upcast is exact."""
    original = torch.Tensor.numpy
    torch.Tensor.numpy = lambda self, *a, **k: original(self.float() if self.dtype == torch.bfloat16 else self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.numpy = original


def run_bf16(modules, test_images: np.ndarray, support_images: np.ndarray) -> dict[str, np.ndarray]:
    """Their segmentation model as ``train_seg_finegrained_patch.py`` builds it by default (``--precision bf16``:
    their factory's ``convert_weights_to_lp``, bf16 prompt learner): the backbone outputs of the fp32 run's test
    tensors and the raw text features of every level and kind at its initial contexts; then its forward at those
    contexts, galleries from the fp32 run's support tensors (``fit``'s memory bank, ``build_text_feature_patch_gallery``
    without training): the Query Former weights, queries, token matches, textual and visual grids, the ``seg``
    anomaly maps at eval size and the ``cls`` scores."""
    _, authors_model, clipad, train_seg = modules
    train_seg.setup_seed(AUTHORS_SEED)
    model = build_authors_model(authors_model, clipad, precision="bf16")
    with torch.no_grad():
        cls, vv, tap3, tap8 = model.encode_image(torch.from_numpy(test_images))
    out = dict(test_cls=as_array(cls), test_vv=as_array(vv), test_tap3=as_array(tap3), test_tap8=as_array(tap8))
    out.update(learner_state(model, "initial"))
    out.update({f"query_former/{k}": as_array(v) for k, v in model.q_former.state_dict().items()})
    calls: dict[str, list] = {}
    record_calls(model, ["calculate_textual_patch_anomaly_score", "calculate_visual_anomaly_score",
                         "get_max_cosine_similarity_match"], calls)  # fmt: skip
    record_calls(model.q_former, ["forward"], calls.setdefault("q_former", {}))
    with torch.no_grad(), bf16_numpy():
        _, _, gallery3, gallery8 = model.encode_image(torch.from_numpy(support_images))
        model.build_image_feature_gallery(gallery3, gallery8)
        model.build_text_feature_patch_gallery()
        out["forward/anomaly_map"] = np.stack(model(torch.from_numpy(test_images), "seg")).astype(np.float32)
        out["forward/queries"] = as_array(calls["q_former"]["forward"][-1])
        out["forward/token_matches"] = np.array(
            [[j for _, j in image] for image in calls["get_max_cosine_similarity_match"][-1]]
        )
        out["forward/textual_grid"] = as_array(calls["calculate_textual_patch_anomaly_score"][-1])[:, 0]
        out["forward/visual_grid"] = as_array(calls["calculate_visual_anomaly_score"][-1])[:, 0]
        out.update({f"forward/{k}": v for k, v in image_scores(model, test_images).items()})
    out["forward/image_prototypes"] = as_array(model.text_features)
    out["forward/background_prototypes"] = as_array(model.background_features)
    out["forward/entity_prototypes"] = as_array(model.entity_features_list)
    return out


def write_imported_record(authors_repo: Path, out_dir: Path, category: str = "bottle") -> None:
    """Their ``category`` record through fsad's own ``fsad captions import`` (``captions/mvtec/<category>.json``):
    with it, ``variant: code`` must build the strings their run recorded."""
    from fsad.caption_import import import_authors_records  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        imported = import_authors_records(authors_repo / "PromptAD" / "fine_grained_prompts.py", Path(tmp))
        target = out_dir / "captions" / "mvtec" / f"{category}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(next(path for path in imported.written if path.stem == category), target)


def generate(authors_repo: Path, data_root: Path | None, out_dir: Path, category: str = "bottle") -> None:
    """``bottle``: write ``seg.npz``, ``cls.npz``, ``bf16.npz`` and ``meta.json`` for the FineGrainedAD parity
    comparison; another category: its segmentation run's ``<category>/seg.npz`` and ``<category>/meta.json``. Each
    writes the category's imported record under ``captions/``."""
    golden = CATEGORIES[category]
    authors_repo = authors_repo.resolve()
    modules = import_authors(authors_repo)
    modules[2].add_model_config(ARCH_CONFIG)
    target = out_dir if category == "bottle" else out_dir / category
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = draw_transistor(Path(tmp) / "images") if category == "transistor" else data_root.resolve()
        arrays, facts = run(root, modules, Path(tmp), golden)
        np.savez_compressed(target / "seg.npz", **arrays)
        if category == "bottle":
            np.savez_compressed(
                target / "cls.npz", **run_cls(root, modules, arrays["test_images"], facts["prompt_texts"])
            )
            np.savez_compressed(
                target / "bf16.npz", **run_bf16(modules, arrays["test_images"], arrays["support_images"])
            )
    write_imported_record(authors_repo, out_dir, category)
    commit = authors_commit(authors_repo)
    meta = {
        "authors_repository": "RetoFan233/FineGrainedAD",
        "authors_commit": commit or "aa6b0414b77b712a0e7a763a42a855ea38114bcc (files read from the index, not a git checkout)",
        "category": category, "arch": ARCH, "image_size": IMAGE_SIZE, "eval_size": EVAL_SIZE, "epochs": EPOCHS,
        "lr": LEARNING_RATE, "weight_seed": golden.weight_seed, "authors_seed": AUTHORS_SEED, "support": golden.support,
        "test": golden.test, "precision": "fp32", "torch": torch.__version__, "attribute_weights": ATTRIBUTE_WEIGHTS,
        **facts,
    }  # fmt: skip
    (target / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
