"""Real-IAD: splits from ``realiad_jsons``, images under ``realiad_<resolution>/``, optional camera-view filter.

``root/realiad_jsons/realiad_jsons/<cat>.json`` (multi-view) or ``root/realiad_jsons/realiad_jsons_sv/<cat>.json``
(single view) hold ``meta`` (``prefix``, ``normal_class``) and ``train``/``test`` entries with ``category``,
``anomaly_class``, ``image_path`` and ``mask_path``. A file lives at ``root/realiad_<res>/<prefix>/<image_path>``.
The camera view ``C1``…``C5`` is part of each file name; ``views: [C1]`` keeps camera 1 only (FineGrainedAD's setup).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from fsad.datamodules.base import FewShotDataModule, Sample
from fsad.datamodules.transforms import DataError

REALIAD_CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "u_block",
    "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip
VIEW_PATTERN = re.compile(r"(?:^|_)(C[1-5])(?:_|\.|$)")


def camera_view(path: str) -> str | None:
    """The camera view (``C1``…``C5``) named in a Real-IAD file name, or ``None``."""
    match = VIEW_PATTERN.search(Path(path).name)
    return match.group(1) if match else None


class RealIADDataModule(FewShotDataModule):
    """Real-IAD with its official JSON splits.

    Extra args:
        resolution: image folder ``realiad_<resolution>`` (256, 512, 1024 or ``raw``).
        single_view: read ``realiad_jsons_sv`` instead of the multi-view ``realiad_jsons``.
        views: keep only these camera views, e.g. ``[C1]``; ``None`` keeps all five.
    """

    dataset_name = "realiad"

    def __init__(
        self,
        *args: Any,
        resolution: Literal[256, 512, 1024, "raw"] = 1024,
        single_view: bool = False,
        views: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.resolution = resolution
        self.single_view = single_view
        bad_views = [v for v in views or [] if not re.fullmatch(r"C[1-5]", v)]
        if bad_views:
            raise ValueError(f"data.views: {bad_views} are not camera views C1..C5")
        self.views = views

    @property
    def json_dir(self) -> Path:
        return self.root / "realiad_jsons" / ("realiad_jsons_sv" if self.single_view else "realiad_jsons")

    @property
    def image_root(self) -> Path:
        return self.root / f"realiad_{self.resolution}"

    def available_categories(self) -> list[str]:
        if not self.json_dir.is_dir():
            raise DataError(f"data.root: split folder {self.json_dir} does not exist (Real-IAD needs realiad_jsons)")
        return sorted(p.stem for p in self.json_dir.glob("*.json"))

    def _split_file(self) -> dict[str, Any]:
        path = self.json_dir / f"{self.category}.json"
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        for key in ("meta", "train", "test"):
            if key not in content:
                raise DataError(f"{path}: missing key {key!r}")
        return content

    def collect_samples(self, split: str) -> list[Sample]:
        content = self._split_file()
        meta = content["meta"]
        prefix = meta.get("prefix", self.category)
        normal_class = meta.get("normal_class", "OK")
        base = self.image_root / prefix
        if not base.is_dir():
            raise DataError(f"data.resolution: image folder {base} does not exist")
        samples = []
        for entry in content[split]:
            if self.views is not None and camera_view(entry["image_path"]) not in self.views:
                continue
            image = base / entry["image_path"]
            if not image.is_file():
                self.problem(f"image {image} listed in {self.json_dir / (self.category + '.json')} does not exist")
                continue
            if entry["anomaly_class"] == normal_class:
                samples.append(Sample(str(image), 0, self.category))
                continue
            mask = base / entry["mask_path"] if entry.get("mask_path") else None
            if mask is None or not mask.is_file():
                self.problem(f"mask missing for defect image {image}: {mask or 'no mask_path in the json'}")
                continue
            samples.append(Sample(str(image), 1, self.category, str(mask), entry["anomaly_class"]))
        return samples
