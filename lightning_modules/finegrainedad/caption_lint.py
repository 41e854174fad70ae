"""Lint of MFSC caption records: the text faults a schema cannot see (issue 12).

A record can validate and still carry template filler or facts that fight each other: doubled words, a count whose
noun disagrees with it in number ("several direction"), a doubled "with … with" in one clause, a relation sentence
whose subject and verb disagree in number, a ``value:`` prefix (in the record, or one the prompt builder
would have to add because a caption never names what it describes), duplicated components, defect states taken
from another dataset's list, and a background colour the text contradicts. Every problem names its field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from fsad.lightning_modules.finegrainedad.mfsc import (
    COLORS,
    NUMBERS,
    SINGULAR_NUMBERS,
    SLOT_VOCABULARIES,
    CaptionRecord,
    word_pattern,
)

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
# Words that end the noun phrase a count opens: prepositions, conjunctions and the plural verbs above (their
# singular forms are left out: "points" and "forms" are nouns too).
_PHRASE_WORDS = "with on in at of and or near from to along around inside outside that which who is are was were has"
_PHRASE_END = frozenset(
    f"{_PHRASE_WORDS} have each both per against across over under between by for into onto while where".split()
)
_PHRASE_END |= _PLURAL_VERBS
_ATTRIBUTE_WORDS = frozenset(w for values in SLOT_VOCABULARIES.values() for v in values for w in v.split())
_IRREGULAR_PLURALS = frozenset(("teeth", "macaroni", "people", "feet", "children", "mice"))
_COUNT = re.compile(rf"\b(a single|{'|'.join(NUMBERS)})\b", flags=re.IGNORECASE)
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
    return word != name.lower() or _looks_plural(word)


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
    """A ``value:`` prefix :func:`mllp_texts` would add because the text never names its noun."""
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


def _looks_plural(word: str) -> bool:
    """A plural-looking noun: ``LEDs``, ``teeth``, ``macaroni``; not ``glass``, ``apparatus``, ``axis``."""
    word = word.lower()
    return word in _IRREGULAR_PLURALS or (word.endswith("s") and not word.endswith(("ss", "us", "is")))


def _head_nouns(words: list[str]) -> list[str]:
    """The nouns of a count's phrase: its words up to the first preposition, conjunction, adverb (``-ly``) or verb,
    without attribute values (adjectives) and rendered placeholders (``color-slot``). An ``-ed``/``-ing`` word is
    read as an adjective when a noun follows it ("four protruding edges") and ends the phrase otherwise."""
    nouns = []
    for i, word in enumerate(words):
        lower = word.lower()
        if lower in _PHRASE_END or lower.endswith("ly") or lower in ("spread", "set", "laid"):
            break
        if lower.endswith(("ed", "ing")) and lower not in _ATTRIBUTE_WORDS:
            following = words[i + 1].lower() if i + 1 < len(words) else None
            if following is None or following in _PHRASE_END:
                break
            continue
        if lower not in _ATTRIBUTE_WORDS and not lower.startswith("non-") and not lower.endswith("-slot"):
            nouns.append(lower)
    return nouns


def _count_problems(text: str) -> Iterator[str]:
    """A count whose noun disagrees with it: "several direction" (plural count, no plural noun), "one LEDs"."""
    for sentence in re.split(r"[,.;:()]", text):
        for match in _COUNT.finditer(sentence):
            count = match.group(1).lower()
            nouns = _head_nouns(sentence[match.end() :].split())
            if not nouns:
                continue  # "one of the …", "one black and one transparent"
            singular = count in (*SINGULAR_NUMBERS, "a single")
            if singular and len(nouns) == 1 and _looks_plural(nouns[0]):
                yield f"singular count {count!r} with plural noun {nouns[0]!r}"
            elif not singular and not any(_looks_plural(noun) for noun in nouns):
                yield f"plural count {count!r} with singular noun {nouns[-1]!r}"


def _doubled_preposition_problems(text: str) -> Iterator[str]:
    """Two "with" in one clause ("screw with a scratch with a round head"): a defect concatenated onto a noun that
    already had a "with" phrase; clauses split at punctuation and at "and"."""
    for clause in re.split(r"[,.;:()]|\band\b", text, flags=re.IGNORECASE):
        if len(re.findall(r"\bwith\b", clause, flags=re.IGNORECASE)) > 1:
            yield f"doubled preposition 'with … with' in {clause.strip()!r}"


def lint_text(text: str) -> list[str]:
    """The sentence-level problems of one text (a record field or a prompt body): doubled word, count–noun number
    disagreement, "with … with" in one clause, a ``value:`` prefix."""
    problems = [f"doubled word {m.group(0)!r}" for m in _DOUBLED_WORD.finditer(text)]
    problems += _count_problems(text)
    problems += _doubled_preposition_problems(text)
    if _VALUE_COLON.match(text):
        problems.append(f"starts with a value-colon prefix ({text.split(':')[0]!r})")
    return problems


def lint_record(record: CaptionRecord) -> list[str]:
    """Every lint problem of a record as ``field: problem``; empty when the record is clean."""
    problems = [f"{field}: {problem}" for field, text in text_fields(record) for problem in lint_text(text)]
    for check in (_agreement_problems, _colon_problems, _duplicate_problems, _defect_type_problems,
                  _background_problems):  # fmt: skip
        problems += check(record)
    return problems
