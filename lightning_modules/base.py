"""Base LightningModule of every fsad method: one frozen backbone pass per image, support features cached per run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule

from fsad.batch import Batch
from fsad.errors import FsadError
from fsad.lightning_modules.components.clip import BackboneOutput, BackboneSpec, ClipBackbone
from fsad.lightning_modules.components.feature_cache import FeatureCache
from fsad.lightning_modules.components.postprocess import upsample_and_smooth
from fsad.lightning_modules.components.prompt_states import state_ensemble_features
from fsad.lightning_modules.components.run_settings import (
    SettingsMismatchError,
    describe_changes,
    differing,
    qualified_name,
)
from fsad.lightning_modules.components.thresholds import DecisionThresholds


class SizeMismatchError(FsadError, ValueError):
    """Images or masks do not have the size the model was built for (``data.*_size`` versus ``model.*_size``)."""


class ZeroShotUnsupportedError(FsadError, ValueError):
    """``data.k_shot: 0`` given to a method that needs support images."""


ProtocolStage = Literal["fewshot_fit", "training_free", "pretrained"]
"""How a sweep runs a method per (category, k, seed) cell (README.md, "Sweeps: the papers' tables"):

* ``fewshot_fit``: fit on the cell's k support shots, then test (PromptAD, FineGrainedAD);
* ``training_free``: test only; the support shots are encoded at test start (memory bank);
* ``pretrained``: trained once on another dataset, then every cell is tested from that checkpoint (KAG-prompt);
  a sweep never fits it on support shots.
"""


class FewShotAnomalyModule(LightningModule, ABC):
    """Wraps one method's pure-torch model: backbone features in, ``anomaly_map`` and ``pred_score`` out.

    Subclasses implement :meth:`fit_support` (cache what the k-shot normal images give) and :meth:`score`
    (grid-resolution maps and image scores from one backbone pass). This class owns the backbone, the support pass at
    ``on_test_start``/``on_predict_start``, the post-processing to ``eval_size`` and the decision thresholds.
    After :meth:`fit_support`, ``module(images)`` scores normalised images without a trainer.

    Args:
        backbone: which OpenCLIP model to load and how (a :class:`BackboneSpec` or a dict of its fields).
        image_size: input side in pixels; linked from ``data.image_size`` by the CLI.
        eval_size: side of the maps written to the batch; linked from ``data.eval_size`` by the CLI.
        gaussian_sigma: smoothing of the upsampled map, in eval-size pixels (0 disables it).
    """

    method_name: ClassVar[str] = "base"
    protocol_stage: ClassVar[ProtocolStage]
    trained_structure: ClassVar[frozenset[str]] = frozenset({"backbone", "image_size"})
    """The init arguments that decide what the trained parameters mean (or hold, for a fitted support set); every
    other init argument is an evaluation setting. A checkpoint is loaded only under equal trained-structure
    settings (:meth:`check_checkpoint_settings`)."""
    run_config_hash: str | None = None
    """The run's :func:`~fsad.lightning_modules.components.run_settings.config_hash`, set by the ``fsad`` CLI and
    ``fsad export``; checkpoints and result tables carry it."""
    zero_shot_capable: ClassVar[bool] = False
    """Whether the method runs with ``data.k_shot: 0`` (no support images at all)."""
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
        self.backbone = ClipBackbone(BackboneSpec.coerce(backbone), image_size=image_size)
        self.image_size = image_size
        self.eval_size = eval_size
        self.gaussian_sigma = gaussian_sigma
        # image/pixel thresholds and normalisation statistics (NaN = not fitted), saved in checkpoints and exports
        self.thresholds = DecisionThresholds()

    @property
    def image_threshold(self) -> torch.Tensor:
        """The fitted raw image-score threshold (a buffer of :attr:`thresholds`; NaN when none)."""
        return self.thresholds.image_threshold

    # ----------------------------------------------------------------- method hooks
    @abstractmethod
    def fit_support(self, support: BackboneOutput) -> None:
        """Cache whatever the method needs from the k-shot normal images (memory banks, prototypes)."""

    @abstractmethod
    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Return grid maps [B,rows,cols] and image scores [B] from one backbone pass, raw: any real range, higher means
        more anomalous (nothing downstream clamps them)."""

    def prepare_for_data(self, data: Any) -> None:
        """Build what depends on the dataset and category (prompt texts); ``data`` is the datamodule, or any object
        with its ``category`` and ``dataset_name``. Nothing to build by default."""

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        pretraining = stage == "fit" and self.protocol_stage == "pretrained"  # trains on another dataset, no shots
        if getattr(data, "k_shot", None) == 0 and not (self.zero_shot_capable or pretraining):
            raise ZeroShotUnsupportedError(
                f"data.k_shot: 0 (zero-shot) but {self.method_name} needs at least one support image; "
                "set data.k_shot >= 1, or use a zero-shot method (winclip)"
            )
        self.prepare_for_data(data)

    # ----------------------------------------------------------------- support set
    def encode_support(self, loader: Iterable[Batch]) -> BackboneOutput:
        """Run the backbone once over every support batch."""
        outputs = [self.backbone(batch.image.to(self.device)) for batch in loader]
        if not outputs:
            raise RuntimeError("the support dataloader yielded no images; check data.k_shot and the train split")
        return BackboneOutput.cat(outputs)

    def clear_support(self) -> None:
        """Zero-shot: forget any support set. Only a ``zero_shot_capable`` method has one to forget."""
        raise ZeroShotUnsupportedError(f"{self.method_name} needs at least one support image")

    def prepare_support(self) -> None:
        """Encode the datamodule's k-shot support set and hand it to :meth:`fit_support` (once per run); with
        ``k_shot: 0`` (a zero-shot method, :meth:`setup` refused the others) :meth:`clear_support` instead."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "k_shot", None) == 0:
            self.clear_support()
            return
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

    def input_images(self, images: torch.Tensor) -> torch.Tensor:
        """What the backbone is fed for normalised RGB images; methods with an input quirk override it."""
        return images

    def encode_images(self, batch: Batch) -> BackboneOutput:
        """The backbone pass of a test batch, through :attr:`feature_cache` when the runner set one."""
        if self.feature_cache is None:
            return self.backbone(batch.image)
        return self.feature_cache.encode(self.backbone, batch.image, batch.image_path, self.feature_variant())

    def check_image_size(self, images: torch.Tensor) -> None:
        """Fail with both fields named when images do not have the side the backbone was built for."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise SizeMismatchError(
                f"images are {tuple(images.shape[-2:])} pixels but model.image_size is {self.image_size}: set "
                f"data.image_size and model.image_size to the same value (the fsad CLI links them)"
            )

    def maps_and_scores(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's scoring of one backbone pass, then upsampling and smoothing to ``eval_size``; values stay raw,
        as rank metrics need them (a clamp would turn distinct scores into ties)."""
        grid_maps, image_scores = self.score(features)
        anomaly_map = upsample_and_smooth(grid_maps, self.eval_size, self.gaussian_sigma)
        return anomaly_map.float(), image_scores.float()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B,3,S,S] → raw anomaly maps [B,E,E] and image scores [B], after :meth:`fit_support`.

        One backbone pass, the method's scoring, then upsampling and smoothing to ``eval_size``.
        """
        self.check_image_size(images)
        return self.maps_and_scores(self.backbone(self.input_images(images)))

    def predict_batch(self, batch: Batch) -> Batch:
        """Score a batch (through the feature cache when the runner set one) and write ``anomaly_map`` and
        ``pred_score`` on it."""
        if batch.gt_mask is not None and tuple(batch.gt_mask.shape[-2:]) != (self.eval_size, self.eval_size):
            raise SizeMismatchError(
                f"masks are {tuple(batch.gt_mask.shape[-2:])} pixels but model.eval_size is {self.eval_size}: set "
                f"data.eval_size and model.eval_size to the same value (the fsad CLI links them)"
            )
        self.check_image_size(batch.image)
        batch.image = self.input_images(batch.image)
        anomaly_map, pred_score = self.maps_and_scores(self.encode_images(batch))
        return batch.update(anomaly_map=anomaly_map, pred_score=pred_score)

    def test_step(self, batch: Batch, batch_idx: int) -> Batch:
        return self.predict_batch(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        return self.predict_batch(batch)

    # ----------------------------------------------------------------- settings and checkpoints
    def checkpoint_differences(
        self, checkpoint: dict[str, Any], data: Any
    ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
        """(trained-structure, evaluation) settings whose checkpoint value differs from this model's, as
        ``key -> (checkpoint value, this model's value)``; ``data`` is the run's datamodule (or any object with its
        ``dataset_name`` and ``category``). Keys a checkpoint does not record are not compared."""
        saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
        requested = {k: v for k, v in self.hparams.items() if not str(k).startswith("_")}
        keys = set(saved) | set(requested)
        return (
            differing(saved, requested, keys & self.trained_structure),
            differing(saved, requested, keys - self.trained_structure),
        )

    def check_checkpoint_settings(self, checkpoint: dict[str, Any], data: Any, source: str) -> dict[str, tuple]:
        """Refuse a checkpoint (``source`` names it) of another model class or other trained-structure settings, in
        one line naming both classes or every differing key with both values; return the evaluation settings this
        model changes relative to it (``key -> (checkpoint value, this model's value)``)."""
        saved_class = checkpoint_model_class(checkpoint)
        own_class = qualified_name(type(self))
        if saved_class is not None and saved_class != own_class:
            raise SettingsMismatchError(
                f"{source} holds a {saved_class.rpartition('.')[2]} model ({saved_class}) but the config asks for "
                f"{type(self).__name__} ({own_class}): use the config the checkpoint was trained with"
            )
        structure, evaluation = self.checkpoint_differences(checkpoint, data)
        if structure:
            raise SettingsMismatchError(
                f"{source} was trained with other trained-structure settings than the config asks for: "
                f"{describe_changes(structure, 'checkpoint', 'config')}; set them as the checkpoint has them, or "
                "train a new model"
            )
        self.adopt_checkpoint_records(checkpoint)
        return evaluation

    def adopt_checkpoint_records(self, checkpoint: dict[str, Any]) -> None:
        """Take over what the checkpoint fixes besides its weights and settings (FineGrainedAD: its caption record),
        before :meth:`prepare_for_data` runs. Nothing by default."""

    def run_records(self) -> dict[str, Any]:
        """JSON files that describe this run beyond its config (file name -> content), written into the run folder
        when the run finishes. None by default."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen backbone is rebuilt from its spec, so checkpoints hold only the method's own weights; the
        model class and the run's config hash are recorded beside the hyper-parameters."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        checkpoint["model_class"] = qualified_name(type(self))
        if self.run_config_hash is not None:
            checkpoint["config_hash"] = self.run_config_hash

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the live backbone weights back so strict loading of a backbone-free checkpoint succeeds; checkpoints
        older than the thresholds component get unfitted thresholds (their bare ``image_threshold`` moves in)."""
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.backbone.state_dict(prefix="backbone.").items():
            state.setdefault(key, value)
        if "image_threshold" in state:
            state.setdefault("thresholds.image_threshold", state.pop("image_threshold"))
        for key, value in DecisionThresholds().state_dict(prefix="thresholds.").items():
            state.setdefault(key, value)


def checkpoint_model_class(checkpoint: dict[str, Any]) -> str | None:
    """The model class path a checkpoint records (written by fsad, or by Lightning's CLI); None when unknown."""
    return checkpoint.get("model_class") or (checkpoint.get("hyper_parameters") or {}).get("_class_path")


class StateEnsembleModule(FewShotAnomalyModule):
    """A method scoring against the state-ensemble text features of the evaluated category (KAG-prompt, APRIL-GAN).

    Subclasses set :attr:`text_templates`, may rename the object with :meth:`object_name`, and build a ``model``
    whose forward takes (features, text [B,2,D]) and returns ``anomaly_map`` and ``score``.
    """

    text_templates: ClassVar[tuple[str, ...]]
    model: torch.nn.Module

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text_by_category: dict[str, torch.Tensor] = {}
        self.category: str | None = None

    def object_name(self, category: str) -> str:
        """The object's name in the prompts: the category as the dataset names it, unless a method says otherwise."""
        return category

    @torch.no_grad()
    def text_features(self, category: str) -> torch.Tensor:
        """[2,D] (normal, anomalous) features of a category, encoded once per run and cached."""
        if category not in self.text_by_category:
            features = state_ensemble_features(self.backbone, self.object_name(category), self.text_templates)
            self.text_by_category[category] = features.to(self.device)
        return self.text_by_category[category]

    def batch_text(self, categories: list[str]) -> torch.Tensor:
        return torch.stack([self.text_features(c) for c in categories])

    def prepare_for_data(self, data: Any) -> None:
        """Remember the evaluated category: its text features are the ones :meth:`score` compares against."""
        self.category = getattr(data, "category", None)

    def fit_support(self, support: BackboneOutput) -> None:
        self.model.fit(support)

    def score(self, features: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if self.category is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a category: call prepare_for_data(datamodule) before scoring"
            )
        text = self.text_features(self.category).unsqueeze(0).expand(features.cls.shape[0], -1, -1)
        outputs = self.model(features, text)
        return outputs["anomaly_map"], outputs["score"]
