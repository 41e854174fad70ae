"""One review picture per image, shared by the test heatmaps and the predict overlays, and its delivery to every
configured logger (W&B, TensorBoard, MLflow) besides the PNG on disk.

A picture is ``image | heat overlay with contours | colour bar`` above a caption strip:

* the overlay blends the colour-mapped raw anomaly map (JET: blue = low, red = high) into the image and draws the
  ground-truth defect outline (white) and the predicted-mask outline (magenta) on it, so heat and defect are
  compared in one panel. Neither colour can arise from the blend (JET never has all three channels high, nor red
  and blue high with no green), so the outlines stay recognisable;
* the colour bar labels the two ends of the :class:`ColourScale` and marks its threshold, when there is one;
* the caption holds the image score, the ground-truth label, the predicted label and the defect type.

Maps are raw scores of any real range (the batch contract): a scale is always chosen from data, never assumed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from fsad.lightning_modules.components.thresholds import DecisionThresholds
from fsad.run_folder import write_image

GROUND_TRUTH_RGB = (255, 255, 255)
PREDICTED_RGB = (255, 0, 255)
MIN_DISPLAY_HEIGHT = 256
COLOUR_BAR_WIDTH = 96
CAPTION_LINE_HEIGHT = 20
GAP = 4
FONT = cv2.FONT_HERSHEY_SIMPLEX
LOGGER_NAMES = {WandbLogger: "W&B", TensorBoardLogger: "TensorBoard", MLFlowLogger: "MLflow"}


@dataclass(frozen=True)
class ColourScale:
    """The raw values at the two ends of the colour map, an optional threshold to mark, and how they were chosen."""

    low: float
    high: float
    threshold: float | None = None
    source: str = ""

    def scaled(self, values: np.ndarray) -> np.ndarray:
        """``values`` mapped to [0,1] over ``low..high`` (clipped: only the display saturates, never the data)."""
        return np.clip((values - self.low) / max(self.high - self.low, 1e-12), 0.0, 1.0)

    def describe(self) -> str:
        text = f"{self.source} scale {self.low:.4g}..{self.high:.4g}"
        return text + (f", threshold {self.threshold:.4g}" if self.threshold is not None else "")


def run_scale(low: float, high: float, threshold: float | None = None, source: str = "per-run") -> ColourScale:
    """The min–max of the maps seen, widened to include ``threshold`` so its mark stays on the bar."""
    if threshold is not None and math.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    else:
        threshold = None
    if not high > low:  # a constant map: any non-empty range shows it as one colour
        high = low + 1.0
    return ColourScale(float(low), float(high), threshold, source)


def calibrated_scale(threshold: float, low: float, high: float, marked: float | None = None) -> ColourScale:
    """The calibrated min–max normalisation ``clip((x − t)/(max − min) + ½, 0, 1)`` as a raw range: the bar spans
    ``t ± (max − min)/2`` and the threshold sits in its middle (``marked`` is the effective threshold, when the
    sensitivity moves it)."""
    half = max(high - low, 1e-12) / 2
    return ColourScale(threshold - half, threshold + half, threshold if marked is None else marked, "calibrated")


def fitted_threshold(thresholds: DecisionThresholds, level: Literal["image", "pixel"]) -> float | None:
    """The raw value at which the model decides ``level`` (sensitivity applied); None when not fitted."""
    threshold, low, high = (getattr(thresholds, f"{level}_{name}") for name in ("threshold", "min", "max"))
    return float(thresholds.effective_threshold(threshold, low, high)) if math.isfinite(float(threshold)) else None


def thresholds_scale(thresholds: DecisionThresholds) -> ColourScale | None:
    """The calibrated scale of a model with fitted pixel threshold and range (None without them)."""
    fitted = [float(getattr(thresholds, f"pixel_{name}")) for name in ("threshold", "min", "max")]
    if not all(math.isfinite(value) for value in fitted):
        return None
    return calibrated_scale(*fitted, marked=fitted_threshold(thresholds, "pixel"))


@dataclass(frozen=True)
class ReviewCaption:
    """What the caption strip says about one image; ``None`` fields are shown as unknown."""

    score: float
    ground_truth: int | None = None
    predicted: int | None = None
    defect_type: str | None = None
    decided_by: str = ""

    def lines(self) -> list[str]:
        def label(value: int | None) -> str:
            return "?" if value is None else ("anomalous" if value else "normal")

        first = f"score {self.score:.4g}   gt: {label(self.ground_truth)}   pred: {label(self.predicted)}"
        second = [f"defect type: {self.defect_type}"] if self.defect_type else []
        return [first, *second] + ([f"pred by {self.decided_by}"] if self.decided_by else [])

    def text(self) -> str:
        return " | ".join(self.lines())


def _outline(canvas: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int], thickness: int) -> None:
    if mask is None or not mask.any():
        return
    height, width = canvas.shape[:2]
    resized = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    outlines, _ = cv2.findContours(resized, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, outlines, -1, colour, thickness=thickness)


def colour_map(scaled: np.ndarray) -> np.ndarray:
    """RGB uint8 JET colours of values in [0,1]."""
    return cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def colour_bar(height: int, scale: ColourScale) -> np.ndarray:
    """A vertical bar (high at the top) with the range ends written beside it and the threshold marked."""
    bar = np.full((height, COLOUR_BAR_WIDTH, 3), 255, dtype=np.uint8)
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(16, axis=1)
    bar[:, 4:20] = colour_map(ramp)
    cv2.putText(bar, f"{scale.high:.3g}", (24, 12), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, f"{scale.low:.3g}", (24, height - 4), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if scale.threshold is not None:
        row = int(round((1.0 - float(scale.scaled(np.float64(scale.threshold)))) * (height - 1)))
        cv2.line(bar, (0, row), (22, row), (0, 0, 0), 2)
        cv2.putText(bar, f"t={scale.threshold:.3g}", (24, min(max(row + 4, 26), height - 16)), FONT, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
    return bar


def render_review(
    image: np.ndarray, anomaly_map: np.ndarray, scale: ColourScale, caption: ReviewCaption,
    ground_truth: np.ndarray | None = None, predicted: np.ndarray | None = None, alpha: float = 0.5,
) -> np.ndarray:  # fmt: skip
    """The review picture of one image (RGB uint8): ``image | overlay with outlines | colour bar`` over the caption.

    Panels are at least :data:`MIN_DISPLAY_HEIGHT` pixels high (the map is enlarged bilinearly, masks by nearest
    neighbour) so small evaluation sizes stay readable.
    """
    map_height, map_width = anomaly_map.shape
    zoom = max(1.0, MIN_DISPLAY_HEIGHT / map_height)
    height, width = int(round(map_height * zoom)), int(round(map_width * zoom))
    picture = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    heat = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    overlay = cv2.addWeighted(picture, 1 - alpha, colour_map(scale.scaled(heat)), alpha, 0)
    thickness = max(1, int(zoom))
    _outline(overlay, predicted, PREDICTED_RGB, thickness + 1)
    _outline(overlay, ground_truth, GROUND_TRUTH_RGB, thickness)  # on top: the truth stays visible
    gap = np.full((height, GAP, 3), 255, dtype=np.uint8)
    top = np.concatenate([picture, gap, overlay, gap, colour_bar(height, scale)], axis=1)
    lines = [*caption.lines(), scale.describe()]
    strip = np.full((CAPTION_LINE_HEIGHT * len(lines) + GAP, top.shape[1], 3), 255, dtype=np.uint8)
    for number, line in enumerate(lines):
        cv2.putText(strip, line, (4, CAPTION_LINE_HEIGHT * (number + 1) - 6), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([top, strip], axis=0)


def overlay_region(picture: np.ndarray, map_shape: tuple[int, int]) -> np.ndarray:
    """The overlay panel of a picture made by :func:`render_review` from a map of ``map_shape`` (for inspection)."""
    map_height, map_width = map_shape
    zoom = max(1.0, MIN_DISPLAY_HEIGHT / map_height)
    height, width = int(round(map_height * zoom)), int(round(map_width * zoom))
    return picture[:height, width + GAP : 2 * width + GAP]


def write_png(path: Path, picture: np.ndarray) -> None:
    """Write an RGB picture as PNG, creating its folder; a failed write (a full disk) raises, naming the file."""
    write_image(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


def send_to_loggers(
    trainer: Trainer, key: str, names: Sequence[str], pictures: Sequence[np.ndarray], captions: Sequence[str]
) -> None:
    """The same pictures to every W&B, TensorBoard and MLflow logger of ``trainer`` (``names`` like
    ``scratch/003``); a logger that fails only warns: review images never end a run."""
    if not pictures:
        return
    for logger in trainer.loggers:
        try:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=list(pictures), caption=list(captions))
            elif isinstance(logger, TensorBoardLogger):
                for name, picture in zip(names, pictures, strict=True):
                    logger.experiment.add_image(f"{key}/{name}", picture, trainer.global_step, dataformats="HWC")
                logger.experiment.flush()
            elif isinstance(logger, MLFlowLogger):
                for name, picture in zip(names, pictures, strict=True):
                    logger.experiment.log_image(logger.run_id, picture, artifact_file=f"{key}/{name}.png")
        except Exception as err:  # an offline, disabled or unreachable logger must never end the run
            warnings.warn(
                f"could not log {key} to {LOGGER_NAMES.get(type(logger), type(logger).__name__)} "
                f"({type(err).__name__}: {err})", UserWarning,
                stacklevel=2,
            )  # fmt: skip
