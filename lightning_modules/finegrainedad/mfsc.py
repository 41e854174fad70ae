"""MFSC: multi-level fine-grained semantic caption records (FineGrainedAD §3.2), their schema and their prompts.

One JSON record per (dataset, category) describes what a normal object looks like at three levels: the image
(foreground, background, summary), the foreground (the logical relation of its components) and each component
(count, location, and colour/texture/shape/direction attributes with base values from closed vocabularies plus
``and``/``or``/``with`` extensions). :func:`mllp_texts` turns a record into the prompt bodies of every level.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fsad.errors import FsadError
from fsad.lightning_modules.components.prompts import PromptGroupTexts, slot

CAPTIONS_DIR = Path(__file__).parent / "captions"

COLORS = (
    "black", "white", "grey", "light grey", "dark grey", "silver", "gold", "brown", "dark brown", "light brown",
    "beige", "light beige", "red", "dark red", "orange", "light orange", "yellow", "green", "dark green",
    "light green", "blue", "dark blue", "light blue", "purple", "pink",
    "transparent", "copper", "bronze", "cream", "tan", "olive", "turquoise",
)  # fmt: skip
TEXTURES = (
    "smooth", "glossy", "matte", "rough", "grainy", "woven", "fibrous", "porous", "metallic", "ribbed", "striped",
    "granular", "wrinkled", "leathery", "wooden", "translucent", "powdery", "threaded", "knurled", "plastic",
    "printed", "speckled", "soft", "bristled",
)  # fmt: skip
SHAPES = (
    "round", "circular", "oval", "rectangular", "square", "cylindrical", "hexagonal", "elongated", "curved",
    "flat", "irregular", "tubular", "spherical", "ring", "grid", "triangular", "cross", "spiral", "u-shaped",
    "conical", "wavy", "crescent", "semi-circular", "kidney-shaped", "diamond-shaped",
)  # fmt: skip
DIRECTIONS = ("horizontal", "vertical", "diagonal", "upright", "tilted", "radial", "parallel", "centred", "any")
LOCATIONS = (
    "center", "top", "bottom", "left", "right", "top-left", "top-right", "bottom-left", "bottom-right",
    "around", "whole", "edge", "middle", "inside", "outside", "both sides", "corners",
)  # fmt: skip
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "several", "many")
VOCABULARIES = {"color": COLORS, "texture": TEXTURES, "shape": SHAPES, "direction": DIRECTIONS}
SYNONYMS = {
    "gray": "grey", "colour": "color", "centre": "center", "clear": "transparent", "shiny": "glossy",
    "circle": "circular", "cylinder": "cylindrical", "rectangle": "rectangular", "hexagon": "hexagonal",
    "oblong": "elongated", "centered": "centred", "middle": "middle", "sphere": "spherical", "dull": "matte",
}  # fmt: skip


class CaptionRecordError(FsadError, ValueError):
    """A caption record that cannot be read or fails the schema; the message names the file and the field."""


def normalise_value(value: str, vocabulary: tuple[str, ...]) -> str | None:
    """Map free text (case, plural, British/American spelling, common synonyms) to a vocabulary value, or None."""
    text = " ".join(value.strip().lower().replace("_", " ").split())
    text = SYNONYMS.get(text, text)
    candidates = [text, text.rstrip("s"), text[:-2] if text.endswith("es") else text]
    return next((c for c in candidates if c in vocabulary), None)


class Attribute(BaseModel):
    """Base values from a closed vocabulary, joined by ``connector``, plus free extension values."""

    model_config = ConfigDict(extra="forbid")
    base: list[str] = Field(default_factory=list)
    connector: Literal["and", "or", "with"] | None = None
    extensions: list[str] = Field(default_factory=list)

    def render(self) -> str:
        """``transparent and black``; extensions follow the base values."""
        values = [*self.base, *self.extensions]
        return f" {self.connector or 'and'} ".join(values)


class Attributes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: Attribute = Field(default_factory=Attribute)
    texture: Attribute = Field(default_factory=Attribute)
    shape: Attribute = Field(default_factory=Attribute)
    direction: Attribute = Field(default_factory=Attribute)

    @model_validator(mode="after")
    def _base_values_in_vocabularies(self) -> Attributes:
        for name, vocabulary in VOCABULARIES.items():
            for value in getattr(self, name).base:
                if value not in vocabulary:
                    raise ValueError(f"{name}.base: {value!r} is not a known {name} (known: {', '.join(vocabulary)})")
        return self


ComponentField = Literal["name", "number", "location", "color", "texture", "shape", "direction"]


class Component(BaseModel):
    """One component; ``sources`` names, per stated fact, the provenance entry it comes from (the part of a
    ``provenance.documentation`` entry before its colon); a ``documentation`` record must name one for each."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    number: str
    location: str
    attributes: Attributes
    caption: str = Field(min_length=1)
    sources: dict[ComponentField, str] = Field(default_factory=dict)

    def stated_fields(self) -> list[str]:
        """The facts this component states: name, count, location and every attribute with a value."""
        kinds = [k for k in VOCABULARIES if getattr(self.attributes, k).base or getattr(self.attributes, k).extensions]
        return ["name", "number", "location", *kinds]

    @field_validator("number", "location")
    @classmethod
    def _in_vocabulary(cls, value: str, info: ValidationInfo) -> str:
        vocabulary = NUMBERS if info.field_name == "number" else LOCATIONS
        if value not in vocabulary:
            raise ValueError(f"{value!r} is not a known {info.field_name} (known: {', '.join(vocabulary)})")
        return value


class ImageLevel(BaseModel):
    """The image level. ``background`` is None where no distinct background exists (texture categories) or where
    it could not be checked (generic records); the background prompts then say only ``background``."""

    model_config = ConfigDict(extra="forbid")
    foreground: str = Field(min_length=1)
    background: str | None = Field(default=None, min_length=1)
    summary: str = Field(min_length=1)
    sources: dict[Literal["foreground", "background"], str] = Field(default_factory=dict)

    def stated_fields(self) -> list[str]:
        """The facts the image level states: the object, and the background where one is given."""
        return ["foreground", *(["background"] if self.background else [])]


class ForegroundLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    logical_relation: str = Field(min_length=1)


GENERIC_SOURCE = "category name and dataset defect list only"


class Generator(BaseModel):
    """Who wrote the descriptions: a multimodal model's name (or ``hand-written``) and the prompt version."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    prompt_id: str = Field(min_length=1)


class ImageHash(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ImportedFrom(BaseModel):
    """The records file an imported record came from (``fsad captions import``)."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    variable: str = Field(min_length=1)


class Provenance(BaseModel):
    """Where a record's facts come from, so a user can tell how far to trust it (issue 12).

    ``image-derived``: a generator described images (their hashes) or the record was imported from a records file
    made that way; ``documentation``: written from the dataset papers and pages listed; ``generic``: nothing beyond
    the category name and the dataset's published defect list, hence no components.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["image-derived", "documentation", "generic"]
    source: str = Field(min_length=1)
    date: date
    generator: Generator | None = None
    images: list[ImageHash] = Field(default_factory=list)
    imported_from: ImportedFrom | None = None
    documentation: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _source_fits_kind(self) -> Provenance:
        if self.kind == "image-derived":
            if self.generator is None:
                raise ValueError("an image-derived record names its generator (model and prompt_id)")
            if not self.images and self.imported_from is None:
                raise ValueError(
                    "an image-derived record lists the hashes of its images or the file it was imported from"
                )
        elif self.kind == "documentation" and not self.documentation:
            raise ValueError("a documentation record lists the documentation it was written from")
        elif self.kind == "generic" and self.source != GENERIC_SOURCE:
            raise ValueError(f"a generic record's source is {GENERIC_SOURCE!r}")
        return self


class ReleasedRecord(BaseModel):
    """The authors' record as their prompt learner reads it, verbatim, with the vocabularies and defect states it
    draws from; ``fsad captions import`` keeps it so that ``variant: code`` builds their exact prompt strings
    (:func:`released_prompt_texts`). Our schema normalises these values, which their strings do not."""

    model_config = ConfigDict(extra="forbid")
    caption: str  # the image-level summary
    foreground: str  # Level_1 foreground: the object name their image and relation AHPs replace
    background: str  # Level_1 background, before " background"
    entities: list[str]  # Level_2 entity names …
    entity_captions: list[str]  # … their Level_3 captions …
    locations: list[str]  # … and their Level_2 locations
    relation: str
    colors: list[str]  # Level_3 values, joined by "." in their attribute NHPs
    textures: list[str]
    shapes: list[str]
    states: list[str] = Field(min_length=1)  # class_state_abnormal_refined[category], "{}" = the object
    color_vocabulary: list[str]  # fine_grained_color_list: every value not in ``colors`` is a colour AHP
    texture_vocabulary: list[str]
    shape_vocabulary: list[str]
    location_vocabulary: list[str]  # fine_grained_location_list: a component AHP moves the component to one
    cluster_map: list[int] | None = None  # their fixed 60×60 region labels for this category (VisA pcb2), or None

    @model_validator(mode="after")
    def _entities_aligned(self) -> ReleasedRecord:
        if not len(self.entities) == len(self.entity_captions) == len(self.locations):
            raise ValueError("entities, entity_captions and locations must have one entry per entity")
        return self


class CaptionRecord(BaseModel):
    """One category's MFSC record; ``released`` is the authors' record verbatim when it was imported from theirs."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    category: str
    provenance: Provenance
    image_level: ImageLevel
    foreground_level: ForegroundLevel | None = None
    components: list[Component] = Field(default_factory=list)
    abnormal_states: list[str] = Field(min_length=1)
    released: ReleasedRecord | None = None

    @field_validator("abnormal_states")
    @classmethod
    def _one_placeholder(cls, states: list[str]) -> list[str]:
        for i, state in enumerate(states):
            if state.count("{}") != 1:
                raise ValueError(f"[{i}] {state!r} must contain exactly one '{{}}' for the object name")
        return states

    @model_validator(mode="after")
    def _components_fit_kind(self) -> CaptionRecord:
        generic = self.provenance.kind == "generic"
        if generic and (self.components or self.foreground_level):
            raise ValueError("a generic record has no components and no foreground_level (nothing was checked)")
        if not generic and not self.components:
            raise ValueError("components: a non-generic record describes at least one component")
        return self

    @model_validator(mode="after")
    def _documented_facts_name_their_source(self) -> CaptionRecord:
        """Each fact of a ``documentation`` record (object, background, and every component's name, count, location,
        colour, texture, shape and direction) names the documentation entry that supports it."""
        if self.provenance.kind != "documentation":
            return self
        labels = [entry.split(":", 1)[0] for entry in self.provenance.documentation]
        parts = [("image_level", self.image_level), *((f"components[{i}]", c) for i, c in enumerate(self.components))]
        for where, part in parts:
            for name in part.stated_fields():
                source = part.sources.get(name)
                if source is None:
                    raise ValueError(f"{where}.sources.{name}: a documentation record names the source of each fact")
                if source not in labels:
                    raise ValueError(f"{where}.sources.{name}: {source!r} is not a listed documentation entry {labels}")
        return self

    @property
    def is_generic(self) -> bool:
        """True for a record without components: FineGrainedAD then runs the image and background levels only."""
        return not self.components


def _field_path(location: tuple) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def parse_record(data: dict, source: str) -> CaptionRecord:
    """Validate a record dict; errors name ``source`` and every failing field."""
    try:
        return CaptionRecord.model_validate(data)
    except ValidationError as err:
        messages = [(_field_path(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in err.errors()]
        problems = "; ".join(f"{path}: {message}" if path else message for path, message in messages)
        raise CaptionRecordError(f"{source}: {problems}") from None


def load_record(path: str | Path) -> CaptionRecord:
    """Read and validate one record file; every failure is one :class:`CaptionRecordError` naming file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaptionRecordError(f"{path}: caption record file not found") from None
    except json.JSONDecodeError as err:
        raise CaptionRecordError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    return parse_record(data, str(path))


def list_packaged() -> dict[str, list[str]]:
    """The shipped records: dataset -> categories."""
    return {d.name: sorted(p.stem for p in d.glob("*.json")) for d in sorted(CAPTIONS_DIR.iterdir()) if d.is_dir()}


def packaged_record(dataset: str, category: str) -> CaptionRecord:
    """The shipped record of a benchmark category; a clear error lists what is available otherwise."""
    path = CAPTIONS_DIR / dataset / f"{category}.json"
    if not path.is_file():
        available = list_packaged().get(dataset)
        raise CaptionRecordError(
            f"no packaged caption record for {dataset}/{category}; "
            + (f"{dataset} has: {', '.join(available)}. " if available else f"datasets: {sorted(list_packaged())}. ")
            + "Write one (`fsad captions generate`) and pass it as model.init_args.captions."
        )
    return load_record(path)


def resolve_record(captions: str | Path | None, dataset: str, category: str) -> CaptionRecord:
    """The record a run uses: the packaged one (``captions`` None), a record file, or from a folder of records
    (``<folder>/<dataset>/<category>.json`` as ``fsad captions import`` writes, else ``<folder>/<category>.json``)."""
    if captions is None:
        return packaged_record(dataset, category)
    path = Path(captions)
    if not path.is_dir():
        return load_record(path)
    for candidate in (path / dataset / f"{category}.json", path / f"{category}.json"):
        if candidate.is_file():
            return load_record(candidate)
    raise CaptionRecordError(
        f"{path}: no caption record for {dataset}/{category} (looked for {dataset}/{category}.json and {category}.json)"
    )


# ----------------------------------------------------------------------------- MLLP prompt texts
#: The authors' ``setup_seed`` default: their prompt construction draws from Python's ``random`` right after it.
AUTHORS_PROMPT_SEED = 111


def default_prompt_seed(variant: str) -> int:
    """The prompt texts' seed when none is given: the authors' 111 for ``variant: code``, 0 otherwise."""
    return AUTHORS_PROMPT_SEED if variant == "code" else 0


BACKGROUND_DEFECTS = ("a stain", "a foreign object", "dust")


@dataclass
class PromptTexts:
    """Every level's prompt bodies: the image level, the foreground level (paper form, from the logical relation),
    one group per component, the background, and — in the code's form — the attribute groups (relation, color,
    texture, shape) its Attr-MoE mixes into the image level."""

    image: PromptGroupTexts
    components: dict[str, PromptGroupTexts]
    background: PromptGroupTexts
    attributes: dict[str, PromptGroupTexts]
    foreground: PromptGroupTexts | None = None

    def groups(self) -> dict[str, PromptGroupTexts]:
        """All groups under unique names, in a fixed order (image, foreground, components, background, attributes)."""
        named = {"image": self.image}
        if self.foreground is not None:
            named["foreground"] = self.foreground
        named.update({f"component:{n}": g for n, g in self.components.items()})
        named["background"] = self.background
        named.update({f"attribute:{n}": g for n, g in self.attributes.items()})
        return named


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def word_pattern(word: str) -> re.Pattern[str]:
    """``word`` as a whole word, optionally plural (``LED`` matches ``LEDs`` but not ``LEDGE``)."""
    return re.compile(rf"\b({re.escape(word)}(?:e?s)?)\b", flags=re.IGNORECASE)


def _with_defect(text: str, noun: str, defect_state: str) -> str:
    """Insert a defect after the first mention of ``noun``, keeping its plural: ``LEDs`` → ``LEDs with a crack``;
    a state ending in the word that follows is not doubled (``tile with rough surface`` + ``surface``)."""
    match = word_pattern(noun).search(text)
    if match is None:  # the text never names the noun: state the defect as its own leading sentence
        return f"{_sentence(defect_state.format(noun))} {text}"
    inserted = defect_state.format(match.group(1))
    rest = text[match.end() :]
    last = inserted.split()[-1]
    if re.match(rf"\s+{re.escape(last)}\b", rest, flags=re.IGNORECASE):
        rest = rest.lstrip()[len(last) :]
    if " with " in f" {inserted} " and re.match(r"\s+with\b", rest, flags=re.IGNORECASE):
        rest = " and" + rest.lstrip()[len("with") :]  # "screw with a scratch and a round head", not "with … with"
    return text[: match.start()] + inserted + rest


SLOT_VOCABULARIES = {
    **{kind: tuple(v for v in values if v != "any") for kind, values in VOCABULARIES.items()},
    "number": NUMBERS,
    "location": LOCATIONS,
}
"""What a placeholder stands for: a value of one of these vocabularies written in a caption."""


def attribute_values(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every attribute value written in ``text``, longest match first, not overlapping
    (``dark green`` is one colour, not ``green``)."""
    found: list[tuple[int, int, str]] = []
    candidates = sorted(
        ((value, kind) for kind, values in SLOT_VOCABULARIES.items() for value in values), key=lambda c: -len(c[0])
    )
    for value, kind in candidates:
        for match in re.finditer(rf"\b{re.escape(value)}\b", text, flags=re.IGNORECASE):
            if all(match.end() <= start or match.start() >= end for start, end, _ in found):
                found.append((match.start(), match.end(), kind))
    return sorted(found)


def with_placeholders(text: str, mode: Literal["replace", "insert"], kinds: tuple[str, ...] | None = None) -> str:
    """MLLP placeholders (FineGrainedAD §3.3): every attribute value of ``kinds`` (all when None) is replaced by a
    learnable placeholder (ALPs) or followed by one (NHPs: "we insert learnable placeholders" next to the value)."""
    pieces, cursor = [], 0
    for start, end, kind in attribute_values(text):
        if kinds is not None and kind not in kinds:
            continue
        pieces.append(text[cursor:start])
        pieces.append(slot(kind) if mode == "replace" else f"{text[start:end]} {slot(kind)}")
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


SINGULAR_NUMBERS = ("one",)
"""Counts that take a singular noun; every other count takes a plural one, so a swap stays within its group."""
NEGATABLE_KINDS = ("color", "texture", "shape")
"""Adjective kinds a negative description can be written for (``non-black``); counts and places are swapped only."""
_NEVER_DRAWN = ("whole", "around", "any", "both sides", "inside", "outside")
"""Values never swapped in or out: too vague, or prepositions rather than places ("stripes inside the disc")."""


def _article_for(word: str) -> str:
    """The indefinite article before ``word`` ("an orange", "a u-shaped")."""
    return "an" if word[:1].lower() in "aeio" else "a"


def _replace_span(text: str, start: int, end: int, new: str) -> str:
    """``text`` with ``text[start:end]`` replaced by ``new``, and an ``a``/``an`` just before it agreeing with it."""
    before = text[:start]
    article = re.search(r"\b(a|an|A|An)\s+$", before)
    if article:
        written = _article_for(new)
        written = written.capitalize() if article.group(1)[0].isupper() else written
        before = before[: article.start(1)] + written + before[article.end(1) :]
    return before + new + text[end:]


def replacement_values(kind: str, current: str, avoid: set[str]) -> list[str]:
    """The values an AHP may put in place of ``current`` (FineGrainedAD §3.3: "randomly selecting other values from
    the corresponding attribute list"): the other values of its vocabulary, except those in ``avoid`` (what the normal
    object has) and, for a count, those of the other grammatical number ("one" is never swapped for "several", which
    would leave "several direction")."""
    current = current.lower()
    values = [v for v in SLOT_VOCABULARIES[kind] if v != current and v not in avoid and v not in _NEVER_DRAWN]
    if kind == "number":
        values = [v for v in values if (v in SINGULAR_NUMBERS) == (current in SINGULAR_NUMBERS)]
    return values


def abnormal_rewrites(
    text: str,
    avoid: dict[str, set[str]],
    rng: random.Random,
    names: tuple[str, ...] = (),
    kinds: tuple[str, ...] = tuple(SLOT_VOCABULARIES),
) -> list[str]:
    """AHPs by replacement (FineGrainedAD §3.3): for every attribute value of ``kinds`` written in ``text``, one copy
    with that value replaced by another value of its list (drawn from ``rng``) and, for a colour, texture or shape,
    one copy with a negative description (``non-black``). ``avoid``: values per kind the normal object has; a value
    inside one of ``names`` (the object's and components' names: "printed circuit board") is part of a name, not an
    attribute, and stays."""
    named = [m.span() for name in names for m in word_pattern(name).finditer(text)]
    rewrites = []
    for start, end, kind in attribute_values(text):
        if kind not in kinds or any(s <= start and end <= e for s, e in named):
            continue
        current = text[start:end]
        if current.lower() in _NEVER_DRAWN:
            continue
        others = replacement_values(kind, current, avoid.get(kind, set()))
        if others:
            rewrites.append(_sentence(_replace_span(text, start, end, rng.choice(others))))
        if kind in NEGATABLE_KINDS:
            rewrites.append(_sentence(_replace_span(text, start, end, f"non-{current.lower()}")))
    return rewrites


def _values_in_use(record: CaptionRecord) -> dict[str, set[str]]:
    """Every attribute value the record's components have, per kind: an AHP never swaps one in."""
    return {kind: {v for c in record.components for v in getattr(c.attributes, kind).base} for kind in VOCABULARIES}


def mllp_texts(
    record: CaptionRecord, object_name: str | None = None, seed: int = 0, placeholders: bool = False
) -> PromptTexts:
    """Prompt bodies of every MLLP level (FineGrainedAD §3.3) from a record; deterministic for a given seed.

    The prompt learner prepends the learnable normal contexts to every body (and the abnormal contexts to ALP
    bodies: concatenation). AHPs, at every level of a record of ours:

    - image level (NHP: the Summary): the object in each of the record's defect states, and every attribute value
      the Summary writes replaced by another value of its list and, for colours, textures and shapes, by a negative
      description (:func:`abnormal_rewrites`);
    - component level (NHP: the component's Caption): the component in each of the record's own defect states, and
      the same replacements of the values its Caption writes (its location moved elsewhere, its count swapped for
      another count of the same grammatical number);
    - background: the background with a generic stain, foreign object or dust.

    ``placeholders`` gives the paper's form (``variant: paper``): a foreground level from the logical relation
    (NHP; AHPs by concatenating a defect state to each component and by replacing a count or a location; ALP with
    placeholders), ALPs whose attribute values are replaced by learnable placeholders, component NHPs with a
    placeholder inserted after each value, component groups ``gated`` (Attr-MoE), and no attribute groups. Without
    it, the code's form: no foreground level, ALPs = contexts + caption, relation and attributes as Attr-MoE groups;
    image AHPs are the object in each defect state only (as many rows as each Attr-MoE attribute group mixes into
    them); a record imported from the authors' file (``record.released``) gives their exact strings
    (:func:`released_prompt_texts`).
    """
    if not placeholders and record.released is not None:
        return released_prompt_texts(record.released, seed)
    rng = random.Random(seed)
    in_use = _values_in_use(record)
    fg = object_name or record.image_level.foreground
    background_noun = f"{record.image_level.background} background" if record.image_level.background else "background"
    summary = _sentence(record.image_level.summary)
    image_abnormal = [_sentence(_with_defect(summary, fg, state)) for state in record.abnormal_states]
    names = (fg, *(c.name for c in record.components))
    if placeholders:  # the code's image AHPs are the defect states only: its Attr-MoE mixes attribute rows into them
        image_abnormal += abnormal_rewrites(summary, in_use, rng, names)
    image_alp = with_placeholders(summary, "replace") if placeholders else summary
    image = PromptGroupTexts(
        normal=[summary], abnormal=list(dict.fromkeys(image_abnormal)), learnable_abnormal=[image_alp]
    )

    components = {}
    for component in record.components:
        caption = _sentence(component.caption)
        abnormal = [_sentence(_with_defect(caption, component.name, state)) for state in record.abnormal_states]
        abnormal = list(dict.fromkeys(abnormal + abnormal_rewrites(caption, in_use, rng, names)))
        if placeholders:
            components[component.name] = PromptGroupTexts(
                normal=[with_placeholders(caption, "insert")], abnormal=abnormal,
                learnable_abnormal=[with_placeholders(caption, "replace")], gated=True,
            )  # fmt: skip
        else:
            components[component.name] = PromptGroupTexts(
                normal=[caption], abnormal=abnormal, learnable_abnormal=[caption]
            )

    background = PromptGroupTexts(
        normal=[f"{background_noun}."],
        abnormal=[f"{background_noun} with {d}." for d in BACKGROUND_DEFECTS],
        learnable_abnormal=[f"{background_noun}."],
    )
    attributes: dict[str, PromptGroupTexts] = {}
    foreground = None
    if record.foreground_level is not None:
        relation = _sentence(record.foreground_level.logical_relation)
        if placeholders:
            relation_abnormal = [
                _sentence(_with_defect(relation, c.name, rng.choice(record.abnormal_states))) for c in record.components
            ]
            swapped = abnormal_rewrites(relation, in_use, rng, names, kinds=("number", "location"))
            foreground = PromptGroupTexts(
                normal=[relation], abnormal=list(dict.fromkeys(relation_abnormal + swapped)),
                learnable_abnormal=[with_placeholders(relation, "replace")],
            )  # fmt: skip
        else:  # the code: the relation with the object in each defect state, mixed into the image level
            relation_states = [_sentence(_with_defect(relation, fg, state)) for state in record.abnormal_states]
            attributes["relation"] = PromptGroupTexts([relation], relation_states, [relation])
    for attribute in ("color", "texture", "shape") if not placeholders else ():
        # the code's attribute prompts: the values the object has; AHPs every vocabulary value it never has
        present = sorted(in_use[attribute])
        absent = [v for v in VOCABULARIES[attribute] if v not in present]
        if present and len(absent) >= len(record.abnormal_states):
            values = f"{' and '.join(present)}."
            attributes[attribute] = PromptGroupTexts([values], [f"{a}." for a in absent], [values])
    return PromptTexts(image, components, background, attributes, foreground)


def caption_provenance_summary(record: CaptionRecord) -> dict[str, str | int]:
    """Flat provenance fields of a record, for run hyper-parameters (W&B config) and ``fsad captions show``."""
    provenance = record.provenance
    summary: dict[str, str | int] = {
        "record": f"{record.dataset}/{record.category}",
        "kind": provenance.kind,
        "source": provenance.source,
        "date": provenance.date.isoformat(),
        "components": len(record.components),
    }
    if provenance.generator:
        summary["generator"] = f"{provenance.generator.model} ({provenance.generator.prompt_id})"
    if provenance.images:
        summary["images"] = ", ".join(f"{i.name} sha256:{i.sha256[:12]}" for i in provenance.images)
    if provenance.imported_from:
        origin = provenance.imported_from
        summary["imported_from"] = f"{origin.file} ({origin.variable}, sha256:{origin.sha256[:12]})"
    if provenance.documentation:
        summary["documentation"] = "; ".join(provenance.documentation)
    return summary


def released_prompt_texts(record: ReleasedRecord, seed: int) -> PromptTexts:
    """The prompt bodies the authors' learner builds from their record (``variant: code``), string for string.

    Every body ends in "." appended to the text as written (a caption ending in "." gets ".."). Image AHPs put the
    object in each defect state at every mention; relation AHPs do so for every entity name; background AHPs
    append the state; attribute NHPs join the values with "." and the AHPs are every vocabulary value the object
    lacks. A component's single AHP is its caption lower-cased, with a defect state drawn at random after its
    name (its plural where the caption has one) and its location replaced by another drawn at random ("center"
    also replaces "centrally"). The draws come from ``random.Random(seed)`` in their order, state then location per
    entity, so the seed of their ``setup_seed`` (111) reproduces their strings.
    """
    rng = random.Random(seed)
    component_abnormal = []
    for name, caption, location in zip(record.entities, record.entity_captions, record.locations, strict=True):
        state = rng.choice(record.states).replace("{}", "")
        moved_to = rng.choice([place for place in record.location_vocabulary if place != location])
        text = caption.lower()
        noun = name + "s" if not name.endswith("s") and name + "s" in text else name
        text = text.replace(noun, noun + state)
        for written in ("center", "centrally") if location == "center" else (location,):
            text = text.replace(written, moved_to)
        component_abnormal.append(text)

    def group(normal: str, abnormal: list[str]) -> PromptGroupTexts:
        return PromptGroupTexts([f"{normal}."], [f"{text}." for text in abnormal], [f"{normal}."])

    def in_state(text: str, nouns: list[str], state: str) -> str:
        for noun in nouns:
            text = text.replace(noun, state.replace("{}", noun))
        return text

    background = f"{record.background} background"
    attributes = {
        "relation": group(record.relation, [in_state(record.relation, record.entities, s) for s in record.states])
    }
    for kind in ("color", "texture", "shape"):
        values, vocabulary = getattr(record, f"{kind}s"), getattr(record, f"{kind}_vocabulary")
        attributes[kind] = group(".".join(values), [value for value in vocabulary if value not in values])
    return PromptTexts(
        image=group(record.caption, [in_state(record.caption, [record.foreground], s) for s in record.states]),
        components={
            name: group(caption, [abnormal])
            for name, caption, abnormal in zip(record.entities, record.entity_captions, component_abnormal, strict=True)
        },
        background=group(background, [background + s.replace("{}", "") for s in record.states]),
        attributes=attributes,
    )
