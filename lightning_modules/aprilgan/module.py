"""Lightning wrapper of APRIL-GAN: adapters trained once on another dataset's test images and masks, then zero- or
few-shot testing (the k shots' tokens become a memory bank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsad.batch import Batch
from fsad.lightning_modules.aprilgan.model import AprilGanModel, aprilgan_loss
from fsad.lightning_modules.base import StateEnsembleModule
from fsad.lightning_modules.components.clip import BackboneSpec

#: The authors' 35 sentence templates (CLIP's prompt-engineering list, plus "there is/this is … in the scene").
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)  # fmt: skip


class AprilGan(StateEnsembleModule):
    """APRIL-GAN (arXiv 2305.17382) on OpenCLIP; see this folder's README for the equation table and deviations.

    Args:
        score_size: side of the maps the per-layer logits are upsampled to before the softmax; ``null`` =
            ``eval_size`` (the authors use the image size, which their evaluation size equals).
        text_scale: logit scale of the cosine comparisons (the authors' 100).
        focal_gamma: exponent of the focal loss (2).
        lr, betas: Adam (the authors' 1e-3 and (0.5, 0.999)).
        paper_image_score: also log the authors' few-shot image AUROC, whose scores are normalised over the whole
            test set, as ``image_AUROC_paper_test_minmax`` (the honest per-image score stays ``image_AUROC``).
    The test datamodule's ``k_shot`` picks the mode: 0 = zero-shot (text only), k > 0 = few-shot (memory map added).
    """

    method_name = "aprilgan"
    protocol_stage = "pretrained"
    #: what the adapters mean and the objective that trained them; ``eval_size`` and ``gaussian_sigma`` are evaluation
    #: settings, and the shots (zero- or few-shot) come from the test datamodule
    text_templates = TEMPLATES
    trained_structure = frozenset({"backbone", "image_size", "score_size", "text_scale", "focal_gamma", "lr", "betas"})

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 518,
        eval_size: int = 518,
        gaussian_sigma: float = 0.0,
        score_size: int | None = None,
        text_scale: float = 100.0,
        focal_gamma: float = 2.0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        paper_image_score: bool = True,
    ) -> None:
        backbone = backbone or BackboneSpec(
            arch="ViT-L-14-336", pretrained="openai", taps=[6, 12, 18, 24], vv_attention=False
        )
        super().__init__(backbone=backbone, image_size=image_size, eval_size=eval_size, gaussian_sigma=gaussian_sigma)
        self.model = AprilGanModel(
            self.backbone.width, self.backbone.embed_dim, self.backbone.spec.taps, text_scale, score_size or eval_size
        )
        self.paper_image_score = paper_image_score

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        features = self.backbone(batch.image)
        probabilities = self.model.layer_probabilities(features, self.batch_text(batch.category))
        size = self.model.score_size
        target = F.interpolate(batch.gt_mask.float().unsqueeze(1), size=size, mode="bilinear")[:, 0] > 0.5
        terms = aprilgan_loss(probabilities, target, self.hparams.focal_gamma)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=len(batch))
        self.log("train_loss", terms["loss"], batch_size=len(batch), prog_bar=True)
        return terms["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.adapters.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def clear_support(self) -> None:
        """Zero-shot (``k_shot: 0``): no memory map; few-shot when the datamodule has support shots."""
        self.model.clear()
