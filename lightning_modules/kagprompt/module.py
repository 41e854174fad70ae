"""Lightning wrapper of KAG-prompt: auxiliary training on NSA anomalies, then few-shot testing on another dataset."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from fsad.batch import Batch
from fsad.lightning_modules.base import StateEnsembleModule
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.components.prompt_states import display_name
from fsad.lightning_modules.kagprompt.model import PAPER_KERNELS, KAGPromptModel, kag_loss

TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


class KAGPrompt(StateEnsembleModule):
    """KAG-prompt (methods.md §3) on OpenCLIP; see this folder's README for the equation table and every option.

    Args:
        variant: ``paper`` (Eq. 1–17 as printed) or ``code`` (the authors' released head, number for number).
        graph_dim: width of the adapter (multi-kernel convolutions and graph); ``null`` = the text width (paper).
        rounds: graph rounds T (5). gamma: γ of Eq. 14 (0.1). score_gamma: γ of Eq. 16 (0.1).
        top_k: pixels of the score-size map averaged for the image score (30).
        text_scale: logit scale of the text comparisons (100).
        score_size: side of the maps fused and top-k'd; ``null`` = ``eval_size`` (paper) or 224 (code, the authors').
        kernels: Eq. 1 kernel shapes. use_graph, use_gate, use_gru, use_memory: Table 2 ablation switches.
        gate_channels, gate_self_loop: readings of ambiguous paper equations (README).
        reverse_edge, visual_reduction: Eq. 5 and Eq. 13, ``null`` = as printed (paper: ``transpose``, ``sum``) or
            as the authors' code (code: ``same``, ``mean``).
        focal_weight, dice_weight, image_loss_weight: λ₁, λ₂ and the image-term weight of Eq. 17;
            ``dice_weight=None`` → 1 (paper) or 0.3 (code). focal_gamma: the focal exponent (2).
        lr, betas, weight_decay, warmup_fraction: Adam with linear warm-up then cosine decay over the fit.
    """

    method_name = "kagprompt"
    protocol_stage = "pretrained"
    #: what the trained adapter and graph mean: backbone and taps, variant, widths, kernels, rounds, the Table 2
    #: switches that remove trained parts, the gate, edge and reduction readings, the map fusion and logit scale the
    #: loss saw, and the objective and optimiser. Evaluation: eval_size, gaussian_sigma, score_gamma, top_k,
    #: use_memory (the support bank is built at test time).
    text_templates = TEMPLATES
    trained_structure = frozenset({
        "backbone", "image_size", "variant", "rounds", "graph_dim", "gamma", "text_scale", "score_size", "kernels",
        "use_graph", "use_gate", "use_gru", "gate_channels", "gate_self_loop", "reverse_edge", "visual_reduction",
        "focal_weight", "dice_weight", "image_loss_weight", "focal_gamma", "lr", "betas", "weight_decay",
        "warmup_fraction",
    })  # fmt: skip

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 224,
        gaussian_sigma: float = 0.0,
        variant: Literal["paper", "code"] = "paper",
        rounds: int = 5,
        graph_dim: int | None = None,
        gamma: float = 0.1,
        score_gamma: float = 0.1,
        top_k: int = 30,
        text_scale: float = 100.0,
        score_size: int | None = None,
        kernels: list[list[int]] | None = None,
        use_graph: bool = True,
        use_gate: bool = True,
        use_gru: bool = True,
        use_memory: bool = True,
        gate_channels: Literal[1, "dim"] = 1,
        gate_self_loop: bool = True,
        visual_reduction: Literal["sum", "mean"] | None = None,
        reverse_edge: Literal["transpose", "same"] | None = None,
        focal_weight: float = 1.0,
        dice_weight: float | None = None,
        image_loss_weight: float = 1.0,
        focal_gamma: float = 2.0,
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
        if score_size is None:
            score_size = eval_size if variant == "paper" else 224
        self.model = KAGPromptModel(
            self.backbone.width, self.backbone.embed_dim, taps, variant, rounds, gamma, score_gamma, top_k,
            text_scale, graph_dim, score_size, tuple(tuple(k) for k in (kernels or PAPER_KERNELS)), use_graph,
            use_gate, use_gru, gate_channels, gate_self_loop, use_memory, visual_reduction, reverse_edge,
        )  # fmt: skip

    def object_name(self, category: str) -> str:
        """The category's display name ("metal nut"), as the authors write it in their prompts."""
        return display_name(category)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        features = self.backbone(batch.image)
        outputs = self.model(features, self.batch_text(batch.category))
        size = self.model.score_size
        # the authors' ground truth: the mask at the map size, G > 0.3
        target = F.interpolate(batch.gt_mask.float().unsqueeze(1), size=size, mode="bilinear") > 0.3
        hp = self.hparams
        # c = max G, as the authors label: an NSA item whose patch left no mask pixel above 0.3 counts as normal
        labels = target.flatten(1).amax(1).long()
        terms = kag_loss(
            outputs, target[:, 0], labels, self.model.variant, hp.focal_weight, hp.dice_weight,
            hp.image_loss_weight, hp.focal_gamma,
        )  # fmt: skip
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=len(batch))
        self.log("train_loss", terms["loss"], batch_size=len(batch), prog_bar=True)
        return terms["loss"]

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
