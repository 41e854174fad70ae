"""Base LightningModule of every fsad method: one frozen backbone pass per image, support features cached per run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule

from fsad.batch import Batch
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec, ClipBackbone
from fsad.lightning_modules.components.feature_cache import FeatureCache
from fsad.lightning_modules.components.postprocess import upsample_and_smooth

ProtocolStage = Literal["fewshot_fit", "training_free", "pretrained"]
"""How a sweep runs a method per (category, k, seed) cell (DESIGN.md, "Sweep protocol per method"):

* ``fewshot_fit``: fit on the cell's k support shots, then test (PromptAD, FineGrainedAD);
* ``training_free``: test only; the support shots are encoded at test start (memory bank);
* ``pretrained``: trained once on another dataset, then every cell is tested from that checkpoint (KAG-prompt);
  a sweep never fits it on support shots.
"""


class FewShotAnomalyModule(LightningModule, ABC):
    """Wraps one method's pure-torch model: backbone features in, ``anomaly_map`` and ``pred_score`` out.

    Subclasses implement :meth:`fit_support` (cache what the k-shot normal images give) and :meth:`score`
    (grid-resolution maps and image scores from one backbone pass). This class owns the backbone, the support pass at
    ``on_test_start``/``on_predict_start`` and the post-processing to ``eval_size``.

    Args:
        backbone: which OpenCLIP model to load and how (see :class:`BackboneSpec`).
        image_size: input side in pixels; linked from ``data.image_size`` by the CLI.
        eval_size: side of the maps written to the batch; linked from ``data.eval_size`` by the CLI.
        gaussian_sigma: smoothing of the upsampled map, in eval-size pixels (0 disables it).
    """

    method_name: ClassVar[str] = "base"
    protocol_stage: ClassVar[ProtocolStage]
    feature_cache: FeatureCache | None = None
    """Set by the benchmark runner: test-image backbone outputs are then read from (and written to) this cache."""

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        image_size: int = 240,
        eval_size: int = 256,
        gaussian_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = ClipBackbone(backbone or BackboneSpec(), image_size=image_size)
        self.eval_size = eval_size
        self.gaussian_sigma = gaussian_sigma
        # image-score threshold fitted for prediction (callbacks/predictions.py); NaN = none, saved in checkpoints
        self.register_buffer("image_threshold", torch.tensor(float("nan")))

    # ----------------------------------------------------------------- method hooks
    @abstractmethod
    def fit_support(self, support: BackboneOutput) -> None:
        """Cache whatever the method needs from the k-shot normal images (memory banks, prototypes)."""

    @abstractmethod
    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Return grid maps [B,rows,cols] and image scores [B], both in [0,1], from one backbone pass."""

    # ----------------------------------------------------------------- support set
    def encode_support(self, loader: Iterable[Batch]) -> BackboneOutput:
        """Run the backbone once over every support batch."""
        outputs = [self.backbone(batch.image.to(self.device)) for batch in loader]
        if not outputs:
            raise RuntimeError("the support dataloader yielded no images; check data.k_shot and the train split")
        return BackboneOutput.cat(outputs)

    def prepare_support(self) -> None:
        """Encode the datamodule's k-shot support set and hand it to :meth:`fit_support` (once per run)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "support_dataloader"):
            raise RuntimeError(
                f"{type(self).__name__} needs a FewShotDataModule with support_dataloader() attached to the trainer"
            )
        self.fit_support(self.encode_support(datamodule.support_dataloader()))

    def on_test_start(self) -> None:
        self.prepare_support()

    def on_predict_start(self) -> None:
        self.prepare_support()

    # ----------------------------------------------------------------- evaluation
    def feature_variant(self) -> str:
        """What this module changes in the input before the backbone pass (part of the feature-cache key)."""
        return ""

    def encode_images(self, batch: Batch) -> BackboneOutput:
        """The backbone pass of a test batch, through :attr:`feature_cache` when the runner set one."""
        if self.feature_cache is None:
            return self.backbone(batch.image)
        return self.feature_cache.encode(self.backbone, batch.image, batch.image_path, self.feature_variant())

    def predict_batch(self, batch: Batch) -> Batch:
        """One backbone pass, the method's scoring, then upsampling and smoothing to ``eval_size``."""
        grid_maps, image_scores = self.score(self.encode_images(batch))
        anomaly_map = upsample_and_smooth(grid_maps, self.eval_size, self.gaussian_sigma)
        return batch.update(anomaly_map=anomaly_map.float(), pred_score=image_scores.float().clamp(0.0, 1.0))

    def test_step(self, batch: Batch, batch_idx: int) -> Batch:
        return self.predict_batch(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        return self.predict_batch(batch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen backbone is rebuilt from its spec, so checkpoints hold only the method's own weights."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the live backbone weights back so strict loading of a backbone-free checkpoint succeeds."""
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.backbone.state_dict(prefix="backbone.").items():
            state.setdefault(key, value)
        state.setdefault("image_threshold", torch.tensor(float("nan")))
