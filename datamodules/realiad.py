"""Real-IAD: splits from ``realiad_jsons``, images under ``realiad_<resolution>/``, optional camera-view filter.

The JSON splits are found in either published layout: side by side, ``root/realiad_jsons/<cat>.json`` (multi-view)
and ``root/realiad_jsons_sv/<cat>.json`` (single view), as the dataset's README and configs put them; or nested,
``root/realiad_jsons/realiad_jsons{,_sv}/<cat>.json``, as one toolkit unpacks them. Each file holds ``meta`` (``prefix``, ``normal_class``) and ``train``/``test`` entries with ``category``,
``anomaly_class``, ``image_path`` and ``mask_path``. A file lives at ``root/realiad_<res>/<prefix>/<image_path>``.
The camera view ``C1``…``C5`` is part of each file name; ``views: [C1]`` keeps camera 1 only (FineGrainedAD's setup).

Two things the dataset does that MVTec never does, handled as the dataset's own loader does:

* an NG entry whose ``mask_path`` is null is a normal test image (label 0), counted in ``notes["ng_without_mask"]``;
* an NG mask that is all zero (the defect is not visible from that camera) keeps its NG label with an empty mask,
  counted by ``fsad data check`` and never reported as a problem.
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
#: What every ``train``/``test`` entry of a split file must carry (``mask_path`` may be null: a normal view).
ENTRY_KEYS = ("image_path", "anomaly_class")
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
    empty_defect_masks_allowed = True

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
            raise DataError(f"data.views: {bad_views} are not camera views C1..C5")
        self.views = views
        self.notes: dict[str, int] = {"ng_without_mask": 0}

    @property
    def json_dir_candidates(self) -> tuple[Path, Path]:
        """(nested, side by side) locations of the split folder for the chosen view mode."""
        name = "realiad_jsons_sv" if self.single_view else "realiad_jsons"
        return self.root / "realiad_jsons" / name, self.root / name

    @property
    def json_dir(self) -> Path:
        """The first candidate folder that holds JSON splits (the nested one when neither does, for messages)."""
        nested, side_by_side = self.json_dir_candidates
        return next((d for d in (nested, side_by_side) if d.is_dir() and any(d.glob("*.json"))), nested)

    @property
    def image_root(self) -> Path:
        return self.root / f"realiad_{self.resolution}"

    def available_categories(self) -> list[str]:
        if not self.json_dir.is_dir():
            nested, side_by_side = self.json_dir_candidates
            raise DataError(
                f"data.root: no Real-IAD split folder with JSON files at {side_by_side} or {nested} "
                "(unpack realiad_jsons.zip / realiad_jsons_sv.zip under the root)"
            )
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
        if split == "test":
            self.notes["ng_without_mask"] = 0
        split_file = self.json_dir / f"{self.category}.json"
        for position, entry in enumerate(content[split]):
            missing = [key for key in ENTRY_KEYS if not isinstance(entry, dict) or not isinstance(entry.get(key), str)]
            if missing:
                self.problem(f"{split_file}: {split}[{position}] has no {' or '.join(missing)} (a text field)")
                continue
            if self.views is not None and camera_view(entry["image_path"]) not in self.views:
                continue
            image = base / entry["image_path"]
            if not image.is_file():
                self.problem(f"image {image} listed in {split_file} does not exist")
                continue
            if entry["anomaly_class"] == normal_class or not entry.get("mask_path"):
                self.notes["ng_without_mask"] += entry["anomaly_class"] != normal_class
                samples.append(Sample(str(image), 0, self.category))
                continue
            mask = base / entry["mask_path"]
            if not mask.is_file():
                self.problem(f"mask {mask} of defect image {image} does not exist")
                continue
            samples.append(Sample(str(image), 1, self.category, str(mask), entry["anomaly_class"]))
        return samples
