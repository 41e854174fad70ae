"""Lightning wrapper of PromptAD: prompt training on the k shots, then one-pass evaluation."""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import abstractmethod
from typing import Any, Literal

import torch

from fsad.batch import Batch
from fsad.lightning_modules.base import FewShotAnomalyModule
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec
from fsad.lightning_modules.promptad.model import PromptADModel, Variant, check_variant

Protocol = Literal["honest", "paper"]
PROTOCOLS: tuple[str, ...] = ("honest", "paper")


def variant_backbone(backbone: BackboneSpec | dict | None, variant: Variant) -> BackboneSpec:
    """The backbone spec a variant runs on: ``code`` reads the taps as the authors' forward hooks hold them."""
    spec = BackboneSpec.coerce(backbone)
    return dataclasses.replace(spec, authors_tap_hook=True) if variant == "code" else spec


def swap_rgb_bgr(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Turn normalised RGB images into what the authors' test loop feeds: BGR pixels normalised with RGB statistics."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return ((images * s + m).flip(1) - m) / s


class PromptTuningModule(FewShotAnomalyModule):
    """What PromptAD and FineGrainedAD share: SGD with a cosine schedule over the epochs on the learnable prompt
    parameters, text features cached once per evaluation run, and the optional BGR test-image quirk.

    Subclasses pass the shared arguments to ``__init__``, set ``self.model`` (with ``cache_text``, ``fit_support``
    and ``forward(features, backbone)``), save the ``lr``/``momentum``/``weight_decay``/``eta_min`` hyper-parameters,
    and list their trainable parameters in :meth:`trainable_parameters`.
    """

    def __init__(
        self,
        backbone: BackboneSpec | dict | None,
        image_size: int,
        eval_size: int,
        gaussian_sigma: float,
        variant: Variant,
        protocol: Protocol,
        bgr_test_quirk: bool | None,
        best_epoch_on_test: bool | None,
        max_fusion_quirk: bool | None,
        low_precision_prompts_quirk: bool | None = None,
    ) -> None:
        """Two independent axes: ``variant`` (what is computed; ``code`` reads the authors' hooked taps and feeds
        BGR test images as they do) and ``protocol`` (how it is evaluated; ``paper`` adds best-epoch-on-test and the
        max over two fusions)."""
        check_variant(variant)
        super().__init__(
            backbone=variant_backbone(backbone, variant), image_size=image_size, eval_size=eval_size,
            gaussian_sigma=gaussian_sigma,
        )  # fmt: skip
        if protocol not in PROTOCOLS:
            raise ValueError(f"model.protocol: {protocol!r} is not one of {list(PROTOCOLS)}")
        self.variant = variant
        self.bgr_test_quirk = variant == "code" if bgr_test_quirk is None else bgr_test_quirk
        self.low_precision_prompts_quirk = (
            variant == "code" if low_precision_prompts_quirk is None else low_precision_prompts_quirk
        )
        paper_protocol = protocol == "paper"
        self.best_epoch_on_test = paper_protocol if best_epoch_on_test is None else best_epoch_on_test
        self.max_fusion_quirk = paper_protocol if max_fusion_quirk is None else max_fusion_quirk

    def warn_if_data_differs_from_variant(self, data: Any) -> None:
        """``variant: code`` is the authors' computation only on the authors' resize chain (``data.resize``)."""
        resize = getattr(data, "resize", None)
        if self.variant == "code" and resize not in (None, "authors"):
            warnings.warn(
                f"model.variant is 'code' but data.resize is {resize!r}: set data.resize: authors to feed the "
                "authors' cv2-1024 then PIL-bicubic images",
                UserWarning,
                stacklevel=2,
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.store_prompts_at_backbone_precision()

    def store_prompts_at_backbone_precision(self) -> None:
        """The low-precision prompts quirk (``variant: code``): with an fp16 or bf16 backbone the authors' prompt
        learner holds its contexts (and FineGrainedAD's Attr-MoE scalars) in that precision, and their SGD updates
        them there, with no fp32 master copy: a step smaller than half a unit in the last place is lost. Otherwise
        fsad keeps these parameters in fp32 and casts them at the text tower. Runs after the prompts are built."""
        if not self.low_precision_prompts_quirk or self.backbone.dtype == torch.float32:
            return
        for parameter in self.low_precision_parameters():
            parameter.data = parameter.data.to(self.backbone.dtype)

    def low_precision_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the low-precision prompts quirk stores at the backbone's precision: all trainable ones."""
        return self.trainable_parameters()

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimiser updates (the backbone is frozen)."""

    def parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], int | None]]:
        """(parameters, epochs of their schedule) pairs; None spans the run's ``max_epochs``."""
        return [(self.trainable_parameters(), None)]

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with a cosine schedule from ``lr`` to ``eta_min`` per parameter group, stepped once per epoch; a group
        whose schedule ends before the run stops moving (lr 0), as a separate training of that length would."""
        run_epochs = max(1, int(self.trainer.max_epochs or 1))
        groups = self.parameter_groups()
        optimizer = torch.optim.SGD(
            [{"params": params} for params, _ in groups],
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        lr, eta_min = self.hparams.lr, self.hparams.eta_min

        def cosine(epochs: int):  # CosineAnnealingLR's closed form as a factor of lr; with lr 0 nothing moves
            return lambda epoch: (
                (eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2) / lr
                if lr and epoch < epochs
                else 0.0
            )

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [cosine(epochs or run_epochs) for _, epochs in groups])
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_test_start(self) -> None:
        self.model.cache_text(self.backbone)
        super().on_test_start()

    def on_predict_start(self) -> None:
        self.model.cache_text(self.backbone)
        super().on_predict_start()

    def fit_support(self, support: BackboneOutput) -> None:
        self.model.fit_support(support)

    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(features, self.backbone)

    def feature_variant(self) -> str:
        return "bgr" if self.bgr_test_quirk else ""

    def input_images(self, images: torch.Tensor) -> torch.Tensor:
        """The BGR test-image quirk (``variant: code``): BGR pixels normalised with the RGB statistics."""
        if self.bgr_test_quirk:
            return swap_rgb_bgr(images, self.backbone.image_mean, self.backbone.image_std)
        return images


class PromptAD(PromptTuningModule):
    """PromptAD baseline (methods.md §1).

    Args:
        n_ctx: learnable normal context vectors shared by all prompts (4).
        n_ctx_ab: learnable abnormal context vectors per ALP set (1).
        n_pro_ab: ALP sets (4).
        eam_margin: margin m of L_EAM (0 in PromptAD).
        mean_loss_weight: λ of L_mean (0.001).
        lr, momentum, weight_decay, eta_min: SGD with a cosine schedule over ``trainer.max_epochs`` (100).
        variant: ``paper`` (the paper's text) or ``code`` (the released code, every quirk: the authors' tap hook,
            raw-mean prototypes, two prompt sets for maps and image score, the upsampled image-score max, their
            wording, temperature, BGR test images and token-axis L_EAM); see ``model.py`` and the README.
        protocol: ``honest`` (last epoch, one fusion) or ``paper`` (adds best epoch on test and the max fusion).
        n_pro_cls: normal context sets of the code variant's classification prompts (3).
        temperature_quirk: use ``logit_scale`` without ``.exp()``; default from ``variant``.
        bgr_test_quirk: feed test images as BGR; default from ``variant``.
        best_epoch_on_test: evaluate the test set after every epoch and report the best (reads test labels);
            default from ``protocol``.
        max_fusion_quirk: also log ``max(AUROC(harmonic), AUROC(mean))`` of the two image-score fusions as
            ``image_AUROC_paper_max_fusion``; default from ``protocol``. Both switches are carried out by the
            callbacks of :func:`fsad.callbacks.paper_protocol.paper_protocol_callbacks`, which ``fsad`` adds.
        eam_token_axis_quirk: sum L_EAM's squared differences over tokens (the authors' TripletLoss); default from
            ``variant``.
        low_precision_prompts_quirk: with ``backbone.precision`` fp16/bf16, hold the prompt contexts in that
            precision and let SGD update them there, as the authors' fp16 prompt learner (no fp32 master copy);
            default from ``variant``. No effect at fp32.
        low_precision_scoring_quirk: with ``backbone.precision`` fp16/bf16, compute T's softmax, M_v and the CLS
            score in that precision, as the authors' fp16 forward; default from ``variant``. No effect at fp32.
    """

    method_name = "promptad"
    protocol_stage = "fewshot_fit"
    #: what the learned prompts mean: backbone, variant, prompt shapes, the training objective and optimiser that
    #: produced them. Evaluation: eval_size, gaussian_sigma, protocol, bgr_test_quirk, low_precision_scoring_quirk,
    #: best_epoch_on_test, max_fusion_quirk.
    trained_structure = frozenset({
        "backbone", "image_size", "variant", "n_ctx", "n_ctx_ab", "n_pro_ab", "n_pro_cls", "eam_margin",
        "mean_loss_weight", "lr", "momentum", "weight_decay", "eta_min", "temperature_quirk", "eam_token_axis_quirk",
        "low_precision_prompts_quirk",
    })  # fmt: skip

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 256,
        gaussian_sigma: float = 4.0,
        n_ctx: int = 4,
        n_ctx_ab: int = 1,
        n_pro_ab: int = 4,
        eam_margin: float = 0.0,
        mean_loss_weight: float = 0.001,
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta_min: float = 1e-5,
        variant: Variant = "paper",
        protocol: Protocol = "honest",
        n_pro_cls: int = 3,
        temperature_quirk: bool | None = None,
        bgr_test_quirk: bool | None = None,
        best_epoch_on_test: bool | None = None,
        max_fusion_quirk: bool | None = None,
        eam_token_axis_quirk: bool | None = None,
        low_precision_prompts_quirk: bool | None = None,
        low_precision_scoring_quirk: bool | None = None,
    ) -> None:
        super().__init__(
            backbone, image_size, eval_size, gaussian_sigma, variant, protocol, bgr_test_quirk, best_epoch_on_test,
            max_fusion_quirk, low_precision_prompts_quirk,
        )  # fmt: skip
        code = variant == "code"
        low_precision_scoring = code if low_precision_scoring_quirk is None else low_precision_scoring_quirk
        self.model = PromptADModel(
            self.backbone.text_width, n_ctx, n_ctx_ab, n_pro_ab, eam_margin, mean_loss_weight,
            temperature_quirk=code if temperature_quirk is None else temperature_quirk,
            eam_token_axis_quirk=code if eam_token_axis_quirk is None else eam_token_axis_quirk,
            variant=variant, n_pro_cls=n_pro_cls, image_max_size=eval_size,
            scoring_dtype=self.backbone.dtype if low_precision_scoring else torch.float32,
        )  # fmt: skip

    def prepare_for_data(self, data: Any) -> None:
        """Build the prompts of the data's category."""
        category = getattr(data, "category", None)
        if category is None:
            raise RuntimeError("PromptAD needs a datamodule with a `category` to build its prompts")
        self.warn_if_data_differs_from_variant(data)
        self.model.build(self.backbone, category)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        features = self.backbone(batch.image)
        losses = self.model.losses(features, self.backbone)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch), prog_bar=False)
        self.log("train_loss", losses["total"], batch_size=len(batch), prog_bar=True)
        return losses["total"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        cls_prompts = self.model.cls_prompts
        return [*self.model.prompts.parameters(), *(cls_prompts.parameters() if cls_prompts is not None else [])]
