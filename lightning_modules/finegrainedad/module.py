"""Lightning wrapper of FineGrainedAD: MFSC record → prompts, region weights once per run, alignment training."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fsad.batch import Batch
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.components.prompts import SLOT_PATTERN, PromptGroupTexts
from fsad.lightning_modules.components.run_settings import SettingsMismatchError
from fsad.lightning_modules.finegrainedad.mfsc import (
    CaptionRecord,
    CaptionRecordError,
    PromptTexts,
    caption_provenance_summary,
    default_prompt_seed,
    mllp_texts,
    packaged_record,
    parse_record,
    resolve_record,
)
from fsad.lightning_modules.finegrainedad.model import FineGrainedADModel
from fsad.lightning_modules.finegrainedad.regions import (
    aggregate_regions,
    aggregate_regions_released,
    region_weights,
    released_reference,
    released_region_weights,
    slice_tiles,
    stitch_tiles,
)
from fsad.lightning_modules.promptad.model import Variant
from fsad.lightning_modules.promptad.module import PromptTuningModule, Protocol

#: The checkpoint entry holding the caption record a model was trained with: ``{"record": ..., "origin": ...}``.
CAPTION_RECORD_KEY = "caption_record"


def record_origin(captions: str | None, dataset: str, category: str) -> str:
    """Where a run's record was read from: the ``captions`` path given, or the packaged record's name."""
    return str(captions) if captions is not None else f"packaged record {dataset}/{category}"


def describe_record(record: CaptionRecord) -> str:
    """``dataset/category (provenance kind, source)`` of a record, for mismatch messages."""
    return f"{record.dataset}/{record.category} ({record.provenance.kind}, {record.provenance.source})"


def ablated_texts(texts: PromptTexts, placeholders: bool, attr_moe: bool) -> PromptTexts:
    """Tab. 5's text-side ablations of the MLLP prompt bodies, nothing else changed.

    ``placeholders=False``: NHPs lose the placeholders inserted after their values and every ALP holding placeholders
    becomes its level's NHP bodies with their values (contexts + caption: concatenation alone); no group is gated
    then, as nothing is left to weigh. ``attr_moe=False``: placeholders stay, ungated (every weight 1), and the code
    form's attribute groups (its Attr-MoE) are dropped.
    """

    def plain(body: str) -> str:
        return SLOT_PATTERN.sub("", body).replace("  ", " ").replace(" .", ".").replace(" ,", ",")

    def ablate(group: PromptGroupTexts) -> PromptGroupTexts:
        normal, learnable, gated = group.normal, group.learnable_abnormal, group.gated and attr_moe
        if not placeholders:
            normal = [plain(body) for body in normal]
            if any(SLOT_PATTERN.search(body) for body in learnable):
                learnable = list(normal)
            gated = False
        return replace(group, normal=normal, learnable_abnormal=learnable, gated=gated)

    return PromptTexts(
        image=ablate(texts.image),
        components={name: ablate(group) for name, group in texts.components.items()},
        background=ablate(texts.background),
        attributes=texts.attributes if attr_moe else {},
        foreground=None if texts.foreground is None else ablate(texts.foreground),
    )


class FineGrainedAD(PromptTuningModule):
    """FineGrainedAD (methods.md §2); see this folder's README for every parameter and deviation.

    Args:
        captions: an MFSC record JSON, or a folder of them (``<dataset>/<category>.json``, as ``fsad captions
            import`` writes); ``None`` uses the packaged record of (dataset, category). A generic record (no
            components) runs the image and background levels only, with one warning.
        n_pro_cls: normal context sets of ``variant: code``'s separate classification prompts (3, as the authors'
            ``train_cls_finegrained_patch.py``), which give the image score's text part.
        cls_epochs: epochs of the classification prompts' own cosine schedule (``variant: code``): 50 as the
            authors train them (their segmentation model trains 100); they stay fixed afterwards. None: the run's.
        eam_margin, mean_loss_weight, reg_weight: m (1.0), λ of L_mean (0.001), weight of L_reg (1.0).
        reg_lambda: λ of the background term inside L_reg (Eq. 3; 1 in the paper).
        region_boost: region weight ``w = 1 + boost`` inside a level's region (1.5).
        semantic_seeds, reference_mode, background_rule, assignment: the paper variant's clustering. ``semantic_seeds``
            starts DPC-KNN from prompt-chosen centres (on); ``reference_mode`` clusters the prompt cosines alone
            (``replace``, the paper's reference dimension) or, our option, [visual token; prompt cosines]
            (``concat``); ``background_rule`` takes as stage-1 background the cluster nearer the background prompt
            (``prompt``) or, our option, the cluster on the image border (``border``); ``assignment`` gives
            components regions ``one_to_one`` (the paper) or by ``argmax``. ``variant: code`` runs the released
            clustering instead, which has none of these choices: setting one there is an error.
        slice_factor: high-resolution slicing: support shots at ``factor × image_size``, cut into factor² tiles.
        train_query_former: train the Query Former with its objective (:func:`query_former_loss`); default from
            ``variant`` (the authors' code never trains it).
        image_reweighting: Eq. 6 image-level re-weighting of the token-wise map by the image-level ALP map, in our
            reading of its form (README); off by default in both variants: the paper's text does not give the form
            and the authors' code has no Eq. 6.
        token_wise_inference, image_level_only, region_aggregation, attr_moe, placeholders: Tab. 5's components,
            each on by default (``image_level_only`` off); switching one off is its ablation
            (``configs/finegrainedad/ablations/``): the mean of every level's score per token instead of Eq. 4's
            choice; the image-level prompts alone; every token at weight 1 at every level (no clustering); placeholders
            without Attr-MoE weights (paper) or no attribute mixing (code); ALPs and NHPs without placeholders
            (paper only: the code has none), which also removes the Attr-MoE weights that scale them.
        prompt_seed: seed of the random choices in the prompt texts (swapped locations, absent attribute values, and
            in ``variant: code`` each component AHP's defect state and location); default from ``variant``: 0, or
            the authors' ``setup_seed`` 111, which with a record imported from their file gives their strings.
        low_precision_prompts_quirk: with ``backbone.precision`` fp16/bf16, hold the segmentation prompts' contexts
            and Attr-MoE scalars in that precision and let SGD update them there, as the authors' bf16 segmentation
            script does (their classification script runs fp32, so the classification prompts stay fp32); default
            from ``variant``. No effect at fp32.
        temperature_quirk: the softmax temperature t of Eq. 4 and the losses is ``logit_scale`` (≈ 4.6, the authors'
            code) when true, ``exp(logit_scale)`` (≈ 100, CLIP's) when false; default true in both variants, since
            the paper's text does not fix t (README, "Readings").
        lr, momentum, weight_decay, eta_min, variant, protocol, bgr_test_quirk, best_epoch_on_test,
            max_fusion_quirk: as :class:`PromptAD`.
    """

    method_name = "finegrainedad"
    protocol_stage = "fewshot_fit"
    #: what the learned prompts and the Query Former mean: backbone, variant, the caption record and the prompt
    #: construction, prompt shapes, the region aggregation and objective they were trained with, the optimiser.
    #: Evaluation: eval_size, gaussian_sigma, image_reweighting (Eq. 6, a scoring step), token_wise_inference
    #: (Eq. 4 or the mean over levels, a scoring step), protocol, bgr_test_quirk, best_epoch_on_test,
    #: max_fusion_quirk.
    trained_structure = frozenset({
        "backbone", "image_size", "variant", "captions", "prompt_seed", "n_ctx", "n_ctx_ab", "n_pro_ab",
        "n_pro_cls", "cls_epochs", "eam_margin", "mean_loss_weight", "reg_weight", "reg_lambda", "region_boost",
        "semantic_seeds", "reference_mode", "background_rule", "assignment", "slice_factor", "train_query_former",
        "lr", "momentum", "weight_decay", "eta_min", "temperature_quirk", "low_precision_prompts_quirk",
        "image_level_only", "region_aggregation", "attr_moe", "placeholders",
    })  # fmt: skip

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 256,
        gaussian_sigma: float = 4.0,
        captions: str | None = None,
        n_ctx: int = 4,
        n_ctx_ab: int = 1,
        n_pro_ab: int = 4,
        n_pro_cls: int = 3,
        cls_epochs: int | None = 50,
        eam_margin: float = 1.0,
        mean_loss_weight: float = 0.001,
        reg_weight: float = 1.0,
        reg_lambda: float = 1.0,
        region_boost: float = 1.5,
        semantic_seeds: bool = True,
        reference_mode: Literal["concat", "replace"] = "replace",
        background_rule: Literal["border", "prompt"] = "prompt",
        assignment: Literal["one_to_one", "argmax"] = "one_to_one",
        slice_factor: int = 4,
        train_query_former: bool | None = None,
        image_reweighting: bool = False,
        prompt_seed: int | None = None,
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta_min: float = 1e-5,
        variant: Variant = "paper",
        protocol: Protocol = "honest",
        temperature_quirk: bool | None = None,
        bgr_test_quirk: bool | None = None,
        best_epoch_on_test: bool | None = None,
        max_fusion_quirk: bool | None = None,
        low_precision_prompts_quirk: bool | None = None,
        token_wise_inference: bool = True,
        image_level_only: bool = False,
        region_aggregation: bool = True,
        attr_moe: bool = True,
        placeholders: bool = True,
    ) -> None:
        if variant == "code":  # the released clustering has none of the paper clustering's choices
            chosen = {
                "semantic_seeds": (semantic_seeds, True),
                "reference_mode": (reference_mode, "replace"),
                "background_rule": (background_rule, "prompt"),
                "assignment": (assignment, "one_to_one"),
            }
            changed = [field for field, (value, default) in chosen.items() if value != default]
            if not placeholders:
                raise ValueError(
                    "model.placeholders: variant: code has no learnable placeholders to switch off (remove the field "
                    "or use variant: paper)"
                )
            if changed:
                raise ValueError(
                    f"model.{changed[0]}: configures variant: paper's clustering; variant: code runs the released "
                    "clustering, which has no such choice (remove the field or use variant: paper)"
                )
        super().__init__(
            backbone, image_size, eval_size, gaussian_sigma, variant, protocol, bgr_test_quirk, best_epoch_on_test,
            max_fusion_quirk, low_precision_prompts_quirk,
        )  # fmt: skip
        code = variant == "code"
        self.model = FineGrainedADModel(
            self.backbone.text_width, self.backbone.embed_dim, n_ctx, n_ctx_ab, n_pro_ab, eam_margin,
            mean_loss_weight, reg_weight, temperature_quirk=True if temperature_quirk is None else temperature_quirk,
            image_reweighting=image_reweighting,
            train_query_former=not code if train_query_former is None else train_query_former,
            variant=variant, reg_lambda=reg_lambda, image_max_size=eval_size if code else None,
            n_pro_cls=n_pro_cls if code else None, token_wise=token_wise_inference, image_level_only=image_level_only,
            attr_moe=attr_moe,
        )  # fmt: skip
        self.record: CaptionRecord | None = None
        self.record_origin: str | None = None
        self.checkpoint_record: tuple[CaptionRecord, str] | None = None  # (record, origin) of a loaded checkpoint
        self.region_weights_by_path: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def prepare_for_data(self, data: Any) -> None:
        """Load the caption record (a loaded checkpoint's, else the category's; warning on a generic one, logging its
        provenance), build its prompts."""
        self.warn_if_data_differs_from_variant(data)
        dataset, category = getattr(data, "dataset_name", "?"), getattr(data, "category", "?")
        if self.checkpoint_record is not None:
            self.record, self.record_origin = self.checkpoint_record
        else:
            self.record = resolve_record(self.hparams.captions, dataset, category)
            self.record_origin = record_origin(self.hparams.captions, dataset, category)
        if self.record.is_generic:
            warnings.warn(
                f"caption record {self.record.dataset}/{self.record.category} is generic "
                f"({self.record.provenance.source}): FineGrainedAD runs with the image and background levels only. "
                "See 'Where captions come from' in the README for image-derived records.",
                stacklevel=2,
            )
        for logger in self.loggers:  # CSV, W&B (run config), ...: which record a run used, and how far to trust it
            logger.log_hyperparams({"caption_provenance": caption_provenance_summary(self.record)})
        seed = default_prompt_seed(self.variant) if self.hparams.prompt_seed is None else self.hparams.prompt_seed
        texts = mllp_texts(self.record, seed=seed, placeholders=self.variant == "paper")
        self.model.build(self.backbone, ablated_texts(texts, self.hparams.placeholders, self.hparams.attr_moe))

    # ------------------------------------------------------------------ the caption record in checkpoints
    def requested_record(self, data: Any) -> CaptionRecord | None:
        """The record this config asks for on ``data``: the ``captions`` file or folder's, else the packaged record
        of the data's (dataset, category); None when ``captions`` is null and nothing is packaged for the data (a
        predict folder), where a checkpoint's own record is used."""
        dataset, category = getattr(data, "dataset_name", "?"), getattr(data, "category", "?")
        if self.hparams.captions is not None:
            return resolve_record(self.hparams.captions, dataset, category)
        try:
            return packaged_record(dataset, category)
        except CaptionRecordError:
            return None

    def checkpoint_differences(
        self, checkpoint: dict[str, Any], data: Any
    ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
        """As the base class, but ``captions`` compares the records themselves: the checkpoint's against the one
        this config asks for (so the same record given as a file or packaged is no difference)."""
        structure, evaluation = super().checkpoint_differences(checkpoint, data)
        saved = checkpoint.get(CAPTION_RECORD_KEY)
        if saved is None:  # a checkpoint from before records were stored: compare the `captions` setting as written
            return structure, evaluation
        structure.pop("captions", None)
        record = parse_record(saved["record"], "the checkpoint's caption record")
        requested = self.requested_record(data)
        if requested is not None and requested.model_dump(mode="json") != record.model_dump(mode="json"):
            structure["captions"] = (describe_record(record), describe_record(requested))
        return structure, evaluation

    def adopt_checkpoint_records(self, checkpoint: dict[str, Any]) -> None:
        """Use the checkpoint's caption record (it equals the requested one, or none was requested)."""
        saved = checkpoint.get(CAPTION_RECORD_KEY)
        if saved is not None:
            self.checkpoint_record = (parse_record(saved["record"], "the checkpoint's caption record"), saved["origin"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store the caption record the prompts were built from, with where it was read."""
        super().on_save_checkpoint(checkpoint)
        if self.record is not None:
            checkpoint[CAPTION_RECORD_KEY] = {
                "record": self.record.model_dump(mode="json"),
                "origin": self.record_origin,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights trained on another caption record than the one the prompts were just built from (a load
        that did not go through :meth:`check_checkpoint_settings`)."""
        saved = checkpoint.get(CAPTION_RECORD_KEY)
        if saved is not None and self.record is not None:
            record = parse_record(saved["record"], "the checkpoint's caption record")
            if record.model_dump(mode="json") != self.record.model_dump(mode="json"):
                raise SettingsMismatchError(
                    f"the checkpoint was trained with the caption record {describe_record(record)} but this run built "
                    f"its prompts from {describe_record(self.record)}: pass the checkpoint's record as "
                    "model.init_args.captions, or train a new model"
                )
        super().on_load_checkpoint(checkpoint)

    def run_records(self) -> dict[str, Any]:
        """``captions.json``: the record the prompts were built from, its provenance and where it was read."""
        if self.record is None:
            return {}
        return {"captions.json": {"origin": self.record_origin, "provenance": caption_provenance_summary(self.record),
                                  "record": self.record.model_dump(mode="json")}}  # fmt: skip

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        high_res = data.support_images(self.hparams.slice_factor * self.hparams.image_size)
        self.region_weights_by_path = self.compute_region_weights(data.support_paths, high_res)

    def support_tokens_high_res(self, images: torch.Tensor) -> torch.Tensor:
        """V-V tokens of support shots [K,3,f·S,f·S] (read at ``slice_factor × image_size``) from f² backbone passes
        on their tiles: [K, f·rows, f·cols, D]."""
        factor, size = self.hparams.slice_factor, self.hparams.image_size
        tiles = slice_tiles(images.to(self.device), factor, size)
        tokens = torch.cat([self.backbone(chunk).vv_tokens for chunk in tiles.split(16)])
        return stitch_tiles(tokens, len(images), factor, self.backbone.grid)

    def compute_region_weights(self, paths: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """MLSA region aggregation on the support shots (``images`` at high resolution, in ``paths`` order), once per
        run: path → [N_c+2, rows, cols] weights (components…, foreground, background).

        ``variant: code`` runs the released clustering and pooling (:func:`aggregate_regions_released`, shot 0 =
        the first path). A generic record has no components to aggregate, and ``region_aggregation: false`` skips the
        clustering: then every level weighs every token 1.
        """
        if not self.model.components or not self.hparams.region_aggregation:
            channels = len(self.model.components) + 2  # components…, foreground, background
            return {path: torch.ones(channels, *self.backbone.grid) for path in paths}
        with torch.no_grad():
            groups = self.model.prompts.encode(self.backbone)
            tokens = self.support_tokens_high_res(images)
        components = [groups[f"component:{c}"].normal_prototype for c in self.model.components]
        background = groups["background"].normal_prototype
        grid, boost = self.backbone.grid, self.hparams.region_boost
        if self.variant == "code":
            tokens = F.normalize(tokens, dim=-1)
            prompts = torch.stack([*components, background])
            reference = released_reference(tokens.flatten(1, 2), prompts)
            regions = aggregate_regions_released(
                reference, tokens, prompts, fixed_labels=self.released_cluster_map(tokens)
            )
            weights = released_region_weights(regions, grid, boost)
        else:
            foreground = groups["foreground"].normal_prototype if "foreground" in groups else None
            regions = aggregate_regions(
                tokens, torch.stack(components), background, semantic_seeds=self.hparams.semantic_seeds,
                reference_mode=self.hparams.reference_mode, background_rule=self.hparams.background_rule,
                assignment=self.hparams.assignment, foreground_prompt=foreground,
            )  # fmt: skip
            weights = region_weights(regions, grid, boost)
        for index, component in enumerate(self.model.components):
            if not regions.masks[index].any():
                warnings.warn(
                    f"FineGrainedAD: component {component!r} got no region after clustering the support shots; it is "
                    "trained on the whole image (every token at weight 1, as the image level) instead",
                    UserWarning,
                    stacklevel=2,
                )
        return {path: weights[:, i] for i, path in enumerate(paths)}

    def released_cluster_map(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The authors' fixed region map of this category (``released.cluster_map`` of an imported record: VisA
        ``pcb2``), checked against the high-resolution token grid [K,H,W,D]; None when the record has none."""
        released = self.record.released if self.record is not None else None
        if released is None or released.cluster_map is None:
            return None
        height, width = tokens.shape[1:3]
        if len(released.cluster_map) != height * width:
            raise ValueError(
                f"captions: {self.record.dataset}/{self.record.category} released.cluster_map has "
                f"{len(released.cluster_map)} labels but the support tokens form a {height}×{width} grid; the "
                "authors' map is for ViT-B-16-plus-240 at image_size 240 and slice_factor 4"
            )
        return torch.tensor(released.cluster_map, device=tokens.device)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        features = self.backbone(batch.image)
        weights = torch.stack([self.region_weights_by_path[p] for p in batch.image_path]).to(self.device)
        losses = self.model.losses(features, self.backbone, weights)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch))
        self.log("train_loss", losses["total"], batch_size=len(batch), prog_bar=True)
        return losses["total"]

    def on_train_epoch_end(self) -> None:
        """Log how distinct the Query Former's intrinsic representations are (``train/query_max_cos``; 1.0 means
        two coincide and Eq. 4 cannot route between their levels)."""
        if self.model.train_query_former and len(self.model.level_names) > 1:
            self.log("train/query_max_cos", self.model.query_separation(self.backbone))

    def on_fit_end(self) -> None:
        """Print the same diagnostic once after fit, where the run's output shows it."""
        if self.model.train_query_former and len(self.model.level_names) > 1 and self.trainer.is_global_zero:
            separation = self.model.query_separation(self.backbone)
            print(f"FineGrainedAD Query Former: max pairwise query cos {separation:.3f} after fit (1.0 = collapsed)")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimiser updates (:meth:`parameter_groups`); the backbone stays frozen."""
        return [parameter for group, _ in self.parameter_groups() for parameter in group]

    def segmentation_prompt_parameters(self) -> list[torch.nn.Parameter]:
        """The segmentation prompts' contexts, placeholders and Attr-MoE scalars (their ``prompt_learner``)."""
        gates = [] if self.model.attribute_gates is None else [self.model.attribute_gates]
        return [*self.model.prompts.parameters(), *gates]

    def low_precision_parameters(self) -> list[torch.nn.Parameter]:
        """The segmentation prompt parameters, as their ``prompt_learner`` at ``--precision bf16``; not the Query
        Former nor the classification model, which their scripts keep fp32."""
        return self.segmentation_prompt_parameters()

    def parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], int | None]]:
        """Contexts, placeholders, Attr-MoE weights and the Query Former over the run; with ``variant: code`` also
        the classification model's contexts and Attr-MoE weights over ``cls_epochs`` (its Query Former is never
        trained)."""
        model, classifier = self.model, self.model.classifier
        groups = [([*self.segmentation_prompt_parameters(), *model.query_former.parameters()], None)]
        if classifier is not None:
            groups.append(([*classifier.prompts.parameters(), classifier.attribute_gates], self.hparams.cls_epochs))
        return groups
