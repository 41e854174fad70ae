"""``fsad captions import``: the FineGrainedAD authors' records file → one validated MFSC record per category.

The authors publish their image-derived records as a Python module (``PromptAD/fine_grained_prompts.py``): lists of
per-category dicts (``Level_1`` foreground/background, ``Level_2`` entities with number/location and, in later
versions, a relation, ``Level_3`` attributes and per-entity captions, and an overall ``caption``), a
``total_classes2id`` map from category to list index and ``class_state_abnormal_refined`` defect states. The file
is parsed, never executed: every top-level assignment whose value is a literal is read with
:func:`ast.literal_eval`, and any other statement is skipped. Every value that had to be guessed (mapped onto a
closed vocabulary) or dropped is reported, so a user can see what the import changed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fsad.errors import FsadError
from fsad.lightning_modules.finegrainedad.mfsc import (
    LOCATIONS,
    NUMBERS,
    VOCABULARIES,
    CaptionRecord,
    ReleasedRecord,
    normalise_value,
    parse_record,
)

RECORDS_VARIABLE = re.compile(r"^fine_grained_normal_prompts(?:_v(\d+))?$")
INDEX_VARIABLE = "total_classes2id"
STATES_VARIABLE = "class_state_abnormal_refined"
#: Their vocabularies (``fine_grained_<kind>_list``): what their attribute AHPs and component AHPs draw from.
VOCABULARY_KINDS = ("color", "texture", "shape", "location")
KNOWN_CATEGORIES = {
    "mvtec": {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
              "tile", "toothbrush", "transistor", "wood", "zipper"},
    "visa": {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"},
}  # fmt: skip
NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven", "8": "eight"}
GUESSED_NUMBERS = {"multiple": "many", "various": "several", "numerous": "many"}
GUESSED_LOCATIONS = {
    "throughout": "whole", "entire image": "whole", "scattered": "whole", "evenly distributed": "whole",
    "surrounding": "around", "both sides": "edge", "corners": "edge", "top center": "top", "center top": "top",
    "bottom center": "bottom", "center bottom": "bottom", "left center": "left", "right center": "right",
    "left and right": "middle",
}  # fmt: skip
NO_BACKGROUND = {"none", "uniform", ""}
NO_VALUE = {"none", "null", ""}
#: Fields of ``Level_2``/``Level_3`` that hold one value per entity, so must be lists.
LIST_FIELDS = {"entity", "number", "location", "direction", "color", "texture", "shape", "entity_caption"}
COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")


class CaptionImportError(FsadError, ValueError):
    """The records file cannot be read or lacks what an import needs; the message names the file and variable."""


@dataclass
class ImportResult:
    records: dict[str, CaptionRecord]  # category -> record
    written: list[Path]
    report: list[str] = field(default_factory=list)  # "category: field: what was guessed or dropped"


def top_level_assignments(path: Path, what: str) -> Iterator[tuple[str, ast.expr]]:
    """(name, value expression) of every top-level ``NAME = ...`` of a Python source file, parsed, never run;
    ``what`` names the file in errors."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except FileNotFoundError:
        raise CaptionImportError(f"{path}: {what} not found") from None
    except SyntaxError as err:
        if err.lineno is not None:
            raise CaptionImportError(f"{path}: not Python source (line {err.lineno}: {err.msg})") from None
        raise CaptionImportError(f"{path}: not Python source (a binary file: {err.msg})") from None
    except (UnicodeDecodeError, ValueError):  # undecodable bytes, or NUL bytes that older Pythons' ast refuses
        raise CaptionImportError(f"{path}: not Python source (a binary file, or text that is not UTF-8)") from None
    except OSError as err:
        raise CaptionImportError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            yield node.targets[0].id, node.value


def literal(node: ast.expr | None) -> Any:
    """The value of a literal expression, or None for anything else (never evaluated)."""
    try:
        return None if node is None else ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def read_literals(path: Path) -> dict[str, Any]:
    """Every top-level ``NAME = <literal>`` of a Python source file, without executing it."""
    values = {name: literal(value) for name, value in top_level_assignments(path, "records file")}
    return {name: value for name, value in values.items() if value is not None}


def newest_records_variable(literals: dict[str, Any]) -> str | None:
    """The records list with the highest version suffix (``fine_grained_normal_prompts_v3`` beats ``_v2``)."""
    versions = {n: int(m.group(1) or 0) for n in literals if (m := RECORDS_VARIABLE.match(n))}
    return max(versions, key=versions.__getitem__) if versions else None


def _first(level: Any, name: str) -> dict[str, Any]:
    """``Level_N`` (``name``) is a one-element list of dicts in the authors' format; tolerate a bare dict or its
    absence. Any other type, or a field of it that should be a list, is a :class:`CaptionImportError`."""
    if level is None or level == []:
        return {}
    if isinstance(level, list) and isinstance(level[0], dict):
        level = level[0]
    if not isinstance(level, dict):
        raise CaptionImportError(f"{name}: expected a list holding one dict, got {type(level).__name__} {level!r:.40}")
    for key, value in level.items():
        if key in LIST_FIELDS and not isinstance(value, list | None):
            raise CaptionImportError(f"{name}.{key}: expected a list, got {type(value).__name__} {value!r:.40}")
    return level


def _attribute(value: Any, vocabulary: tuple[str, ...], where: str, report: list[str]) -> dict[str, Any]:
    """``blue and white`` → base [blue, white] joined by ``and``; words outside the vocabulary become extensions."""
    text = " ".join(str(value).strip().split())
    if text.lower() in NO_VALUE:
        return {"base": [], "connector": None, "extensions": []}
    connector = next((c for c in ("with", "or", "and") if f" {c} " in f" {text.lower()} "), None)
    parts = [p.strip() for p in re.split(rf"\s+{connector}\s+", text, flags=re.IGNORECASE)] if connector else [text]
    base, extensions = [], []
    for part in parts:
        known = normalise_value(part, vocabulary)
        if known:
            base.append(known)
        else:
            extensions.append(part)
    if extensions:
        report.append(f"{where}: {', '.join(map(repr, extensions))} kept as extension (not in the vocabulary)")
    return {"base": base, "connector": connector if len(parts) > 1 else None, "extensions": extensions}


def _number(value: Any, where: str, report: list[str]) -> str:
    text = str(value).strip().lower()
    if text in NUMBERS:
        return text
    if text in NUMBER_WORDS:
        return NUMBER_WORDS[text]
    guess = GUESSED_NUMBERS.get(text, "several")
    report.append(f"{where}: {value!r} guessed as {guess!r}")
    return guess


def _location(value: Any, where: str, report: list[str]) -> str:
    text = " ".join(str(value).strip().lower().replace("_", " ").split())
    hyphenated = text.replace(" ", "-")
    exact = next((c for c in (text, hyphenated, normalise_value(text, LOCATIONS)) if c in LOCATIONS), None)
    if exact:
        return exact
    guess = GUESSED_LOCATIONS.get(text, "whole")
    report.append(f"{where}: {value!r} guessed as {guess!r}")
    return guess


def _components(entry: dict[str, Any], category: str, report: list[str]) -> list[dict[str, Any]]:
    """One component per distinct entity; repeated entities (four macaroni at four places) merge into one."""
    level2, level3 = _first(entry.get("Level_2"), "Level_2"), _first(entry.get("Level_3"), "Level_3")
    entities = list(level2.get("entity") or [])
    captions = level3.get("entity_caption") or level2.get("entity_caption") or []
    merged: dict[str, dict[str, Any]] = {}
    for i, entity in enumerate(entities):
        where = f"{category}: components[{i}]"

        def column(source: dict[str, Any], key: str, i: int = i, where: str = where) -> Any:
            values = source.get(key) or []
            if i < len(values):
                return values[i]
            report.append(f"{where}.{key}: missing in the source, dropped")
            return "None"

        attributes = {name: _attribute(column(level3, name), vocabulary, f"{where}.attributes.{name}", report)
                      for name, vocabulary in VOCABULARIES.items()}  # fmt: skip
        number = _number(column(level2, "number"), f"{where}.number", report)
        location = _location(column(level2, "location"), f"{where}.location", report)
        if i < len(captions):
            caption = str(captions[i]).strip()
        else:
            colour = attributes["color"]["base"] or attributes["color"]["extensions"]
            caption = f"{number} {' and '.join(colour)} {entity} at the {location}.".replace("  ", " ")
            report.append(f"{where}.caption: no entity caption in the source, written as {caption!r}")
        name = str(entity).strip()
        if name not in merged:
            merged[name] = {"name": name, "number": number, "location": location, "attributes": attributes,
                            "caption": caption, "count": 1}  # fmt: skip
            continue
        first = merged[name]
        first["count"] += 1
        for attribute, values in attributes.items():
            for key in ("base", "extensions"):
                first["attributes"][attribute][key] = list(
                    dict.fromkeys(first["attributes"][attribute][key] + values[key])
                )
        if first["location"] != location:
            first["location"] = "whole"
    components = []
    for name, component in merged.items():
        count = component.pop("count")
        if count > 1:
            component["number"] = COUNT_WORDS[count - 1] if count <= len(COUNT_WORDS) else "many"
            report.append(f"{category}: component {name!r}: {count} source entries merged into one "
                          f"({component['number']}, location {component['location']!r})")  # fmt: skip
        components.append(component)
    return components


def read_cluster_maps(path: Path) -> dict[str, list[int]]:
    """Their fixed region maps (``datasets/cluster_gt/visa.py``: ``pcb2 = torch.tensor([...]).unsqueeze(0)``):
    category → the label of every 60×60 support token. Parsed, never run: the list inside each call is a literal."""
    maps = {}
    for name, value in top_level_assignments(path, "cluster map file"):
        labels = literal(next((n for n in ast.walk(value) if isinstance(n, ast.List)), None))
        if isinstance(labels, list) and labels and all(isinstance(v, int) for v in labels):
            maps[name] = labels
    return maps


def released_fields(
    entry: dict[str, Any], category: str, states: list[str] | None, vocabularies: dict[str, list[str]],
    report: list[str], cluster_map: list[int] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """The record verbatim, as their prompt learner reads it, with their defect states and vocabularies
    (:class:`ReleasedRecord`); None, reported, when the file lacks what their learner would read."""
    if len(vocabularies) < len(VOCABULARY_KINDS):
        return None  # reported once for the whole file
    if not states:
        report.append(f"{category}: released: not kept (no defect states in {STATES_VARIABLE}); variant: code "
                      "builds fsad's approximation of their prompt strings for it")  # fmt: skip
        return None
    level1, level2, level3 = (_first(entry.get(f"Level_{n}"), f"Level_{n}") for n in (1, 2, 3))
    fields = {
        "cluster_map": cluster_map,
        "caption": entry.get("caption"), "foreground": level1.get("foreground"), "background": level1.get("background"),
        "entities": level2.get("entity"), "entity_captions": level3.get("entity_caption"),
        "locations": level2.get("location"), "relation": level2.get("relation"), "colors": level3.get("color"),
        "textures": level3.get("texture"), "shapes": level3.get("shape"), "states": states,
        **{f"{kind}_vocabulary": vocabularies[kind] for kind in VOCABULARY_KINDS},
    }  # fmt: skip
    try:
        ReleasedRecord.model_validate(fields)
    except ValidationError as err:
        where = ", ".join(sorted({str(e["loc"][0]) if e["loc"] else e["msg"] for e in err.errors()}))
        report.append(f"{category}: released: not kept ({where} missing or malformed); variant: code builds fsad's "
                      "approximation of their prompt strings for it")  # fmt: skip
        return None
    return fields


def convert_entry(
    entry: dict[str, Any], category: str, states: list[str] | None, provenance: dict[str, Any], dataset: str,
    report: list[str], origin: str = "imported record", vocabularies: dict[str, list[str]] | None = None,
    cluster_map: list[int] | None = None,
) -> CaptionRecord:  # fmt: skip
    """One authors' record → one validated :class:`CaptionRecord`; guesses and drops go to ``report``. With their
    vocabularies the record also keeps the source verbatim (``released``), for ``variant: code``'s exact strings."""
    level1, level2 = _first(entry.get("Level_1"), "Level_1"), _first(entry.get("Level_2"), "Level_2")
    background = str(level1.get("background", "")).strip()
    if background.lower() in NO_BACKGROUND:
        report.append(f"{category}: image_level.background: {background!r} dropped (no distinct background)")
        background = None
    relation = str(level2.get("relation", "")).strip()
    if not relation:
        report.append(f"{category}: foreground_level: the source has no relation sentence, dropped")
    if states:
        abnormal = [" ".join(s.split()) for s in states]
    else:
        abnormal = ["damaged {}", "{} with a defect"]
        report.append(f"{category}: abnormal_states: none in {STATES_VARIABLE}, guessed as {abnormal}")
    data = {
        "dataset": dataset,
        "category": category,
        "provenance": provenance,
        "image_level": {"foreground": str(level1.get("foreground", category)).strip(), "background": background,
                        "summary": str(entry.get("caption", "")).strip()},
        "foreground_level": {"logical_relation": relation} if relation else None,
        "components": _components(entry, category, report),
        "abnormal_states": abnormal,
        "released": released_fields(entry, category, states, vocabularies or {}, report, cluster_map),
    }  # fmt: skip
    return parse_record(data, origin)


def import_authors_records(
    source: Path, out: Path, variable: str | None = None, dataset: str | None = None, cluster_maps: Path | None = None
) -> ImportResult:
    """Read the authors' records file and write ``out/<dataset>/<category>.json`` for every category in it.

    ``cluster_maps`` (their ``datasets/cluster_gt/visa.py``; by default looked for in the repository holding
    ``source``) gives the fixed region maps their training uses instead of clustering (VisA ``pcb2``).

    Every record is converted and validated before the first file is written, so a failure leaves nothing behind.
    """
    literals = read_literals(source)
    variable = variable or newest_records_variable(literals)
    entries = literals.get(variable) if variable else None
    if not isinstance(entries, list):
        found = sorted(n for n in literals if RECORDS_VARIABLE.match(n))
        raise CaptionImportError(f"{source}: no records list {variable or 'fine_grained_normal_prompts*'} "
                                 f"(literal lists found: {found or 'none'})")  # fmt: skip
    index = literals.get(INDEX_VARIABLE)
    if not isinstance(index, dict):
        raise CaptionImportError(f"{source}: {INDEX_VARIABLE} (category -> index into {variable}) not found")
    all_states = literals.get(STATES_VARIABLE) if isinstance(literals.get(STATES_VARIABLE), dict) else {}
    vocabularies = {
        kind: literals[f"fine_grained_{kind}_list"] for kind in VOCABULARY_KINDS
        if isinstance(literals.get(f"fine_grained_{kind}_list"), list)
    }  # fmt: skip
    missing = [f"fine_grained_{kind}_list" for kind in VOCABULARY_KINDS if kind not in vocabularies]
    provenance = {
        "kind": "image-derived",
        "source": "imported with `fsad captions import` from the FineGrainedAD authors' records file",
        "date": date.today().isoformat(),
        "generator": {"model": "not stated in the source file", "prompt_id": variable},
        "imported_from": {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                          "variable": variable},
    }  # fmt: skip
    result = ImportResult(records={}, written=[])
    beside = source.resolve().parents[1] / "datasets" / "cluster_gt" / "visa.py"
    maps = read_cluster_maps(cluster_maps or beside) if cluster_maps or beside.is_file() else {}
    for category in maps:
        result.report.append(f"{category}: released.cluster_map: their fixed region map kept ({len(maps[category])} "
                             "labels); variant: code trains with it instead of clustering")  # fmt: skip
    result.report.append("provenance.generator.model: the file does not name the MLLM; recorded as 'not stated'")
    if missing:
        result.report.append(f"released: {', '.join(missing)} not in the file; variant: code builds fsad's "
                             "approximation of their prompt strings instead of their exact ones")  # fmt: skip
    for category, position in index.items():
        if not isinstance(position, int) or not 0 <= position < len(entries) or not isinstance(entries[position], dict):
            result.report.append(
                f"{category}: {INDEX_VARIABLE} points at {position!r}, not a record in {variable}; skipped"
            )
            continue
        owner = dataset or next((d for d, names in KNOWN_CATEGORIES.items() if category in names), None)
        if owner is None:
            owner = "custom"
            result.report.append(f"{category}: dataset guessed as 'custom' (pass --dataset to name it)")
        origin = f"{source}: {variable}[{position}] ({category})"
        try:
            result.records[category] = convert_entry(
                entries[position],
                category,
                all_states.get(category),
                provenance,
                owner,
                result.report,
                origin,
                vocabularies,
                maps.get(category),
            )
        except CaptionImportError as err:  # a level or field of another type than the authors' format
            raise CaptionImportError(f"{origin}: {err}") from None
    for category, record in result.records.items():
        path = out / record.dataset / f"{category}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(record.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n")
        staging.replace(path)
        result.written.append(path)
    return result
