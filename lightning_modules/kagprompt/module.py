"""Lightning wrapper of KAG-prompt: auxiliary training on NSA anomalies, then few-shot testing on another dataset."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from fsad.batch import Batch
from fsad.lightning_modules.base import FewShotAnomalyModule
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec
from fsad.lightning_modules.components.losses import dice_loss, focal_loss, image_cross_entropy
from fsad.lightning_modules.components.prompt_states import display_name
from fsad.lightning_modules.kagprompt.model import KAGPromptModel

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")  # fmt: skip
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


class KAGPrompt(FewShotAnomalyModule):
    """KAG-prompt (methods.md §3) on OpenCLIP; see this folder's README.

    Args:
        variant: ``paper`` or ``code`` (the released code's choices).
        graph_dim: width of the adapter (multi-kernel convolutions and graph); ``null`` = the joint width.
        rounds: graph rounds T (5). gamma: γ of Eq. 14/16 (0.1). top_k: pixels of the 224² map in the image score.
        focal_weight, dice_weight, image_loss_weight: λ weights; ``dice_weight=None`` → 1 (paper) or 0.3 (code).
        lr, betas, weight_decay, warmup_fraction: Adam with linear warm-up then cosine decay over the fit.
    """

    method_name = "kagprompt"

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 224,
        gaussian_sigma: float = 0.0,
        variant: Literal["paper", "code"] = "paper",
        rounds: int = 5,
        graph_dim: int | None = 256,
        gamma: float = 0.1,
        top_k: int = 30,
        focal_weight: float = 1.0,
        dice_weight: float | None = None,
        image_loss_weight: float = 1.0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 1e-3,
        warmup_fraction: float = 0.1,
    ) -> None:
        backbone = backbone or BackboneSpec(taps=[3, 6, 9, 12], vv_attention=False)
        super().__init__(backbone=backbone, image_size=image_size, eval_size=eval_size, gaussian_sigma=gaussian_sigma)
        taps = self.backbone.spec.taps
        if len(taps) != 4:
            raise ValueError(f"backbone.taps: KAG-prompt uses 4 layers, got {taps}")
        self.model = KAGPromptModel(
            self.backbone.width, self.backbone.embed_dim, taps, variant, rounds, gamma, top_k,
            graph_dim=graph_dim,
        )
        self.dice_weight = dice_weight if dice_weight is not None else (1.0 if variant == "paper" else 0.3)
        self.text_by_category: dict[str, torch.Tensor] = {}
        self.category: str | None = None

    @torch.no_grad()
    def text_features(self, category: str) -> torch.Tensor:
        """[2,D] template-ensemble features (normal, abnormal) of a category, encoded once per run and cached."""
        if category not in self.text_by_category:
            name = display_name(category)
            sides = []
            for states in (NORMAL_STATES, ABNORMAL_STATES):
                texts = [t.format(s.format(name)) for s in states for t in TEMPLATES]
                encoded = F.normalize(self.backbone.encode_text(self.backbone.tokenize(texts)), dim=-1)
                sides.append(F.normalize(encoded.mean(0), dim=-1))
            self.text_by_category[category] = torch.stack(sides).to(self.device)
        return self.text_by_category[category]

    def batch_text(self, categories: list[str]) -> torch.Tensor:
        return torch.stack([self.text_features(c) for c in categories])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        features = self.backbone(batch.image)
        outputs = self.model(features, self.batch_text(batch.category))
        size = batch.gt_mask.shape[-2:]
        maps = F.interpolate(outputs["layer_maps"], size=size, mode="bilinear", align_corners=False)
        target = batch.gt_mask.float().unsqueeze(1).expand_as(maps)
        focal = focal_loss(maps, target)
        if self.model.variant == "paper":
            dice = dice_loss(maps.flatten(0, 1), target.flatten(0, 1))
        else:  # the released code: Dice on the anomaly map and on its complement
            dice = dice_loss(maps.flatten(0, 1), target.flatten(0, 1)) + dice_loss(
                1 - maps.flatten(0, 1), 1 - target.flatten(0, 1)
            )
        image = image_cross_entropy(outputs["image_probability"], batch.gt_label)
        loss = self.hparams.focal_weight * focal + self.dice_weight * dice + self.hparams.image_loss_weight * image
        self.log_dict({"train/focal": focal, "train/dice": dice, "train/image_ce": image}, batch_size=len(batch))
        self.log("train_loss", loss, batch_size=len(batch), prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )  # fmt: skip
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_fraction * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + torch.cos(torch.tensor((step - warmup) / max(1, total - warmup) * torch.pi)).item())

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def prepare_for_data(self, data: Any) -> None:
        """Remember the evaluated category: its text features are the ones :meth:`score` compares against."""
        self.category = getattr(data, "category", None)

    def fit_support(self, support: BackboneOutput) -> None:
        self.model.fit(support)

    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if self.category is None:
            raise RuntimeError("KAGPrompt needs a category: call prepare_for_data(datamodule) before scoring")
        text = self.text_features(self.category).unsqueeze(0).expand(features.cls.shape[0], -1, -1)
        outputs = self.model(features, text)
        return outputs["anomaly_map"], outputs["score"]
