"""`fsad captions import` on a small invented file in the authors' format, and FineGrainedAD trained on its records
and on a generic record, with the tiny backbone on the synthetic data."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import pytest

from fsad.cli import main
from fsad.lightning_modules.finegrainedad.mfsc import load_record

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")

# Invented content in the authors' layout: an older and a newer records list, the category index, defect states,
# and statements that are not literals (an import, a call, a function, a main block) that must never run.
AUTHORS_FORMAT = """
import os
SIDE_EFFECT = open(os.path.join(os.path.dirname(__file__), "EXECUTED"), "w")

class_mapping = {"disc": "disc"}
class_state_abnormal_refined = {"disc": ['{} with paint blob ', '{} with scratch']}

fine_grained_normal_prompts_v2 = [
    {"Level_1": [{"foreground": "disc", "background": "white"}],
     "Level_2": [{"entity": ["disc"], "number": ["1"], "location": ["center"]}],
     "Level_3": [{"direction": ["None"], "color": ["grey"], "texture": ["smooth"], "shape": ["circular"]}],
     "caption": "An old description."},
]

fine_grained_normal_prompts_v3 = [
    {"Level_1": [{"foreground": "disc", "background": "pure black"}],
     "Level_2": [{"entity": ["disc", "stripes"], "number": ["1", "multiple"], "location": ["center", "throughout"],
                  "relation": "The stripes run from the center of the disc to its rim."}],
     "Level_3": [{"direction": ["None", "radial"], "color": ["grey and white", "metallic grey"],
                  "texture": ["striped", "smooth"], "shape": ["circular", "elongated"],
                  "entity_caption": ["A round grey and white disc in the center.",
                                     "Many stripes crossing the disc from its center."]}],
     "caption": "A grey disc with radial stripes on a pure black background."},
    {"Level_1": [{"foreground": "widget", "background": "none"}],
     "Level_2": [{"entity": ["knob", "knob"], "number": ["1", "1"], "location": ["left", "right"]}],
     "Level_3": [{"direction": ["None", "None"], "color": ["red", "red"], "texture": ["knurled", "knurled"],
                  "shape": ["round", "round"]}],
     "caption": "A widget with two red knobs."},
]

total_classes2id = {"disc": 0, "widget": 1}

def helper():
    return 1 / 0

if __name__ == "__main__":
    helper()
"""


@pytest.fixture
def authors_file(tmp_path: Path) -> Path:
    path = tmp_path / "authors" / "fine_grained_prompts.py"
    path.parent.mkdir()
    path.write_text(AUTHORS_FORMAT)
    return path


def test_import_maps_the_newest_list_and_reports_every_guess(tmp_path: Path, authors_file: Path, capsys) -> None:
    out = tmp_path / "records"
    assert main(["captions", "import", "--from", str(authors_file), "--out", str(out), "--dataset", "synthetic"]) == 0
    printed = capsys.readouterr().out
    assert not (authors_file.parent / "EXECUTED").exists()  # parsed, never run

    disc = load_record(out / "synthetic/disc.json")
    assert disc.image_level.background == "pure black"  # from _v3, not the older _v2
    assert disc.image_level.summary == "A grey disc with radial stripes on a pure black background."
    assert disc.foreground_level.logical_relation == "The stripes run from the center of the disc to its rim."
    assert [(c.name, c.number, c.location) for c in disc.components] == [
        ("disc", "one", "center"),
        ("stripes", "many", "whole"),
    ]
    body, stripes = disc.components
    assert (body.attributes.color.base, body.attributes.color.connector) == (["grey", "white"], "and")
    assert body.attributes.direction.base == [] and stripes.attributes.direction.base == ["radial"]
    assert stripes.attributes.color.extensions == ["metallic grey"] and stripes.attributes.color.base == []
    assert disc.abnormal_states == ["{} with paint blob", "{} with scratch"]
    assert (
        disc.provenance.kind == "image-derived"
        and disc.provenance.imported_from.variable == "fine_grained_normal_prompts_v3"
    )

    widget = load_record(out / "synthetic/widget.json")
    assert widget.image_level.background is None and widget.foreground_level is None
    assert [(c.name, c.number, c.location) for c in widget.components] == [("knob", "two", "whole")]

    changed = [line for line in printed.splitlines() if line.startswith("changed: ")]
    for expected in ("disc: components[1].number: 'multiple' guessed as 'many'",
                     "disc: components[1].location: 'throughout' guessed as 'whole'",
                     "disc: components[1].attributes.color: 'metallic grey' kept as extension",
                     "widget: image_level.background: 'none' dropped",
                     "widget: foreground_level: the source has no relation sentence, dropped",
                     "widget: components[0].caption: no entity caption in the source",
                     "widget: component 'knob': 2 source entries merged",
                     "widget: abnormal_states: none in class_state_abnormal_refined"):  # fmt: skip
        assert any(line.startswith(f"changed: {expected}") for line in changed), expected
    assert "wrote 2 records" in printed
    assert main(["captions", "validate", str(out / "synthetic/disc.json")]) == 0  # schema and lint


VOCABULARIES = """
fine_grained_color_list = ['grey and white', 'metallic grey', 'red', 'blue']
fine_grained_texture_list = ['striped', 'smooth', 'fuzzy']
fine_grained_shape_list = ['circular', 'elongated', 'oval']
fine_grained_location_list = ['center', 'throughout', 'left', 'top right']
"""


def test_with_their_vocabularies_variant_code_builds_their_strings(tmp_path: Path, capsys) -> None:
    """The import keeps the record verbatim (``released``) and variant: code builds the strings their learner
    would: written out by hand from the invented record, with the draws of their order (state, then location, per
    entity) from ``random.Random(seed)``."""
    import random

    from fsad.lightning_modules.finegrainedad.mfsc import mllp_texts

    source = tmp_path / "fine_grained_prompts.py"
    source.write_text(AUTHORS_FORMAT + VOCABULARIES)
    out = tmp_path / "records"
    assert main(["captions", "import", "--from", str(source), "--out", str(out), "--dataset", "synthetic"]) == 0
    assert "widget: released: not kept (no defect states in class_state_abnormal_refined)" in capsys.readouterr().out
    assert load_record(out / "synthetic/widget.json").released is None
    disc = load_record(out / "synthetic/disc.json")
    texts = mllp_texts(disc, seed=5, placeholders=False)

    rng = random.Random(5)
    state0, moved0 = (
        rng.choice(["{} with paint blob ", "{} with scratch"]),
        rng.choice(["throughout", "left", "top right"]),
    )
    state1, _ = rng.choice(["{} with paint blob ", "{} with scratch"]), rng.choice(["center", "left", "top right"])
    caption = "A grey disc with radial stripes on a pure black background."
    assert texts.image.normal == texts.image.learnable_abnormal == [caption + "."]
    assert texts.image.abnormal == [
        "A grey disc with paint blob  with radial stripes on a pure black background..",
        "A grey disc with scratch with radial stripes on a pure black background..",
    ]
    disc_part, stripes = texts.components["disc"], texts.components["stripes"]
    assert disc_part.normal == ["A round grey and white disc in the center.."]
    assert disc_part.abnormal == [f"a round grey and white disc{state0[2:]} in the {moved0}.."]
    assert stripes.abnormal == [f"many stripes{state1[2:]} crossing the disc from its center.."]  # "throughout" absent
    assert texts.background.normal == ["pure black background."]
    assert texts.background.abnormal == [
        "pure black background with paint blob .",
        "pure black background with scratch.",
    ]
    relation = texts.attributes["relation"]
    assert relation.abnormal[1] == "The stripes with scratch run from the center of the disc with scratch to its rim.."
    assert texts.attributes["color"].normal == ["grey and white.metallic grey."]
    assert texts.attributes["color"].abnormal == ["red.", "blue."]
    assert texts.attributes["texture"].abnormal == ["fuzzy."] and texts.attributes["shape"].abnormal == ["oval."]
    assert mllp_texts(disc, seed=5, placeholders=True).image.normal != texts.image.normal  # the paper form ignores it


def test_their_fixed_cluster_map_is_found_beside_the_records_file(tmp_path: Path, capsys) -> None:
    """Their repository layout: ``PromptAD/fine_grained_prompts.py`` and ``datasets/cluster_gt/visa.py`` (a map
    written as ``torch.tensor([...]).unsqueeze(0)``, parsed, never run)."""
    source = tmp_path / "FineGrainedAD" / "PromptAD" / "fine_grained_prompts.py"
    maps = tmp_path / "FineGrainedAD" / "datasets" / "cluster_gt" / "visa.py"
    source.parent.mkdir(parents=True)
    maps.parent.mkdir(parents=True)
    source.write_text(AUTHORS_FORMAT + VOCABULARIES)
    maps.write_text("import torch\n\ndisc = torch.tensor([\n  0, 1, 1,\n  0]).unsqueeze(0)\nnot_a_map = open('x')\n")
    out = tmp_path / "records"
    assert main(["captions", "import", "--from", str(source), "--out", str(out), "--dataset", "synthetic"]) == 0
    assert "disc: released.cluster_map: their fixed region map kept (4 labels)" in capsys.readouterr().out
    assert load_record(out / "synthetic/disc.json").released.cluster_map == [0, 1, 1, 0]


def test_import_reads_the_list_asked_for(tmp_path: Path, authors_file: Path, capsys) -> None:
    out = tmp_path / "records"
    argv = [
        "captions",
        "import",
        "--from",
        str(authors_file),
        "--out",
        str(out),
        "--variable",
        "fine_grained_normal_prompts_v2",
    ]
    assert main(argv) == 0
    assert load_record(out / "custom/disc.json").image_level.background == "white"
    printed = capsys.readouterr().out
    assert (
        "changed: widget: total_classes2id points at 1, not a record in fine_grained_normal_prompts_v2; skipped"
        in printed
    )
    assert "changed: disc: dataset guessed as 'custom'" in printed and not (out / "custom/widget.json").exists()


def test_import_names_the_file_when_the_index_is_missing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "records.py"
    path.write_text("fine_grained_normal_prompts_v3 = []\n")
    assert main(["captions", "import", "--from", str(path), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().out.strip() == f"error: {path}: total_classes2id (category -> index into " \
        "fine_grained_normal_prompts_v3) not found"  # fmt: skip


def test_a_bad_record_names_file_entry_and_field_and_nothing_is_written(
    tmp_path: Path, authors_file: Path, capsys
) -> None:
    authors_file.write_text(AUTHORS_FORMAT.replace('"caption": "A widget with two red knobs."', '"caption": ""'))
    out = tmp_path / "records"
    assert main(["captions", "import", "--from", str(authors_file), "--out", str(out)]) == 1
    message = capsys.readouterr().out.strip()
    assert message.startswith(f"error: {authors_file}: fine_grained_normal_prompts_v3[1] (widget): ")
    assert "image_level.summary: String should have at least 1 character" in message
    assert not out.exists()  # disc converted fine, but nothing is half-written
    broken = tmp_path / "broken.py"
    broken.write_text("records = [\n")
    assert main(["captions", "import", "--from", str(broken), "--out", str(out)]) == 1
    assert capsys.readouterr().out.startswith(f"error: {broken}: not Python source (line ")


def fit_and_test(tmp_path: Path, captions: Path) -> list[dict[str, str]]:
    common = ["-c", str(REPO / "configs/finegrainedad/synthetic_tiny.yaml"), "-c", str(REPO / "configs/logger/csv.yaml"),
              "--run_root", str(tmp_path / "runs"),
              "--model.init_args.captions", str(captions), "--data.init_args.root", str(tmp_path / "synthetic")]  # fmt: skip
    assert main(["fit", *common, "--trainer.max_epochs", "1"]) == 0
    run_dir = tmp_path / "runs/finegrainedad/synthetic/disc/k2_s0"
    assert main(["test", *common, "--ckpt_path", str(run_dir / "checkpoints/last.ckpt")]) == 0
    return list(csv.DictReader((run_dir / "results.csv").open()))


def finite_metrics(rows: list[dict[str, str]]) -> bool:
    values = [float(v) for row in rows for k, v in row.items() if "auroc" in k.lower() and v not in ("", None)]
    return bool(values) and all(math.isfinite(v) for v in values)


@pytest.mark.slow
def test_imported_record_trains_finegrainedad(tmp_path: Path, authors_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "records"
    assert main(["captions", "import", "--from", str(authors_file), "--out", str(out), "--dataset", "synthetic"]) == 0
    assert finite_metrics(fit_and_test(tmp_path, out))  # the folder resolves to synthetic/disc.json
    hparams = (tmp_path / "runs/finegrainedad/synthetic/disc/k2_s0/logs/version_0/hparams.yaml").read_text()
    assert "caption_provenance:" in hparams and "kind: image-derived" in hparams
    assert "imported_from: fine_grained_prompts.py (fine_grained_normal_prompts_v3, sha256:" in hparams


@pytest.mark.slow
def test_generic_record_runs_image_and_background_levels_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    record = tmp_path / "disc.json"
    record.write_text(json.dumps({
        "dataset": "synthetic", "category": "disc",
        "provenance": {"kind": "generic", "source": "category name and dataset defect list only",
                       "date": "2026-01-01", "documentation": ["the synthetic generator's defect list"]},
        "image_level": {"foreground": "disc", "summary": "a photo of a disc."},
        "abnormal_states": ["{} with a paint blob", "{} with a scratch"],
    }))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = fit_and_test(tmp_path, record)
    generic = [w for w in caught if "is generic" in str(w.message)]
    assert len(generic) == 2  # one per run: fit, then test
    assert "image and background levels only" in str(generic[0].message)
    assert finite_metrics(rows)


@pytest.mark.slow
def test_wandb_run_config_carries_the_caption_provenance(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import WandbLogger

    from fsad.datamodules.synthetic import SyntheticDataModule
    from fsad.lightning_modules.components.clip import BackboneSpec
    from fsad.lightning_modules.finegrainedad.module import FineGrainedAD

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    data = SyntheticDataModule(root=str(tmp_path / "syn"), category="disc", k_shot=2, image_size=96, eval_size=64)
    model = FineGrainedAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), image_size=96, eval_size=64)
    logger = WandbLogger(project="fsad-test", save_dir=str(tmp_path), offline=True)
    trainer = Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, limit_test_batches=1,
                      default_root_dir=str(tmp_path / "run"))  # fmt: skip
    trainer.test(model, datamodule=data)
    config = dict(logger.experiment.config)
    logger.experiment.finish()
    assert config["caption_provenance"]["record"] == "synthetic/disc"
    assert config["caption_provenance"]["kind"] == "documentation"
