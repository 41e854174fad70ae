"""Lint of MFSC caption records: the text faults a schema cannot see (issue 12).

A record can validate and still carry template filler or facts that fight each other: doubled words, a relation
sentence whose subject and verb disagree in number, a ``value:`` prefix (in the record, or one the prompt builder
would have to add because a caption never names what it describes), duplicated components, defect states taken
from another dataset's list, and a background colour the text contradicts. Every problem names its field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from fsad.lightning_modules.finegrainedad.mfsc import COLORS, CaptionRecord, word_pattern

# Published defect types, as regular expressions over a defect state's text. MVTec AD per category (the dataset's
# test-folder names); Real-IAD's eight types hold for every category (Wang et al., CVPR 2024). VisA publishes
# per-image anomaly descriptions rather than a closed list per category, so VisA records are not checked here.
_MVTEC_TYPES: dict[str, dict[str, str]] = {
    "bottle": {"broken_large": r"large.*break|break.*large|broken", "broken_small": r"small.*break|break.*small",
               "contamination": r"contaminat"},
    "cable": {"bent_wire": r"bent wire", "cable_swap": r"swap", "combined": r"combined",
              "cut_inner_insulation": r"cut inner", "cut_outer_insulation": r"cut outer", "missing_cable": r"missing cable",
              "missing_wire": r"missing wire", "poke_insulation": r"poke"},
    "capsule": {"crack": r"crack", "faulty_imprint": r"imprint", "poke": r"poke", "scratch": r"scratch",
                "squeeze": r"squeez"},
    "carpet": {"color": r"colou?r", "cut": r"\bcut", "hole": r"hole", "metal_contamination": r"metal contaminat",
               "thread": r"thread"},
    "grid": {"bent": r"\bbent", "broken": r"broken|break", "glue": r"glue", "metal_contamination": r"metal contaminat",
             "thread": r"thread"},
    "hazelnut": {"crack": r"crack", "cut": r"\bcut", "hole": r"hole", "print": r"print"},
    "leather": {"color": r"colou?r", "cut": r"\bcut", "fold": r"fold", "glue": r"glue", "poke": r"poke"},
    "metal_nut": {"bent": r"\bbent", "color": r"colou?r", "flip": r"flip", "scratch": r"scratch"},
    "pill": {"color": r"colou?r", "combined": r"combined", "contamination": r"contaminat", "crack": r"crack",
             "faulty_imprint": r"imprint", "pill_type": r"pill.type|type", "scratch": r"scratch"},
    "screw": {"manipulated_front": r"manipulated front", "scratch_head": r"scratch\w* head",
              "scratch_neck": r"scratch\w* neck", "thread_side": r"thread side", "thread_top": r"thread top"},
    "tile": {"crack": r"crack", "glue_strip": r"glue", "gray_stroke": r"gr[ae]y stroke", "oil": r"\boil",
             "rough": r"rough"},
    "toothbrush": {"defective": r"defect"},
    "transistor": {"bent_lead": r"bent lead", "cut_lead": r"cut lead", "damaged_case": r"damaged case",
                   "misplaced": r"misplace"},
    "wood": {"color": r"colou?r", "combined": r"combined", "hole": r"hole", "liquid": r"liquid", "scratch": r"scratch"},
    "zipper": {"broken_teeth": r"broken teeth", "combined": r"combined", "fabric_border": r"fabric border",
               "fabric_interior": r"fabric interior", "rough": r"rough", "split_teeth": r"split teeth",
               "squeezed_teeth": r"squeezed teeth"},
}  # fmt: skip
_REALIAD_TYPES = {
    "pit": r"\bpit", "deformation": r"deform", "abrasion": r"abras", "scratch": r"scratch", "damage": r"damage",
    "missing parts": r"missing", "foreign objects": r"foreign", "contamination": r"contaminat",
}  # fmt: skip
DEFECT_TYPES: dict[str, dict[str, dict[str, str]]] = {"mvtec": _MVTEC_TYPES, "realiad": {"*": _REALIAD_TYPES}}

# Subject–verb pairs (singular, plural) the relation template uses.
_VERB_PAIRS = (
    ("is", "are"), ("was", "were"), ("has", "have"), ("sits", "sit"), ("lies", "lie"), ("belongs", "belong"),
    ("surrounds", "surround"), ("runs", "run"), ("stands", "stand"), ("extends", "extend"), ("joins", "join"),
    ("forms", "form"), ("covers", "cover"), ("holds", "hold"), ("points", "point"), ("radiates", "radiate"),
    ("rests", "rest"), ("connects", "connect"), ("contains", "contain"), ("hangs", "hang"), ("fills", "fill"),
)  # fmt: skip
_SINGULAR_VERBS = {s for s, _ in _VERB_PAIRS}
_PLURAL_VERBS = {p for _, p in _VERB_PAIRS}
_BACKGROUND_NOUNS = r"background|surround|backdrop|tray"
_COLOUR_WORDS = sorted({*COLORS, "gray", "pale", "dark", "light"}, key=len, reverse=True)
_COLOURED_BACKGROUND = re.compile(
    rf"\b((?:{'|'.join(map(re.escape, _COLOUR_WORDS))})(?:\s+(?:{'|'.join(map(re.escape, _COLOUR_WORDS))}))*)\s+"
    rf"(?:{_BACKGROUND_NOUNS})\b",
    flags=re.IGNORECASE,
)
_DOUBLED_WORD = re.compile(r"\b(\w+)\s+\1\b", flags=re.IGNORECASE)
_VALUE_COLON = re.compile(r"^\s*[\w' -]{1,40}:\s")


def text_fields(record: CaptionRecord) -> Iterator[tuple[str, str]]:
    """Every free-text field of a record as (field path, text)."""
    yield "image_level.foreground", record.image_level.foreground
    if record.image_level.background:
        yield "image_level.background", record.image_level.background
    yield "image_level.summary", record.image_level.summary
    if record.foreground_level:
        yield "foreground_level.logical_relation", record.foreground_level.logical_relation
    for i, component in enumerate(record.components):
        yield f"components[{i}].name", component.name
        yield f"components[{i}].caption", component.caption
    for i, state in enumerate(record.abnormal_states):
        yield f"abnormal_states[{i}]", state


def _is_plural_noun(matched: str, name: str) -> bool:
    """``LEDs`` for the name ``LED``, or a name that is itself plural (``bristles``, ``pins``)."""
    word = matched.lower()
    return word != name.lower() or (word.endswith("s") and not word.endswith(("ss", "us")))


def _agreement_problems(record: CaptionRecord) -> Iterator[str]:
    if record.foreground_level is None:
        return
    relation = record.foreground_level.logical_relation
    for component in record.components:
        noun = word_pattern(component.name).pattern
        for match in re.finditer(rf"{noun}\s+(\w+)", relation, flags=re.IGNORECASE):
            if re.search(r"\bof\s+(?:the\s+|a\s+|an\s+|its\s+)?$", relation[: match.start()], flags=re.IGNORECASE):
                continue  # "the spokes of the wheel radiate": the noun is not the subject
            verb = match.group(2).lower()
            plural = _is_plural_noun(match.group(1), component.name)
            if (plural and verb in _SINGULAR_VERBS) or (not plural and verb in _PLURAL_VERBS):
                number = "plural" if plural else "singular"
                yield f"foreground_level.logical_relation: {number} subject {match.group(1)!r} with verb {verb!r}"


def _colon_problems(record: CaptionRecord) -> Iterator[str]:
    """A ``value:`` prefix in the text, or one :func:`mllp_texts` would add because the text never names its noun."""
    for field, text in text_fields(record):
        if _VALUE_COLON.match(text):
            yield f"{field}: starts with a value-colon prefix ({text.split(':')[0]!r})"
    if not word_pattern(record.image_level.foreground).search(record.image_level.summary):
        yield (f"image_level.summary: never names the foreground {record.image_level.foreground!r}, so its abnormal "
               "prompts would be prefixed 'defect:'")  # fmt: skip
    for i, component in enumerate(record.components):
        if not word_pattern(component.name).search(component.caption):
            yield f"components[{i}].caption: never names the component {component.name!r} (prompts would get a prefix)"
        if record.foreground_level and not word_pattern(component.name).search(
            record.foreground_level.logical_relation
        ):
            yield f"foreground_level.logical_relation: never names the component {component.name!r}"


def _duplicate_problems(record: CaptionRecord) -> Iterator[str]:
    seen: dict[str, int] = {}
    for i, component in enumerate(record.components):
        key = re.sub(r"(e?s)$", "", component.name.lower().strip())
        if key in seen:
            yield f"components[{i}].name: {component.name!r} duplicates components[{seen[key]}]"
        seen.setdefault(key, i)


def _defect_type_problems(record: CaptionRecord) -> Iterator[str]:
    lists = DEFECT_TYPES.get(record.dataset)
    own = (lists.get(record.category) or lists.get("*")) if lists else None
    if not own:
        return
    for i, state in enumerate(record.abnormal_states):
        text = state.replace("{}", " ").lower()
        if any(re.search(pattern, text) for pattern in own.values()):
            continue
        elsewhere = [
            f"{dataset} {category} '{name}'"
            for dataset, categories in DEFECT_TYPES.items() if dataset != record.dataset
            for category, types in categories.items() for name, pattern in types.items() if re.search(pattern, text)
        ]  # fmt: skip
        origin = f"; it is from another dataset's list ({', '.join(elsewhere[:3])})" if elsewhere else ""
        yield f"abnormal_states[{i}]: {state!r} is not a {record.dataset} {record.category} defect type{origin}"


def _background_problems(record: CaptionRecord) -> Iterator[str]:
    stated = (record.image_level.background or "").lower()
    for field, text in text_fields(record):
        if field == "image_level.background":
            continue
        for match in _COLOURED_BACKGROUND.finditer(text):
            colour = match.group(1).lower().replace("gray", "grey")
            if not stated:
                yield f"{field}: names a {match.group(0)!r} though image_level.background is left out"
            elif not all(word in stated.replace("gray", "grey") for word in colour.split()):
                yield f"{field}: says {match.group(0)!r} but image_level.background is {record.image_level.background!r}"


def lint_record(record: CaptionRecord) -> list[str]:
    """Every lint problem of a record as ``field: problem``; empty when the record is clean."""
    problems = [f"{field}: doubled word {m.group(0)!r}" for field, text in text_fields(record)
                for m in _DOUBLED_WORD.finditer(text)]  # fmt: skip
    for check in (_agreement_problems, _colon_problems, _duplicate_problems, _defect_type_problems,
                  _background_problems):  # fmt: skip
        problems += check(record)
    return problems
