"""Stage-by-stage max |Δ| between fsad's FineGrainedAD pieces and the authors' golden numbers (not a test).

``python tests/parity/compare_finegrainedad.py`` reads ``tests/fixtures/parity/finegrainedad`` (written by
``make_golden.py finegrainedad``) and the real bottle images, computes each stage with fsad's own components on the
same architecture, weights and images, and prints one line per stage: max |Δ|, or a count where a stage's output is
labels. Where an input differs by construction (prompt texts, random initialisations, the clustering's
``torch.rand`` density noise) fsad is fed the authors' values, and each clustering stage is fed their reference
points, so that a stage isolates its own computation. ``test_parity_finegrainedad.py`` asserts the
stages that match. It also prints the stages of the ``hazelnut`` and ``transistor`` goldens
(:func:`category_stages`, fsad's datamodule through its own fit and test; their images are read from ``hazelnut_toy``
next to the MVTec root and painted by ``draw_transistor``) and of their bf16 forward (:func:`bf16_forward_stages`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "parity"
GOLDEN = FIXTURES / "finegrainedad"
ATTRIBUTES = ("relation", "color", "texture", "shape")


#: Categories with a segmentation golden of their own (``<category>/seg.npz``) besides ``bottle``.
MORE_CATEGORIES = ("hazelnut", "transistor")


def golden(task: str = "seg", category: str = "bottle") -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of their segmentation (``seg``), classification (``cls``) or bf16 (``bf16``) model on ``bottle``,
    or of their segmentation model on another category, and the run's facts."""
    folder = GOLDEN if category == "bottle" else GOLDEN / category
    with np.load(folder / f"{task}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads((folder / "meta.json").read_text())


def backbone(meta: dict, precision: str = "fp32"):
    """fsad's CLIP tower on the golden architecture with the same name-filled weights, the authors' tap hook on;
    ``precision`` as ``backbone.precision``."""
    from fsad.lightning_modules.components.clip import BackboneSpec, ClipBackbone
    from tests.parity.weights import fill_by_name

    open_clip.add_model_config(FIXTURES / f"{meta['arch']}.json")
    spec = BackboneSpec(arch=meta["arch"], pretrained=None, taps=[3, 8], authors_tap_hook=True, precision=precision)
    tower = ClipBackbone(spec, image_size=meta["image_size"])
    fill_by_name(tower.clip, meta["weight_seed"])
    return tower.eval()


def context_rows(
    g: dict[str, np.ndarray], stage: str, kind: str, rows: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The authors' context vectors of each prompt row: normal contexts always, plus abnormal context ``r`` on the
    learnable rows (their learner repeats the abnormal contexts over ``n_pro`` = 1)."""
    normal = torch.from_numpy(g[f"{stage}_normal_context"])[0]
    abnormal = torch.from_numpy(g[f"{stage}_abnormal_context"])[:, 0] if kind == "learnable" else None
    return normal.expand(rows, -1, -1), None if abnormal is None else abnormal[:rows]


def spliced_embeddings(tower, texts: list[str], normal: torch.Tensor, abnormal: torch.Tensor | None):
    """Word embeddings of the authors' prompt strings with their contexts written over the ``N``/``A`` positions
    (``[SOS] N N N N (A) body``, the layout of their prefix/context/suffix concatenation); and the EOT indices."""
    tokens = tower.tokenize(texts)
    with torch.no_grad():
        words = tower.token_embedding(tokens).float().clone()
    words[:, 1 : 1 + normal.shape[1]] = normal
    if abnormal is not None:
        words[:, 1 + normal.shape[1]] = abnormal
    return words, tokens.argmax(dim=-1)


def strip_contexts(text: str, learnable: bool = False) -> str:
    """Their prompt string without the ``N N N N`` context placeholders (and the ``A`` of a learnable prompt): the
    body fsad's learner splices after. A body may itself start with the article "A"."""
    return " ".join(text.split(" ")[5 if learnable else 4 :])


def their_group(meta: dict, level: str):
    """One level's prompt bodies from the authors' strings: their ``N N N N (A)`` contexts stripped, one learnable
    body (their learner writes each abnormal context in front of the same body)."""
    from fsad.lightning_modules.components.prompts import PromptGroupTexts

    texts = meta["prompt_texts"]
    bodies = {kind: [strip_contexts(t) for t in texts[f"{level}/{kind}"]] for kind in ("normal", "handcrafted")}
    return PromptGroupTexts(
        bodies["normal"], bodies["handcrafted"], [strip_contexts(texts[f"{level}/learnable"][0], learnable=True)]
    )


def attribute_gate_logits(g: dict[str, np.ndarray], prefix: str) -> torch.Tensor:
    """Their eight Attr-MoE parameters (before the sigmoid; ``prefix`` ``initial_``, ``final_`` or, for their
    gradients, ``first_step_gradient/``) as fsad's ``attribute_gates`` [normal/abnormal, kind]."""
    return torch.tensor([[float(g[f"{prefix}{side}_{a}_w"][0]) for a in ATTRIBUTES] for side in ("normal", "abnormal")])


def image_level_through_fsad(tower, g, meta, stage: str):
    """The image level's features from fsad's own ``PromptLearner`` (``variant: code``'s Attr-MoE embedding mixes)
    on their strings, contexts and σ(Attr-MoE weights)."""
    from fsad.lightning_modules.components.prompts import PromptLearner

    learner = PromptLearner(tower.text_width, n_ctx=4, n_ctx_ab=1, n_pro_ab=4, prototype_rule="raw_mean")
    learner.build(
        tower, {"image": their_group(meta, "image"), **{f"attribute:{a}": their_group(meta, a) for a in ATTRIBUTES}}
    )
    with torch.no_grad():
        learner.normal_context.copy_(torch.from_numpy(g[f"{stage}_normal_context"]))
        learner.abnormal_context.copy_(torch.from_numpy(g[f"{stage}_abnormal_context"]))
        normal, abnormal = torch.sigmoid(attribute_gate_logits(g, f"{stage}_"))
        mixes = {f"attribute:{a}": ("image", normal[i], abnormal[i]) for i, a in enumerate(ATTRIBUTES)}
        return learner.encode(tower, mixes=mixes)["image"]


def encode_level(tower, g, meta, stage: str, level: str, kind: str) -> torch.Tensor:
    """fsad's text tower on the authors' strings and contexts; the image level through fsad's prompt learner with
    the code's Attr-MoE (attribute prompt embeddings mixed in, top-k handcrafted attribute rows)."""
    if level == "image":
        return getattr(image_level_through_fsad(tower, g, meta, stage), f"raw_{kind}")
    texts = meta["prompt_texts"]
    rows = len(texts[f"{level}/{kind}"])
    normal, abnormal = context_rows(g, stage, kind, rows)
    words, eot = spliced_embeddings(tower, texts[f"{level}/{kind}"], normal, abnormal)
    with torch.no_grad():
        return tower.encode_text_embeddings(words, eot)


def composed_query_former(g: dict[str, np.ndarray]):
    """Their Query Former loaded into fsad's ``LevelQueryFormer``: each query attends to one key, so its
    cross-attentions reduce to ``proj(W_v y + b_v)``; the fused map of [p̄ⁿ; p̄ᵃ] is linear and composes exactly."""
    from fsad.lightning_modules.finegrainedad.model import LevelQueryFormer

    def value_path(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        kv_w, kv_b = (torch.from_numpy(g[f"query_former/{name}.kv_proj.{p}"]).double() for p in ("weight", "bias"))
        p_w, p_b = (torch.from_numpy(g[f"query_former/{name}.proj.{p}"]).double() for p in ("weight", "bias"))
        dim = p_w.shape[0]
        return p_w @ kv_w[dim:], p_w @ kv_b[dim:] + p_b

    (w1, b1), (w2, b2) = value_path("cross_attn1"), value_path("cross_attn2")
    f_w, f_b = (torch.from_numpy(g[f"query_former/fuse_layer.{p}"]).double() for p in ("weight", "bias"))
    dim = w1.shape[0]
    former = LevelQueryFormer(dim)
    with torch.no_grad():
        former.project.weight.copy_(torch.cat([f_w[:, :dim] @ w1, f_w[:, dim:] @ w2], dim=1).float())
        former.project.bias.copy_((f_w[:, :dim] @ b1 + f_w[:, dim:] @ b2 + f_b).float())
    return former


def level_prototypes(g: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Their evaluation prototypes in their level order (components…, image, background): normal [L,D], abnormal."""
    stacked = torch.cat([torch.from_numpy(g["final_entity_prototypes"]), torch.from_numpy(g["final_image_prototypes"])[None],
                         torch.from_numpy(g["final_background_prototypes"])[None]])  # fmt: skip
    return stacked[:, 0], stacked[:, 1]


def record(delta: dict[str, float], name: str, ours: torch.Tensor, theirs: np.ndarray) -> None:
    """Store one stage's max |Δ| between fsad's tensor and the authors' array."""
    delta[name] = float((ours.detach().float() - torch.from_numpy(np.asarray(theirs, dtype=np.float32))).abs().max())


def forward_stages(tower, g: dict[str, np.ndarray], meta: dict) -> dict[str, float]:
    """The stages computed from their recorded tensors alone: fsad's text tower on their strings and contexts, the
    Query Former, memory bank and visual map, the token-wise textual map, fusion and image score."""
    from fsad.lightning_modules.components.memory_bank import MemoryBank
    from fsad.lightning_modules.components.postprocess import harmonic_fusion, upsample_and_smooth
    from fsad.lightning_modules.finegrainedad.model import token_wise_scores
    from fsad.lightning_modules.promptad.model import upsampled_max

    delta: dict[str, float] = {}

    # 2. text tower on the authors' strings and contexts, every level and kind, before and after training
    for stage in ("initial", "final"):
        for key in [k for k in g if k.startswith(f"{stage}_text/")]:
            level, kind = key.split("/", 1)[1].split("/")
            record(delta, f"text/{stage}/{level}/{kind}", encode_level(tower, g, meta, stage, level, kind), g[key])
    # 3. Query Former (their weights composed into fsad's LevelQueryFormer, their prototypes)
    normal, abnormal = level_prototypes(g)
    with torch.no_grad():
        queries = composed_query_former(g)(normal, abnormal)
    record(delta, "query former (normalised queries)", queries, F.normalize(torch.from_numpy(g["queries"]), dim=-1))

    # 4. backbone on their test tensors; memory bank from fsad's taps of their support tensors
    features_test = tower(torch.from_numpy(g["test_images"]))
    features_support = tower(torch.from_numpy(g["support_images"]))
    for tap, key in ((3, "gallery_tap3"), (8, "gallery_tap8")):
        ours = F.normalize(features_support.taps[tap], dim=-1)
        theirs = torch.from_numpy(g[key]).reshape(ours.shape)
        # their gallery follows the loader's (shuffled) order; compare shot to shot in the order that matches best
        swap = (ours.flip(0) - theirs).abs().max() < (ours - theirs).abs().max()
        record(delta, f"memory bank/tap {tap}", ours.flip(0) if swap else ours, theirs.numpy())
    bank = MemoryBank()
    bank.fit({tap: F.normalize(features_support.taps[tap], dim=-1) for tap in (3, 8)})
    visual = bank({tap: F.normalize(features_test.taps[tap], dim=-1) for tap in (3, 8)}).reshape(-1, 15, 15)
    record(delta, "visual map (grid)", visual, g["visual_grid"])

    # 5. token-wise textual map (Eq. 4) from fsad's V-V tokens, their queries and prototypes, raw logit_scale
    tokens = F.normalize(features_test.vv_tokens, dim=-1)
    temperature = tower.logit_scale  # their t = model.logit_scale, no exp()
    textual = token_wise_scores(tokens, queries, normal, abnormal, temperature).reshape(-1, 15, 15)
    record(delta, "textual map (grid)", textual, g["textual_grid"])
    matched = (tokens @ queries.T).argmax(dim=-1)
    delta["token → level matches (count differing)"] = float((matched.numpy() != g["token_matches"]).sum())

    # 6. fusion, upsampling and σ=4 smoothing at the eval size; image score
    fused = harmonic_fusion(torch.from_numpy(g["textual_grid"]), torch.from_numpy(g["visual_grid"]))
    record(delta, "anomaly map (eval size)", upsample_and_smooth(fused, meta["eval_size"], 4.0), g["anomaly_map"])
    cls = F.normalize(features_test.cls, dim=-1)
    image_text = token_wise_scores(cls, queries, normal, abnormal, temperature)
    record(delta, "image text score (CLS)", image_text, g["image_text_score"])
    visual_max = upsampled_max(torch.from_numpy(g["visual_grid"]), meta["eval_size"])  # variant: code's Eq. 8 max
    ours_score = harmonic_fusion(visual_max, torch.from_numpy(g["image_text_score"]))
    record(delta, "image score (max of the upsampled visual map)", ours_score, g["image_score"])
    return delta


def measure(root: Path) -> dict[str, float]:
    """Every compared stage's max |Δ| (see the module docstring); the keys name the stages."""
    from tests.integration.test_parity_promptad import authors_datamodule

    g, meta = golden()
    tower = backbone(meta)
    data, _ = authors_datamodule(root, Path(tempfile.mkdtemp()), meta)
    delta, test_order = preprocessing_stages(tower, g, meta, data)
    delta.update(forward_stages(tower, g, meta))
    delta.update(prompt_text_stages(meta))
    delta.update(region_stages(tower, g, meta, root, data))
    delta.update(training_stages(g, golden("cls")[0], meta, data, test_order))
    return delta


def preprocessing_stages(tower, g: dict[str, np.ndarray], meta: dict, data) -> tuple[dict[str, float], list[int]]:
    """fsad's datamodule (``resize: authors``: their cv2-1024 → PIL-bicubic chain) against their preprocessed support
    and test tensors (test images fed as read, BGR, as their test loader does) and their test masks at eval size; and
    each image of the datamodule's one test batch's index in their test order."""
    from fsad.lightning_modules.promptad.module import swap_rgb_bgr

    delta: dict[str, float] = {}
    support = next(iter(data.support_dataloader()))
    names = [Path(p).name for p in meta["support"]]
    order = [names.index(Path(p).name) for p in support.image_path]
    record(delta, "preprocess/support", support.image, g["support_images"][order])
    test = next(iter(data.test_dataloader()))
    theirs = ["/".join(Path(p).parts[-2:]) for p in meta["test"]]  # defect folder / file name: unique per image
    test_order = [theirs.index("/".join(Path(p).parts[-2:])) for p in test.image_path]
    fed = swap_rgb_bgr(test.image, tower.image_mean, tower.image_std)
    record(delta, "preprocess/test (BGR)", fed, g["test_images"][test_order])
    delta["preprocess/test masks at eval size (count differing)"] = float(
        (test.gt_mask.numpy() != g["test_masks"][test_order]).sum()
    )
    return delta, test_order


def category_datamodule(category: str, root: Path, folder: Path, meta: dict):
    """fsad's MVTec datamodule (``resize: authors``, their two shots by name) over an MVTec-layout copy, under
    ``folder``, of the golden run's files of ``category`` read from ``root`` (``hazelnut_toy`` has no category folder
    and names its masks like its images, which the MVTec layout also accepts), set up for test."""
    from fsad.datamodules.mvtec import MVTecDataModule
    from tests.parity.finegrainedad_golden import CATEGORIES

    for relative in [*meta["support"], *meta["test"], *filter(None, CATEGORIES[category].masks)]:
        target = folder / category / relative.removeprefix(f"{category}/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / relative, target)
    data = MVTecDataModule(
        root=str(folder), category=category, k_shot=len(meta["support"]), image_size=meta["image_size"],
        eval_size=meta["eval_size"], resize="authors", support_files=[Path(p).name for p in meta["support"]],
        batch_size=len(meta["test"]),
    )  # fmt: skip
    data.setup("test")
    return data


def shots_in_their_order(data, meta: dict) -> list[int]:
    """The datamodule's support indices in their first training batch's order (shot 0 = its first shot)."""
    stems = [Path(p).stem for p in data.support_paths]
    return [stems.index(name.rsplit("-", 1)[1]) for name in meta["support_order_in_first_batch"]]


@contextmanager
def their_density_noise(g: dict[str, np.ndarray]) -> Iterator[None]:
    """``torch.rand`` serves their run's recorded density-noise draws, in order, instead of fresh ones; leaving the
    block fails unless every draw was taken, each of their shape."""
    recorded = list(torch.from_numpy(g["density_noise"]))
    original = torch.rand

    def their_draw(size, *args, **kwargs) -> torch.Tensor:
        draw = recorded.pop(0)
        if tuple(size) != tuple(draw.shape):
            raise AssertionError(f"a draw of {tuple(size)}, they drew {tuple(draw.shape)}")
        return draw.to(kwargs.get("dtype") or draw.dtype)

    torch.rand = their_draw
    try:
        yield
    finally:
        torch.rand = original
    if recorded:
        raise AssertionError("the clustering drew less noise than their run")


def fsads_glue_region_weights(
    g: dict[str, np.ndarray], meta: dict, images_in_their_order: torch.Tensor
) -> torch.Tensor:
    """fsad's own ``FineGrainedAD.compute_region_weights`` (``variant: code``: its prompts at their initial contexts,
    its tiling, clustering and pooling) on the given 960-px shots in their shot order, with their density noise:
    their rows [components…, background] × shots × 225."""
    backbone(meta)  # registers the golden architecture with open_clip
    module, _ = code_variant_on_their_prompts(g, None, meta)
    module.prepare_for_data(SimpleNamespace(dataset_name="mvtec", category=meta.get("category", "bottle")))
    module.eval()
    paths = [f"{name}.png" for name in meta["support_order_in_first_batch"]]
    with their_density_noise(g):
        weights = module.compute_region_weights(paths, images_in_their_order)
    n_components = len(module.model.components)
    rows = [*range(n_components), n_components + 1]  # fsad's rows add the foreground; theirs do not
    return torch.stack([weights[path][rows].flatten(1) for path in paths], dim=1)


def their_cluster_images(meta: dict, root: Path, names: list[str]) -> torch.Tensor:
    """The 960-px support images of their ``cluster_transform`` (cv2 read, cv2 1024², BGR→RGB, PIL bicubic 960²,
    CLIP normalisation) of the shots named ``bottle-good-000``…, in that order."""
    import cv2
    from PIL import Image

    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    images = []
    for name in names:
        path = next(root / p for p in meta["support"] if Path(p).stem == name.rsplit("-", 1)[1])
        bgr = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (1024, 1024))
        big = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).resize((960, 960), Image.BICUBIC)
        tensor = torch.from_numpy(np.asarray(big, dtype=np.float32) / 255.0).permute(2, 0, 1)
        images.append((tensor - mean[:, None, None]) / std[:, None, None])
    return torch.stack(images)


def region_stages(tower, g: dict[str, np.ndarray], meta: dict, root: Path, data) -> dict[str, float]:
    """Region aggregation: fsad's tiling/stitching and the code's reference points on their 960-px images, then
    fsad's released clustering (:func:`aggregate_regions_released`) fed their reference points and their density
    noise, against their label maps, the cluster each level claimed, and their region weights."""
    delta: dict[str, float] = {}
    listed = [f"bottle-good-{Path(p).stem}" for p in meta["support"]]  # the fingerprint follows meta["support"]
    fingerprint = their_cluster_images(meta, root, listed).mean(dim=(2, 3))
    delta["regions/960-px images (channel means)"] = float(
        (fingerprint - torch.from_numpy(g["cluster_images_mean"])).abs().max()
    )
    stems = [Path(p).stem for p in meta["support"]]
    order = [stems.index(Path(p).stem) for p in data.support_paths]
    high_res = data.support_images(4 * meta["image_size"])  # what fsad's module clusters
    delta["regions/960-px images from fsad's datamodule (channel means)"] = float(
        (high_res.mean(dim=(2, 3)) - torch.from_numpy(g["cluster_images_mean"][order])).abs().max()
    )
    rebuilt = their_cluster_images(meta, root, [f"bottle-good-{Path(p).stem}" for p in data.support_paths])
    delta["regions/960-px images from fsad's datamodule against their transform rebuilt (pixels)"] = float(
        (high_res - rebuilt).abs().max()
    )
    delta.update(clustering_stages(tower, g, their_cluster_images(meta, root, meta["support_order_in_first_batch"])))
    return delta


def clustering_stages(tower, g: dict[str, np.ndarray], images: torch.Tensor) -> dict[str, float]:
    """From their 960-px clustering images (in their first batch's order): fsad's tiling/stitching and the code's
    reference points, then fsad's released clustering fed their reference points and density noise, against their
    label maps, the cluster each level claimed, and their region weights."""
    from fsad.lightning_modules.finegrainedad.regions import (
        aggregate_regions_released,
        released_dpc_knn,
        released_reference,
        released_region_weights,
        slice_tiles,
        stitch_tiles,
    )

    delta: dict[str, float] = {}
    tile = images.shape[-1] // 4
    tiles = slice_tiles(images, 4, tile)  # already 960 px: the bicubic resize is the identity
    with torch.no_grad():
        tokens = stitch_tiles(F.normalize(tower(tiles).vv_tokens, dim=-1), len(images), 4, (15, 15))  # [K,60,60,D]
    prompts = torch.from_numpy(g["aggregation_entity_features"])
    reference = torch.from_numpy(g["cosine_to_levels"])  # theirs: each clustering stage is compared on its own
    ours = released_reference(tokens.flatten(1, 2), prompts)
    delta["regions/cosine to level prompts (60×60)"] = float((ours - reference).abs().max())
    noise = torch.from_numpy(g["density_noise"])
    stage1 = released_dpc_knn(reference, 2, 1, noise=noise[0])
    delta["regions/stage-1 labels (count differing)"] = float(
        (stage1 != torch.from_numpy(g["foreground_labels"])).sum()
    )
    regions = aggregate_regions_released(reference, tokens, prompts, noise=(noise[0], noise[1]))
    n_levels = prompts.shape[0]  # components…, background
    foreground = regions.masks[n_levels - 1].flatten(1).long()
    delta["regions/stage-2 foreground mask (count differing)"] = float(
        (foreground != torch.from_numpy(g["component_mask"])).sum()
    )
    theirs = torch.from_numpy(g["component_labels"])  # [K, 3600]
    claimed = [regions.masks[i].flatten(1) for i in (*range(n_levels - 1), n_levels)]  # components…, background
    delta["regions/level regions, 60×60 (count differing)"] = float(sum(
        (mask != (theirs == int(cluster))).sum() for mask, cluster in zip(claimed, g["matched_cluster"], strict=True)
    ))  # fmt: skip
    weights = released_region_weights(regions, (15, 15)).flatten(2)
    ours_levels = torch.cat([weights[: n_levels - 1], weights[n_levels:]])  # their rows: components…, background
    delta["regions/region weights (15×15)"] = float((ours_levels - torch.from_numpy(g["region_weights"])).abs().max())
    return delta


def prompt_text_stages(meta: dict) -> dict[str, float]:
    """fsad's ``variant: code`` prompt bodies from their record of the run's category imported by ``fsad captions
    import`` (``captions/``), at their seed, against the strings their run tokenized: the count of bodies that
    differ."""
    from fsad.lightning_modules.finegrainedad.mfsc import AUTHORS_PROMPT_SEED, mllp_texts, resolve_record

    their_record = resolve_record(GOLDEN / "captions", "mvtec", meta.get("category", "bottle"))
    groups = mllp_texts(their_record, seed=AUTHORS_PROMPT_SEED).groups()
    components = [name for name in groups if name.startswith("component:")]
    ours_by_theirs = {"image": "image", "background": "background", **{a: f"attribute:{a}" for a in ATTRIBUTES}}
    ours_by_theirs.update({f"entity{i}": name for i, name in enumerate(components)})
    delta = {}
    for theirs, ours in ours_by_theirs.items():
        for kind, field in (("normal", "normal"), ("handcrafted", "abnormal"), ("learnable", "learnable_abnormal")):
            expected = list(
                dict.fromkeys(strip_contexts(t, kind == "learnable") for t in meta["prompt_texts"][f"{theirs}/{kind}"])
            )
            built = getattr(groups[ours], field)
            differing = sum(a != b for a, b in zip(built, expected, strict=False)) + abs(len(built) - len(expected))
            delta[f"prompt texts/{theirs}/{kind} (count differing)"] = float(differing)
    return delta


def code_variant_on_their_prompts(
    g: dict[str, np.ndarray], c: dict[str, np.ndarray] | None, meta: dict, precision: str = "fp32"
):
    """fsad's ``FineGrainedAD(variant="code")`` on the golden architecture and weights, with their record of the
    run's category imported by ``fsad captions import`` (so it builds their strings), the initial contexts and
    Attr-MoE weights of their segmentation (``g``) and classification (``c``) models and their Query Formers (``c``
    None: no classification model, so images are scored with the segmentation levels, as their segmentation script
    scores them), training with their
    region weights (the clustering is compared on its own in :func:`region_stages`; fresh density noise would give
    other regions; none when ``g`` has no region weights); ``precision`` as ``backbone.precision``."""
    from fsad.lightning_modules.components.clip import BackboneSpec
    from fsad.lightning_modules.finegrainedad.module import FineGrainedAD
    from tests.parity.weights import fill_by_name

    weights = {}
    if "region_weights" in g:
        theirs = torch.from_numpy(g["region_weights"])  # [components…, background] × shots in their first batch × 225
        rows = torch.cat([theirs[:-1], torch.ones_like(theirs[:1]), theirs[-1:]])  # fsad's rows add the foreground
        weights = {
            name.rsplit("-", 1)[1]: rows[:, i].reshape(-1, 15, 15)
            for i, name in enumerate(meta["support_order_in_first_batch"])
        }

    class OnTheirPrompts(FineGrainedAD):
        def prepare_for_data(self, data) -> None:
            """Their initial parameters, set once (``test`` after ``fit`` sets up again)."""
            if self.model.level_names:
                return
            super().prepare_for_data(data)
            if c is None:
                self.model.classifier = None
            with torch.no_grad():
                for model, arrays in ((self.model, g), (self.model.classifier, c))[: 1 if c is None else 2]:
                    model.prompts.normal_context.copy_(torch.from_numpy(arrays["initial_normal_context"]))
                    model.prompts.abnormal_context.copy_(torch.from_numpy(arrays["initial_abnormal_context"]))
                    model.attribute_gates.copy_(attribute_gate_logits(arrays, "initial_"))
                    model.query_former.load_state_dict(composed_query_former(arrays).state_dict())

        def on_fit_start(self) -> None:
            self.region_weights_by_path = {
                path: weights[Path(path).stem] for path in self.trainer.datamodule.support_paths
            }

    module = OnTheirPrompts(
        BackboneSpec(arch=meta["arch"], pretrained=None, taps=[3, 8], precision=precision),
        image_size=meta["image_size"],
        eval_size=meta["eval_size"], variant="code", lr=meta["lr"], eta_min=1e-5, captions=str(GOLDEN / "captions"),
        cls_epochs=meta["epochs"],  # their golden classification run is as long as the segmentation run
    )  # fmt: skip
    fill_by_name(module.backbone.clip, meta["weight_seed"])
    return module, weights


def first_step_losses(module, g: dict[str, np.ndarray], meta: dict, weights: dict) -> dict[str, torch.Tensor]:
    """fsad's training losses on their first training batch (their preprocessed shots, in their order)."""
    stems = [Path(p).stem for p in meta["support"]]
    batch = [stems.index(name.rsplit("-", 1)[1]) for name in meta["support_order_in_first_batch"]]
    features = module.backbone(torch.from_numpy(g["support_images"][batch]))
    return module.model.losses(features, module.backbone, torch.stack([weights[stems[i]] for i in batch]))


def parameter_deltas(model, arrays: dict[str, np.ndarray], gradients: bool) -> dict[str, float]:
    """max |Δ| of one model's contexts and Attr-MoE logits against their trained values, or of their gradients
    against their first-step gradients."""

    def value(parameter: torch.Tensor) -> torch.Tensor:
        return parameter.grad if gradients else parameter.detach()

    learner = model.prompts
    names = ("normal_ctx", "abnormal_ctx") if gradients else ("normal_context", "abnormal_context")
    prefix = "first_step_gradient/" if gradients else "final_"
    delta = {
        f"{kind} contexts": float((value(ours) - torch.from_numpy(arrays[prefix + name]).reshape(ours.shape)).abs().max())
        for kind, ours, name in zip(("normal", "abnormal"), (learner.normal_context, learner.abnormal_context), names, strict=True)
    }  # fmt: skip
    delta["Attr-MoE"] = float((value(model.attribute_gates) - attribute_gate_logits(arrays, prefix)).abs().max())
    return delta


def training_stages(
    g: dict[str, np.ndarray], c: dict[str, np.ndarray], meta: dict, data, test_order: list[int]
) -> dict[str, float]:
    """The released segmentation and classification losses and their training, then evaluation: fsad's losses and
    gradients at the first step on their first batch, then :func:`fit_and_test_stages` for both models (image
    scores: their classification model's)."""
    delta: dict[str, float] = {}
    module, weights = code_variant_on_their_prompts(g, c, meta)
    module.prepare_for_data(data)
    losses = first_step_losses(module, g, meta, weights)
    parts = {
        "segmentation": sum(v for k, v in losses.items() if k != "total" and not k.startswith("cls/")),
        "classification": sum(v for k, v in losses.items() if k.startswith("cls/")),
    }
    losses["total"].backward()
    models = {"segmentation": (module.model, g), "classification": (module.model.classifier, c)}
    for task, (model, arrays) in models.items():
        delta[f"training/{task} first-step loss"] = abs(float(parts[task]) - float(arrays["step_losses"][0]))
        delta.update(
            {f"training/{task} first-step gradient, {k}": v for k, v in parameter_deltas(model, arrays, True).items()}
        )
    module.zero_grad()
    delta.update(fit_and_test_stages(module, models, data, meta, test_order, c["image_score"]))
    return delta


def fit_and_test_stages(
    module, models: dict, data, meta: dict, test_order: list[int], their_image_scores: np.ndarray
) -> dict[str, float]:
    """fsad's own Lightning ``fit`` of ``module`` (one SGD over its prompt sets: momentum, weight decay, cosine
    schedule) for their epochs, against each of ``models``' (task → (fsad model, their arrays)) trained contexts and
    Attr-MoE weights; then fsad's ``test`` of the trained module against their last epoch's anomaly maps (the
    segmentation arrays') and ``their_image_scores`` (``test_order``: each test image's index in their order, for
    the datamodule's one test batch)."""
    from lightning import Trainer

    from tests.integration.test_cli_and_membank import CollectOutputs

    delta: dict[str, float] = {}
    data.setup("fit")
    trainer = Trainer(accelerator="cpu", max_epochs=meta["epochs"], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    for task, (model, arrays) in models.items():
        delta.update({f"training/{task} trained {k}": v for k, v in parameter_deltas(model, arrays, False).items()})

    collector = CollectOutputs()
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[collector]).test(
        module, datamodule=data
    )
    maps = torch.cat(collector.maps).reshape(-1, meta["eval_size"], meta["eval_size"])[np.argsort(test_order)]
    scores = torch.cat(collector.scores)[np.argsort(test_order)]
    theirs = models["segmentation"][1]
    delta["evaluation/anomaly map after fsad's training"] = float(
        (maps - torch.from_numpy(theirs["anomaly_map"])).abs().max()
    )
    delta["evaluation/image score after fsad's training"] = float(
        (scores - torch.from_numpy(their_image_scores)).abs().max()
    )
    return delta


def bf16_forward_stages(precision: str = "bf16") -> dict[str, float]:
    """fsad's ``variant: code`` at ``backbone.precision`` ``precision`` against their bf16 segmentation model's
    forward (``bf16.npz``, ``forward/``): their bf16 initial contexts, Attr-MoE weights and Query Former, the memory
    bank from the fp32 run's support tensors, text prototypes at those contexts, then fsad's own scoring of the test
    tensors: anomaly maps at eval size and image scores. Their segmentation model scores images with its own levels,
    so fsad's classifier is set aside (scoring falls back to the segmentation levels)."""
    arrays, meta = golden()
    half, _ = golden("bf16")
    backbone(meta)  # registers the golden architecture with open_clip
    module, _ = code_variant_on_their_prompts(half, half, meta, precision=precision)
    module.prepare_for_data(SimpleNamespace(dataset_name="mvtec", category="bottle"))
    module.model.classifier = None
    module.eval()
    with torch.no_grad():
        module.fit_support(module.backbone(torch.from_numpy(arrays["support_images"])))
        module.model.cache_text(module.backbone)
        maps, scores = module.maps_and_scores(module.backbone(torch.from_numpy(arrays["test_images"])))
    delta: dict[str, float] = {}
    record(delta, "bf16 forward/anomaly map (eval size)", maps, half["forward/anomaly_map"])
    record(delta, "bf16 forward/image score", scores, half["forward/image_score"])
    return delta


def category_stages(category: str, root: Path) -> dict[str, float]:
    """The stages of another category's segmentation golden (``root``: the folder its images are read from):
    preprocessing through fsad's MVTec datamodule over an MVTec-layout copy of the run's files; the forward stages;
    prompt strings; the datamodule's 960-px clustering images against their channel means and, pixel for pixel,
    against their ``cluster_transform`` rebuilt; the clustering fed their reference points; the region-weight glue
    end to end (fsad's ``compute_region_weights`` on the datamodule's 960-px shots, their density noise); fsad's
    first training step with their region weights; and fsad's own Lightning ``fit`` and ``test`` of the segmentation
    model (no classification model: their run trained none), against their trained parameters, maps and scores."""
    g, meta = golden("seg", category)
    tower = backbone(meta)
    with tempfile.TemporaryDirectory() as folder:
        data = category_datamodule(category, root, Path(folder), meta)
        delta, test_order = preprocessing_stages(tower, g, meta, data)
        delta.update(forward_stages(tower, g, meta))
        delta.update(prompt_text_stages(meta))
        high_res = data.support_images(4 * meta["image_size"])  # what fsad's module clusters
        stems = [Path(p).stem for p in data.support_paths]
        listed = [stems.index(Path(p).stem) for p in meta["support"]]  # their fingerprint follows meta["support"]
        delta["regions/960-px images from fsad's datamodule (channel means)"] = float(
            (high_res[listed].mean(dim=(2, 3)) - torch.from_numpy(g["cluster_images_mean"])).abs().max()
        )
        ours = high_res[shots_in_their_order(data, meta)]
        theirs = their_cluster_images(meta, root, meta["support_order_in_first_batch"])
        delta["regions/960-px images from fsad's datamodule against their transform rebuilt (pixels)"] = float(
            (ours - theirs).abs().max()
        )
        delta.update(clustering_stages(tower, g, theirs))
        delta["regions/region weights from fsad's glue on its datamodule's 960-px shots"] = float(
            (fsads_glue_region_weights(g, meta, ours) - torch.from_numpy(g["region_weights"])).abs().max()
        )
        module, weights = code_variant_on_their_prompts(g, None, meta)
        module.prepare_for_data(data)
        losses = first_step_losses(module, g, meta, weights)
        segmentation = sum(v for k, v in losses.items() if k != "total")
        theirs_loss = float(g["step_losses"][0])  # 13–32 here: a few fp32 units are ~1e-5 absolute, so relative
        delta["training/segmentation first-step loss (relative)"] = abs(
            float(segmentation.detach()) - theirs_loss
        ) / abs(theirs_loss)
        losses["total"].backward()
        gradients = parameter_deltas(module.model, g, True).items()
        delta.update({f"training/segmentation first-step gradient, {k}": v for k, v in gradients})
        module.zero_grad()
        models = {"segmentation": (module.model, g)}
        delta.update(fit_and_test_stages(module, models, data, meta, test_order, g["image_score"]))
    return delta


def main() -> int:
    sys.path.insert(0, str(REPO))
    root = REPO.parent / "shared" / "data" / "mvtec_ad"
    if len(sys.argv) > 1:
        root = Path(sys.argv[1])
    delta = measure(root)
    delta.update(bf16_forward_stages())
    hazelnut = root.parent / "hazelnut_toy"
    with tempfile.TemporaryDirectory() as tmp:
        from tests.parity.finegrainedad_golden import draw_transistor

        for category, images in (("hazelnut", hazelnut), ("transistor", draw_transistor(Path(tmp)))):
            delta.update({f"{category}: {k}": v for k, v in category_stages(category, images).items()})
    width = max(len(name) for name in delta)
    for name, value in delta.items():
        print(f"{name:<{width}}  {value:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
