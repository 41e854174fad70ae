"""Caption records a researcher can trust (issue 12): provenance, facts checked against real pixels, the lint, and
the import of the authors' records format."""

from __future__ import annotations

import colorsys
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsad.lightning_modules.finegrainedad.caption_lint import lint_record, lint_text
from fsad.lightning_modules.finegrainedad.mfsc import (
    CAPTIONS_DIR,
    COLORS,
    DIRECTIONS,
    LOCATIONS,
    NUMBERS,
    SHAPES,
    TEXTURES,
    CaptionRecordError,
    load_record,
    mllp_texts,
    packaged_record,
    parse_record,
    replacement_values,
    resolve_record,
)

SHIPPED = sorted(CAPTIONS_DIR.rglob("*.json"))
# Real-IAD's eight defect types (Wang et al., CVPR 2024), written here independently of the lint's table.
REAL_IAD_DEFECTS = ("pit", "deformation", "abrasion", "scratch", "damage", "missing part", "foreign object",
                    "contamination")  # fmt: skip


# ----------------------------------------------------------------------------- provenance
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_record_has_provenance_and_passes_the_lint(path: Path) -> None:
    record = load_record(path)
    assert record.provenance.kind in ("image-derived", "documentation", "generic")
    assert record.provenance.source and record.provenance.date.year >= 2024
    assert lint_record(record) == []


def test_realiad_records_are_generic_with_only_published_defect_types() -> None:
    realiad = sorted((CAPTIONS_DIR / "realiad").glob("*.json"))
    assert len(realiad) == 30
    for path in realiad:
        record = load_record(path)
        assert record.provenance.kind == "generic"
        assert record.provenance.source == "category name and dataset defect list only"
        assert record.components == [] and record.foreground_level is None and record.image_level.background is None
        for state in record.abnormal_states:
            assert any(defect in state for defect in REAL_IAD_DEFECTS), f"{path}: {state}"
        texts = mllp_texts(record)
        assert set(texts.groups()) == {"image", "background"}  # image and background levels only


def bottle_dict() -> dict:
    return packaged_record("mvtec", "bottle").model_dump(mode="json")


def test_image_hashes_in_the_bottle_provenance_are_the_real_files(mvtec_root: Path) -> None:
    for image in packaged_record("mvtec", "bottle").provenance.images:
        data = (mvtec_root.parent / image.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image.sha256


def test_show_prints_the_provenance(capsys: pytest.CaptureFixture[str]) -> None:
    from fsad.cli import main

    assert main(["captions", "show", "realiad", "toy"]) == 0
    out = capsys.readouterr().out
    assert (
        "[provenance]" in out and "kind: generic" in out and "source: category name and dataset defect list only" in out
    )
    assert "[component:" not in out


def test_show_prints_each_variants_prompts(capsys: pytest.CaptureFixture[str]) -> None:
    """The paper variant's foreground level and placeholders; the code variant's contexts + caption ALPs."""
    from fsad.cli import main

    assert main(["captions", "show", "synthetic", "disc"]) == 0
    paper = capsys.readouterr().out
    assert "[foreground]" in paper and "[component:disc] (Attr-MoE weights on its placeholders)" in paper
    assert "ALP  N N N N A a <shape> <color> disc in the <location>." in paper
    assert main(["captions", "show", "synthetic", "disc", "--variant", "code"]) == 0
    code = capsys.readouterr().out
    assert "[foreground]" not in code and "ALP  N N N N A a round grey disc in the center." in code


def test_captions_option_accepts_a_folder(tmp_path: Path) -> None:
    (tmp_path / "visa").mkdir()
    data = packaged_record("visa", "pcb1").model_dump(mode="json")
    (tmp_path / "visa/pcb1.json").write_text(json.dumps({**data, "abnormal_states": ["{} with a bent pin"]}))
    assert resolve_record(tmp_path, "visa", "pcb1").abnormal_states == ["{} with a bent pin"]
    assert resolve_record(None, "visa", "pcb1") == packaged_record("visa", "pcb1")
    with pytest.raises(CaptionRecordError, match=rf"{tmp_path}: no caption record for visa/pcb2"):
        resolve_record(tmp_path, "visa", "pcb2")


# ----------------------------------------------------------------------------- facts against real pixels
# Colour families from HSV, with thresholds chosen by eye for the colour names; independent of the records.
NAME_FAMILY = {"white": "white", "black": "dark", "dark brown": "dark", "yellow": "yellow", "beige": "pale warm",
               "light brown": "pale warm", "cream": "pale warm", "tan": "pale warm", "grey": "grey"}  # fmt: skip


def colour_family(rgb: np.ndarray) -> str:
    hue, saturation, value = colorsys.rgb_to_hsv(*(rgb / 255.0))
    if value < 0.35:
        return "dark"
    if saturation < 0.12:
        return "white" if value > 0.9 else "grey"
    if 45 / 360 <= hue <= 70 / 360 and saturation > 0.5 and value > 0.78:
        return "yellow"
    if 20 / 360 <= hue <= 80 / 360:
        return "pale warm"
    return "other"


def border_and_centre(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Median colour of the image border (4 % wide) and of the central quarter of the image."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    h, w, _ = pixels.shape
    e = max(4, h // 25)
    border = np.concatenate(
        [pixels[:e], pixels[-e:], pixels[:, :e].transpose(1, 0, 2), pixels[:, -e:].transpose(1, 0, 2)], axis=1
    )
    centre = pixels[h * 3 // 8 : h * 5 // 8, w * 3 // 8 : w * 5 // 8]
    return np.median(border.reshape(-1, 3), axis=0), np.median(centre.reshape(-1, 3), axis=0)


@pytest.mark.parametrize(
    ("dataset", "category", "images"),
    [
        ("mvtec", "bottle", "mvtec_ad/bottle/train/good/*.png"),
        ("folder", "hazelnut_toy", "hazelnut_toy/train/good/*.jpg"),
    ],
)
def test_stated_background_and_object_colours_match_the_pixels(shared_data: Path, dataset, category, images) -> None:
    record = packaged_record(dataset, category)
    object_families = {NAME_FAMILY.get(c) for c in record.components[0].attributes.color.base}
    paths = sorted(shared_data.glob(images))[::3]
    assert len(paths) >= 9
    for path in paths:
        border, centre = border_and_centre(path)
        assert colour_family(border) == NAME_FAMILY[record.image_level.background], path
        assert colour_family(centre) in object_families, (path, centre)


def test_bottle_surround_is_pure_white_so_black_was_wrong(mvtec_root: Path) -> None:
    """The control for the test above: the old record's 'black' background is a different family from the pixels."""
    corners = np.asarray(Image.open(mvtec_root / "bottle/train/good/000.png").convert("RGB"))[:20, :20]
    assert (corners == 255).all()
    assert colour_family(corners.reshape(-1, 3).mean(0)) != NAME_FAMILY["black"]


# ----------------------------------------------------------------------------- the lint
def _relation(text: str):
    return lambda r: r["foreground_level"].__setitem__("logical_relation", text)


LINT_FAULTS = {
    "doubled word": (lambda r: r["image_level"].__setitem__("summary", "a dark dark bottle on a white background."),
                     "image_level.summary", "doubled word"),
    "plural subject, singular verb": (_relation("the rims surrounds the mouth of the bottle."),
                                      "foreground_level.logical_relation", "plural subject 'rims'"),
    "singular subject, plural verb": (_relation("the mouth are inside the rim."),
                                      "foreground_level.logical_relation", "singular subject 'mouth'"),
    "value-colon prefix": (lambda r: r["components"][0].__setitem__("caption", "black: a dark round bottle mouth."),
                           "components[0].caption", "value-colon prefix"),
    "caption that would get a prefix": (lambda r: r["components"][1].__setitem__("caption", "a dark glass ring."),
                                        "components[1].caption", "never names the component 'rim'"),
    "duplicated component": (lambda r: r["components"][1].__setitem__("name", "mouths"),
                             "components[1].name", "duplicates components[0]"),
    "defect state of another dataset": (lambda r: r["abnormal_states"].__setitem__(0, "{} with a pit"),
                                        "abnormal_states[0]", "realiad"),
    "count-noun number disagreement": (_relation("the rim surrounds the mouth in several direction."),
                                       "foreground_level.logical_relation", "plural count 'several'"),
    "with … with in one clause": (lambda r: r["image_level"].__setitem__(
        "summary", "a dark glass bottle with a black mouth with a brownish rim, on a white background."),
        "image_level.summary", "doubled preposition 'with … with'"),
    "contradicted background": (lambda r: r["image_level"].__setitem__("summary", "a dark bottle on a black background."),
                                "image_level.summary", "'black background'"),
}  # fmt: skip


@pytest.mark.parametrize("fault", LINT_FAULTS)
def test_validate_fails_a_fixture_with_each_lint_problem(tmp_path: Path, capsys, fault: str) -> None:
    from fsad.cli import main

    mutate, field, message = LINT_FAULTS[fault]
    data = bottle_dict()
    mutate(data)
    parse_record(data, "fixture")  # the schema alone accepts it: only the lint can catch it
    path = tmp_path / "bottle.json"
    path.write_text(json.dumps(data))
    assert main(["captions", "validate", str(path)]) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert any(line.startswith(f"FAIL {path}: {field}: ") and message in line for line in failures), failures


def test_old_realiad_template_with_mvtec_states_fails_the_lint() -> None:
    """The shape of the Real-IAD records before issue 12: doubled words, 'tapes belongs', MVTec's toothbrush state."""
    data = {
        "dataset": "realiad", "category": "toothbrush",
        "provenance": {"kind": "documentation", "source": "template", "date": "2025-01-01", "documentation": ["x"]},
        "image_level": {"foreground": "toothbrush", "background": "white",
                        "summary": "a toothbrush with black black bristles, on a white tray.",
                        "sources": {"foreground": "x", "background": "x"}},
        "foreground_level": {"logical_relation": "the bristles belongs to the handle of the toothbrush."},
        "components": [
            {"name": name, "number": "one", "location": "center", "attributes": {}, "caption": f"the {name}.",
             "sources": {"name": "x", "number": "x", "location": "x"}}
            for name in ("bristles", "handle")
        ],
        "abnormal_states": ["{} with defective bristles"],
    }  # fmt: skip
    problems = lint_record(parse_record(data, "old"))
    assert any(p.startswith("image_level.summary: doubled word 'black black'") for p in problems)
    assert any(p.startswith("foreground_level.logical_relation: plural subject 'bristles'") for p in problems)
    assert any(p.startswith("abnormal_states[0]:") and "mvtec toothbrush 'defective'" in p for p in problems)


def test_a_relation_noun_after_of_is_not_taken_as_the_subject() -> None:
    data = bottle_dict()
    data["foreground_level"]["logical_relation"] = "the edges of the rim surround the mouth."
    assert lint_record(parse_record(data, "ok")) == []


# ----------------------------------------------------------------------------- MLLP rules (FineGrainedAD §3.3)
def _one_span_changed(normal: str, abnormal: str) -> tuple[str, str] | None:
    """The (old, new) words where two prompts differ, when they differ in one contiguous run of words only."""
    a, b = re.findall(r"[\w'-]+", normal), re.findall(r"[\w'-]+", abnormal)
    head = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    old, new = " ".join(a[head : len(a) - tail]), " ".join(b[head : len(b) - tail])
    return (old, new) if old or new else None


def test_image_ahps_replace_the_summarys_attribute_values() -> None:
    """§3.3: image AHPs replace the Summary's attribute values, by a negative description or another value of the
    attribute's list. Every AHP that is not a defect state differs from the Summary in one value (an article may
    change with it), and each colour of the Summary is both negated and replaced by a colour the object lacks."""
    record = packaged_record("mvtec", "capsule")
    texts = mllp_texts(record, placeholders=True)
    summary = texts.image.normal[0]
    in_record = {v for c in record.components for v in c.attributes.color.base}
    states = [state.replace("{}", "").strip() for state in record.abnormal_states]
    rewrites = [text for text in texts.image.abnormal if not any(state in text for state in states)]
    vocabulary = {*COLORS, *TEXTURES, *SHAPES, *DIRECTIONS, *NUMBERS, *LOCATIONS}
    swapped = []
    for text in rewrites:
        old, new = _one_span_changed(summary, text)
        old, new = re.sub(r"^an? ", "", old), re.sub(r"^an? ", "", new)  # "a black" → "an orange"
        assert old in vocabulary, (summary, text)
        assert new == f"non-{old}" or new in vocabulary, (summary, text)
        swapped.append((old, new))
    for colour in ("black", "orange"):  # the Summary's colours
        assert (colour, f"non-{colour}") in swapped
        assert any(old == colour and new in COLORS and new not in in_record for old, new in swapped), swapped


@pytest.mark.parametrize("category", ["bottle", "capsule", "screw"])
def test_code_form_image_ahps_are_the_defect_states_that_attr_moe_mixes_into(category: str) -> None:
    """The code's form (no placeholders, a record of ours): the image AHPs are the object in each defect state, no
    value replacements, because its Attr-MoE adds each attribute group's AHP rows into the image rows one for one
    and so needs at least as many rows in every attribute group as the image level has."""
    record = packaged_record("mvtec", category)
    texts = mllp_texts(record, placeholders=False)
    assert len(texts.image.abnormal) == len(record.abnormal_states)
    for name, group in texts.attributes.items():
        assert len(group.abnormal) >= len(texts.image.abnormal), name


def test_component_ahps_use_the_records_own_defect_states_and_value_replacement() -> None:
    """Component AHPs: the component in each of the record's own defect states (MVTec capsule: crack, faulty
    imprint, poke, scratch, squeezed), and its caption's values replaced; no generic defect list."""
    record = packaged_record("mvtec", "capsule")
    caption = record.components[0].caption
    abnormal = mllp_texts(record, placeholders=True).components["capsule"].abnormal
    for state in record.abnormal_states:
        assert any(state.format("capsule") in text for text in abnormal), state
    assert not any(re.search(r"missing part|deformation|\bstain\b", text) for text in abnormal)
    replaced = [_one_span_changed(caption, text) for text in abnormal if "capsule with" not in text]
    assert ("horizontally", "horizontally") not in replaced
    assert any(old == "center" and new in LOCATIONS for old, new in replaced if old and new)


def test_count_swaps_keep_the_grammatical_number() -> None:
    """A count is swapped only for a count of the same grammatical number: the relation "… in one direction" once
    gave the foreground AHP "in several direction"; "two … rims" never becomes "one … rims"."""
    data = bottle_dict()
    data["foreground_level"]["logical_relation"] = "the rim surrounds the mouth in one direction."
    data["components"][1]["caption"] = "two dark glass rims around the mouth."
    texts = mllp_texts(parse_record(data, "fixture"), placeholders=True)
    for text in [*texts.foreground.abnormal, *texts.components["rim"].abnormal]:
        assert lint_text(text) == [], text
        assert not re.search(r"\b(two|three|four|five|six|seven|eight|several|many) direction\b", text)
        assert not re.search(r"\bone (dark |glass )*rims\b", text)
    assert replacement_values("number", "one", set()) == []  # nothing singular to swap "one" for
    assert set(replacement_values("number", "two", set())) == set(NUMBERS) - {"one", "two"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("many grey stripes pointing in several direction.", "plural count 'several' with singular noun 'direction'"),
        ("one LEDs on the board.", "singular count 'one' with plural noun 'leds'"),
        ("a screw with a scratch with a round head.", "doubled preposition 'with … with'"),
        ("the the rim.", "doubled word"),
    ],
)
def test_the_sentence_lint_flags_number_disagreement_and_doubled_prepositions(text: str, problem: str) -> None:
    assert any(problem in found for found in lint_text(text)), lint_text(text)


@pytest.mark.parametrize(
    "text",
    ["four silver solder points at the corners of the board.", "two LEDs on the right, one transparent and one black.",
     "a circular shape with four distinct protruding edges.", "four candles in a two by two grid.",
     "a screw with a scratch and a round head.", "the shaft extends from the head in one direction."],
)  # fmt: skip
def test_the_sentence_lint_passes_well_formed_text(text: str) -> None:
    assert lint_text(text) == []


def test_a_defect_concatenated_before_a_with_phrase_does_not_double_it() -> None:
    """ "screw with a round head" + "{} with a scratch" reads "screw with a scratch and a round head"."""
    data = bottle_dict()
    data["image_level"]["summary"] = "a dark glass bottle with a round black mouth, on a white background."
    image = mllp_texts(parse_record(data, "fixture"), placeholders=True).image.abnormal
    assert "a dark glass bottle with a large breakage and a round black mouth, on a white background." in image


# ----------------------------------------------------------------------------- per-fact sources
DOCUMENTATION_RECORDS = [p for p in SHIPPED if load_record(p).provenance.kind == "documentation"]


@pytest.mark.parametrize("path", DOCUMENTATION_RECORDS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_fact_of_a_documentation_record_names_a_listed_source(path: Path) -> None:
    """Every component's name, count, location, colour, texture, shape and direction, and the object and background,
    name the documentation entry they come from (the text before its colon), read here from the JSON itself."""
    data = json.loads(path.read_text())
    labels = {entry.split(":", 1)[0] for entry in data["provenance"]["documentation"]}
    image = data["image_level"]
    stated = [("image_level", image, ["foreground"] + (["background"] if image.get("background") else []))]
    for i, component in enumerate(data["components"]):
        kinds = [k for k, v in component["attributes"].items() if v.get("base") or v.get("extensions")]
        stated.append((f"components[{i}]", component, ["name", "number", "location", *kinds]))
    for where, part, fields in stated:
        for field in fields:
            assert part.get("sources", {}).get(field) in labels, f"{where}.{field} names no listed source"


def test_a_documentation_fact_without_a_source_is_rejected_naming_the_field() -> None:
    data = json.loads((CAPTIONS_DIR / "visa" / "pcb4.json").read_text())
    del data["components"][2]["sources"]["location"]
    with pytest.raises(CaptionRecordError, match=r"components\[2\]\.sources\.location: a documentation record names"):
        parse_record(data, "pcb4")
    data = json.loads((CAPTIONS_DIR / "visa" / "pcb4.json").read_text())
    data["image_level"]["sources"]["background"] = "a dataset page never listed"
    with pytest.raises(CaptionRecordError, match=r"image_level\.sources\.background: 'a dataset page never listed'"):
        parse_record(data, "pcb4")
