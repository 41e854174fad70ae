"""``fsad.Inferencer``: score one new image from Python, without a datamodule or a Trainer.

    from fsad import Inferencer
    inferencer = Inferencer.from_checkpoint("runs/.../checkpoints/last.ckpt")   # or Inferencer.from_export("model/")
    result = inferencer.predict("part_0042.png")   # a path, a PIL image or a uint8 RGB array [H,W,3]
    result.score, result.anomaly_map, result.label, result.mask

Both routes run the same computation as ``fsad test`` (the datamodule's resize and normalisation, one backbone pass,
the method head, upsampling and smoothing to ``eval_size``); the map and mask are then resized to the image's own
size (bilinear for the map, nearest for the mask).

``from_checkpoint`` fits the support set the run evaluated, found as ``fsad export`` finds it
(:func:`fsad.export.recorded_support`). Other support images passed as ``support=`` are used, and a
:class:`SupportReplacedWarning` says so in the line ``fsad export --support`` prints.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fsad.batch import collate_batch
from fsad.checkpoints import read_checkpoint
from fsad.datamodules.transforms import PairedTransform, load_rgb
from fsad.errors import CheckpointError, FsadError
from fsad.export import (
    METADATA_FILE,
    ONNX_FILE,
    PROGRAM_FILE,
    DeployedDetector,
    ExportError,
    SupportChoice,
    read_metadata,
    recorded_support,
    replaced_support_line,
)
from fsad.lightning_modules.base import FewShotAnomalyModule, ZeroShotUnsupportedError, checkpoint_model_class
from fsad.lightning_modules.components.run_settings import evaluation_change_line


class SupportReplacedWarning(UserWarning):
    """``Inferencer.from_checkpoint`` was given other support images than the ones the checkpoint's run evaluated:
    its scores are not the run's. Filter this category to silence it where that is meant."""


@dataclass
class Prediction:
    """The verdict on one image.

    score: raw image score, any real range (what ``fsad test`` ranks).
    anomaly_map: raw float32 [H,W] at the image's own size, in the method's own range.
    label: 1 anomalous / 0 normal, when an image threshold is fitted; else ``None``.
    mask: uint8 {0,1} [H,W] at the image's own size, when a pixel threshold is fitted; else ``None``.
    """

    score: float
    anomaly_map: np.ndarray
    label: int | None = None
    mask: np.ndarray | None = None


def as_rgb_array(image: Any) -> np.ndarray:
    """A path, PIL image or array ([H,W], [H,W,3|4], uint8 or 16-bit) as uint8 RGB [H,W,3]."""
    if isinstance(image, str | Path):
        return load_rgb(image)
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise FsadError(f"image: expected an RGB array [H,W,3], got shape {array.shape}")
    if array.dtype != np.uint8:
        raise FsadError(f"image: expected uint8 pixels (0..255), got {array.dtype}; convert it first")
    return np.ascontiguousarray(array[..., :3])


def fit_support_images(module: FewShotAnomalyModule, paths: Sequence[str | Path], transform: PairedTransform) -> None:
    """Encode the normal reference images with the datamodule's transform and hand them to ``fit_support``; no
    images makes a zero-shot method zero-shot (its memory banks emptied) and is refused by the others."""
    if not paths:
        if not module.zero_shot_capable:
            raise ZeroShotUnsupportedError(f"no support images given, but {module.method_name} needs at least one")
        module.clear_support()
        return
    items = []
    for index, path in enumerate(paths):
        image = load_rgb(path)
        tensor, mask = transform(image, np.zeros(image.shape[:2], np.uint8))
        items.append({"image": tensor, "gt_mask": mask, "gt_label": 0, "image_path": str(path), "mask_path": None,
                      "category": "support", "index": index})  # fmt: skip
    batches = [collate_batch(items[i : i + 8]) for i in range(0, len(items), 8)]
    with torch.no_grad():
        module.fit_support(module.encode_support(batches))


def given_support(support: str | Path | Sequence[str | Path], evaluated: SupportChoice | None) -> SupportChoice:
    """The images of ``support`` (a folder or a list), with a :class:`SupportReplacedWarning` when the checkpoint
    records other ones (``evaluated``, None when it records none)."""
    from fsad.calibration import images_from

    files = [str(path) for path in images_from(support)]
    choice = SupportChoice(files, str(support) if isinstance(support, str | Path) else "the support= list")
    if evaluated is not None and not same_images(files, evaluated.files):
        warnings.warn(replaced_support_line(choice, evaluated), SupportReplacedWarning, stacklevel=3)
    return choice


def same_images(paths: Sequence[str | Path], others: Sequence[str | Path]) -> bool:
    """Whether two lists name the same image files, in any order (a memory bank does not depend on the order)."""
    return {Path(p).resolve() for p in paths} == {Path(p).resolve() for p in others}


def import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def module_from_checkpoint(
    checkpoint: dict[str, Any],
    data: Any,
    model_class: type | None = None,
    settings: dict[str, Any] | None = None,
    source: str = "the checkpoint",
) -> FewShotAnomalyModule:
    """Rebuild the module from the checkpoint's hyper-parameters, with ``settings`` (evaluation settings, e.g.
    ``{"gaussian_sigma": 8}``) applied on top, and load its weights; ``data`` gives the dataset name and category.

    As ``fsad test --ckpt_path``: a ``model_class`` other than the checkpoint's, or a trained-structure setting
    other than the checkpoint's, is refused in one line; changed evaluation settings are printed in one line.
    """
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    if model_class is None:
        class_path = checkpoint_model_class(checkpoint)
        if class_path is None:
            raise CheckpointError("the checkpoint names no model class (model_class); pass model_class=")
        model_class = import_class(class_path)
    module = model_class(**{**hparams, **(settings or {})})
    changes = module.check_checkpoint_settings(checkpoint, data, source)
    if changes:
        print(evaluation_change_line(changes, source), file=sys.stderr)
    module.prepare_for_data(data)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


class Inferencer:
    """Scores images with a fitted module or an exported model; see the module docstring."""

    def __init__(self, run: Callable[[np.ndarray], dict[str, np.ndarray]], metadata: dict[str, Any]) -> None:
        self.run = run
        self.metadata = metadata

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_module(
        cls, module: FewShotAnomalyModule, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> Inferencer:
        """A module whose support set is fitted (``mean``/``std``: the datamodule's, the backbone's by default)."""
        mean = tuple(float(m) for m in (module.backbone.image_mean if mean is None else mean))
        std = tuple(float(s) for s in (module.backbone.image_std if std is None else std))
        detector = DeployedDetector(module.eval(), mean, std).eval()
        device = module.device

        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                outputs = detector(torch.from_numpy(images).to(device))
            return {name: out.cpu().numpy() for name, out in zip(detector.output_names, outputs, strict=True)}

        return cls(run, {"image_size": module.image_size, "eval_size": module.eval_size,
                         "thresholds": module.thresholds.as_dict()})  # fmt: skip

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        support: str | Path | Sequence[str | Path] | None = None,
        model_class: type | None = None,
        category: str | None = None,
        device: str = "cpu",
        settings: dict[str, Any] | None = None,
    ) -> Inferencer:
        """Rebuild the module from a checkpoint and fit it on the support set its run evaluated, or on ``support``.

        Without ``support``, the evaluated support is what ``fsad export`` takes: the ``support.txt`` of the run
        folder a ``<run>/checkpoints/*.ckpt`` lies in, else the memory banks the checkpoint holds (an export's
        ``model.ckpt``, or none when that export was zero-shot). A checkpoint with neither (moved out of its run
        folder, or pretrained on another dataset) raises a :class:`CheckpointError` asking for ``support=``.
        ``support`` (a folder or a list of normal images; ``[]``: zero-shot, for WinCLIP and APRIL-GAN) is used
        instead; when the checkpoint records other images, a :class:`SupportReplacedWarning` says so.
        ``metadata["support_files"]`` and ``metadata["support_source"]`` say which images were fitted.

        The category (prompt texts) and the normalisation come from the checkpoint's datamodule hyper-parameters
        when the fsad CLI wrote it; ``category`` overrides. FineGrainedAD uses the caption record stored in the
        checkpoint. ``settings`` changes evaluation settings (``{"gaussian_sigma": 8}``) and is refused for
        trained-structure ones, as ``fsad test --ckpt_path`` is. A backbone with ``pretrained: null`` is random:
        rebuild it under the same seed as the run (``lightning.seed_everything``) to get the same model.
        """
        state = read_checkpoint(checkpoint)
        data = dict(state.get("datamodule_hyper_parameters") or {})
        if data.get("resize", "antialias") != "antialias":
            raise CheckpointError(f"data.resize: {data['resize']!r} is not supported by the inferencer; use antialias")
        evaluated = recorded_support(checkpoint, state)
        if support is None and evaluated is None:
            raise CheckpointError(
                f"checkpoint {checkpoint}: no support set recorded (no support.txt in its run folder, no memory banks "
                "in it); pass support= (a folder or a list of normal images)"
            )
        category = category or data.get("category")
        data_class = data.get("_class_path")
        dataset_name = getattr(import_class(data_class), "dataset_name", "custom") if data_class else "custom"
        target = SimpleNamespace(category=category, dataset_name=dataset_name)
        module = module_from_checkpoint(state, target, model_class, settings, f"checkpoint {checkpoint}").to(device)
        mean = tuple(data.get("mean") or module.backbone.image_mean)
        std = tuple(data.get("std") or module.backbone.image_std)
        choice = evaluated if support is None else given_support(support, evaluated)
        if choice.refit:
            fit_support_images(module, choice.files, PairedTransform(module.image_size, module.eval_size, mean, std))
        inferencer = cls.from_module(module, mean, std)
        inferencer.metadata.update(support_files=list(choice.files), support_source=choice.source)
        return inferencer

    @classmethod
    def from_export(cls, model_dir: str | Path, backend: str = "auto") -> Inferencer:
        """Load what ``fsad export`` wrote: ``onnx`` (onnxruntime, CPU), ``pt2`` (``torch.export.load``), or
        ``auto`` (ONNX first). A missing or unreadable file raises an :class:`ExportError` naming it."""
        model_dir = Path(model_dir).expanduser()
        metadata = read_metadata(model_dir)
        if backend == "auto":
            backend = "onnx" if (model_dir / ONNX_FILE).is_file() else "pt2"
        if backend == "onnx":
            run = onnx_runner(model_dir / ONNX_FILE)
        elif backend == "pt2":
            run = program_runner(model_dir / PROGRAM_FILE, metadata["outputs"])
        else:
            raise ExportError(f"backend: {backend!r} is not one of auto, onnx, pt2 ({METADATA_FILE} in {model_dir})")
        return cls(run, metadata)

    # ----------------------------------------------------------------- scoring
    def predict(self, image: Any) -> Prediction:
        """Score one image: a path, a PIL image or a uint8 RGB array [H,W,3]."""
        rgb = as_rgb_array(image)
        height, width = rgb.shape[:2]
        outputs = self.run(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]))
        eval_map = torch.from_numpy(outputs["anomaly_map"][:1])
        anomaly_map = F.interpolate(eval_map[:, None], size=(height, width), mode="bilinear", align_corners=False)
        mask = None
        if "pred_mask" in outputs:
            eval_mask = torch.from_numpy(outputs["pred_mask"][:1]).float()[:, None]
            mask = F.interpolate(eval_mask, size=(height, width), mode="nearest")[0, 0].to(torch.uint8).numpy()
        return Prediction(
            score=float(outputs["pred_score"][0]),
            anomaly_map=anomaly_map[0, 0].numpy(),
            label=int(outputs["pred_label"][0]) if "pred_label" in outputs else None,
            mask=mask,
        )


def onnx_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """An onnxruntime (CPU) session on ``path``, as a function of a uint8 batch."""
    if not path.is_file():
        raise ExportError(f"{path} not found (export with --format onnx or both)")
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # InvalidProtobuf, Fail, InvalidGraph...: one line naming the file
        raise ExportError(f"{path}: not a readable ONNX model (corrupt or truncated; export it again) "
                          f"[{type(err).__name__}]") from None  # fmt: skip
    names = [output.name for output in session.get_outputs()]
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {input_name: images}), strict=True))

    return run


def program_runner(path: Path, output_names: Sequence[str]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The ExportedProgram in ``path`` (``torch.export.load``), as a function of a uint8 batch."""
    if not path.is_file():
        raise ExportError(f"{path} not found (export with --format pt2 or both)")
    try:
        program = torch.export.load(str(path)).module()
    except Exception as err:  # a bad zip archive, a truncated weight file, a foreign pickle: one line naming the file
        raise ExportError(f"{path}: not a readable torch.export program (corrupt or truncated; export it again) "
                          f"[{type(err).__name__}]") from None  # fmt: skip

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = program(torch.from_numpy(images))
        return {name: out.numpy() for name, out in zip(output_names, outputs, strict=True)}

    return run
