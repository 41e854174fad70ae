"""One config, one model: a checkpoint is loaded only under its trained-structure settings, evaluation settings are
applied over it and reported, and every artefact of a run carries one config hash (real ``fsad`` subprocesses)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

from fsad.datamodules.synthetic import default_synthetic_root
from fsad.export import save_checkpoint
from fsad.inference import Inferencer
from fsad.lightning_modules.components.run_settings import SettingsMismatchError
from fsad.lightning_modules.finegrainedad.mfsc import packaged_record
from fsad.lightning_modules.finegrainedad.module import FineGrainedAD
from fsad.lightning_modules.kagprompt.module import KAGPrompt

REPO = Path(__file__).resolve().parents[2]
FINEGRAINEDAD = str(REPO / "configs/finegrainedad/synthetic_tiny.yaml")
PROMPTAD = str(REPO / "configs/promptad/synthetic_tiny.yaml")
KAG_TEST = str(REPO / "configs/kagprompt/synthetic_tiny.yaml")
PREDICT = str(REPO / "configs/data/predict.yaml")
ONE_EPOCH = ("--trainer.max_epochs", "1")  # a trainer option: not part of the config hash


def fsad(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "fsad", *args], cwd=REPO, env=env, capture_output=True, text=True)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line a refused run ends with (exit 1, no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[-1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def finegrainedad_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fsad fit`` then ``fsad test --ckpt_path`` of the same FineGrainedAD config into one run folder."""
    root = tmp_path_factory.mktemp("fg")
    fit = fsad("fit", "-c", FINEGRAINEDAD, "--run_root", str(root), *ONE_EPOCH)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = root / "finegrainedad/synthetic/disc/k2_s0"
    test = fsad(
        "test", "-c", FINEGRAINEDAD, "--run_root", str(root), "--ckpt_path", str(run_dir / "checkpoints/last.ckpt")
    )
    assert test.returncode == 0, test.stderr[-3000:]  # the same config reruns in its own folder
    assert "evaluation settings changed" not in test.stderr
    return run_dir


@pytest.mark.filterwarnings("ignore")
def test_one_hash_and_a_self_describing_run_folder(finegrainedad_run: Path) -> None:
    from fsad.export import prepare_from_config

    checkpoint = torch.load(finegrainedad_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    run_hash = json.loads((finegrainedad_run / "run.json").read_text())["config_hash"]
    (results,) = read_csv(finegrainedad_run / "results.csv")
    exported = prepare_from_config([FINEGRAINEDAD], [], str(finegrainedad_run / "checkpoints/last.ckpt"), None)
    assert run_hash == results["config_hash"] == checkpoint["config_hash"] == exported.config_hash
    assert checkpoint["model_class"] == "fsad.lightning_modules.finegrainedad.module.FineGrainedAD"

    rows = read_csv(finegrainedad_run / "scores.csv")
    labels = [int(row["gt_label"]) for row in rows]
    assert len(rows) == len({row["path"] for row in rows}) > 10 and 0 < sum(labels) < len(rows)
    assert all((row["defect_type"] == "good") == (row["gt_label"] == "0") for row in rows)
    auroc = roc_auc_score(labels, [float(row["score"]) for row in rows])
    assert auroc == pytest.approx(float(results["image_AUROC"]), abs=1e-9)

    packaged = packaged_record("synthetic", "disc").model_dump(mode="json")
    captions = json.loads((finegrainedad_run / "captions.json").read_text())
    assert captions["record"] == packaged == checkpoint["caption_record"]["record"]
    assert captions["origin"] == "packaged record synthetic/disc" and captions["provenance"]["kind"]


@pytest.mark.filterwarnings("ignore")
def test_evaluation_settings_are_applied_over_the_checkpoint_and_reported(
    finegrainedad_run: Path, tmp_path: Path
) -> None:
    result = fsad("test", "-c", FINEGRAINEDAD, "--run_root", str(tmp_path), "--ckpt_path",
                  str(finegrainedad_run / "checkpoints/last.ckpt"), "--model.init_args.gaussian_sigma", "8",
                  "--model.init_args.protocol", "paper")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    changed = [line for line in result.stderr.splitlines() if line.startswith("evaluation settings changed")]
    assert len(changed) == 1 and changed[0].endswith('gaussian_sigma 2.0 -> 8.0, protocol "honest" -> "paper"')
    run_dir = tmp_path / "finegrainedad/synthetic/disc/k2_s0"
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]
    assert ran["gaussian_sigma"] == 8.0 and ran["protocol"] == "paper"
    (results,) = read_csv(run_dir / "results.csv")
    (before,) = read_csv(finegrainedad_run / "results.csv")
    assert "image_AUROC_paper_max_fusion" in results and "image_AUROC_paper_max_fusion" not in before
    assert results["pixel_AUROC"] != before["pixel_AUROC"]  # the maps were smoothed with sigma 8
    assert results["image_AUROC"] == before["image_AUROC"]  # image scores do not depend on the smoothing
    assert results["config_hash"] != before["config_hash"]


@pytest.mark.filterwarnings("ignore")
def test_trained_structure_or_another_method_is_refused_in_one_line(finegrainedad_run: Path, tmp_path: Path) -> None:
    checkpoint = str(finegrainedad_run / "checkpoints/last.ckpt")
    structure = fsad("test", "-c", FINEGRAINEDAD, "--run_root", str(tmp_path), "--ckpt_path", checkpoint,
                     "--model.init_args.n_ctx", "3", "--model.init_args.gaussian_sigma", "8")  # fmt: skip
    line = error_line(structure)
    assert "n_ctx: checkpoint 4, config 3" in line and "gaussian_sigma" not in line
    other = fsad("test", "-c", PROMPTAD, "--run_root", str(tmp_path), "--ckpt_path", checkpoint)
    line = error_line(other)
    assert "FineGrainedAD model (fsad.lightning_modules.finegrainedad.module.FineGrainedAD)" in line
    assert "asks for PromptAD (fsad.lightning_modules.promptad.module.PromptAD)" in line
    assert not any(tmp_path.iterdir())  # nothing was written
    # an evaluation change into the checkpoint's own folder is another config; --overwrite would delete the checkpoint
    line = error_line(
        fsad(
            "test",
            "-c",
            FINEGRAINEDAD,
            "--run_root",
            str(finegrainedad_run.parents[3]),
            "--ckpt_path",
            checkpoint,
            "--model.init_args.gaussian_sigma",
            "8",
            "--overwrite",
            "true",
        )
    )
    assert "--overwrite would empty" in line and Path(checkpoint).is_file()


@pytest.mark.filterwarnings("ignore")
def test_a_caption_record_other_than_the_checkpoints_is_a_trained_structure_mismatch(
    finegrainedad_run: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(finegrainedad_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    data = SimpleNamespace(dataset_name="synthetic", category="disc")
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    same.write_text(json.dumps(packaged_record("synthetic", "disc").model_dump(mode="json")))
    other.write_text(json.dumps(packaged_record("synthetic", "tile").model_dump(mode="json")))
    # the checkpoint's record given as a file is no difference; another record is refused with both named
    assert FineGrainedAD(**{**arguments, "captions": str(same)}).check_checkpoint_settings(checkpoint, data, "x") == {}
    with pytest.raises(
        SettingsMismatchError, match=r"captions: checkpoint \"synthetic/disc \(.*config \"synthetic/tile"
    ):
        FineGrainedAD(**{**arguments, "captions": str(other)}).check_checkpoint_settings(checkpoint, data, "x")


@pytest.mark.filterwarnings("ignore")
def test_kagprompt_ablation_checkpoint_is_refused_by_the_default_config(tmp_path: Path) -> None:
    """The checkpoint is written by the function ``fsad export`` writes ``model.ckpt`` with (no training needed to
    fix its settings); the default test config asks for the gated, self-looped graph."""
    arguments = yaml.safe_load(Path(KAG_TEST).read_text())["model"]["init_args"]
    ablation = KAGPrompt(**arguments, image_size=96, eval_size=64, use_gate=False, gate_self_loop=False)
    save_checkpoint(ablation, tmp_path / "ablation.ckpt")
    line = error_line(fsad("test", "-c", KAG_TEST, "--run_root", str(tmp_path / "runs"),
                           "--ckpt_path", str(tmp_path / "ablation.ckpt")))  # fmt: skip
    assert "gate_self_loop: checkpoint false, config true; use_gate: checkpoint false, config true;" in line


@pytest.mark.filterwarnings("ignore")
def test_finegrainedad_predict_and_inferencer_from_last_ckpt_score_as_fsad_test(
    finegrainedad_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = finegrainedad_run / "checkpoints/last.ckpt"
    images = default_synthetic_root() / "disc"
    result = fsad("predict", "-c", FINEGRAINEDAD, "-c", PREDICT, "--run_root", str(tmp_path), "--ckpt_path",
                  str(checkpoint), "--data.init_args.path", str(images / "test"), "--data.init_args.normal_dir",
                  str(images / "train/good"), "--data.init_args.category", "disc", "--data.init_args.k_shot", "2",
                  "--trainer.callbacks.init_args.overlays", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "finegrainedad/predict/disc/k2_s0"
    assert (run_dir / "support.txt").read_text() == (finegrainedad_run / "support.txt").read_text()
    tested = {Path(row["path"]).relative_to(images / "test").as_posix(): float(row["score"])
              for row in read_csv(finegrainedad_run / "scores.csv")}  # fmt: skip
    predicted = {row["path"]: float(row["score"]) for row in read_csv(run_dir / "predictions/scores.csv")}
    assert predicted.keys() == tested.keys() and any("/" in path for path in predicted)  # a recursive folder
    for path, score in tested.items():
        assert predicted[path] == pytest.approx(score, rel=1e-6)
    assert json.loads((run_dir / "captions.json").read_text())["origin"] == "packaged record synthetic/disc"

    seed_everything(0)  # the CLI's seed: the random tiny backbone is the run's
    support = (finegrainedad_run / "support.txt").read_text().split()
    inferencer = Inferencer.from_checkpoint(checkpoint, support=support, settings={"gaussian_sigma": 2.0})
    for path in sorted(tested)[:: len(tested) // 3]:
        assert inferencer.predict(images / "test" / path).score == pytest.approx(tested[path], rel=1e-5)
    capsys.readouterr()
    seed_everything(0)
    Inferencer.from_checkpoint(checkpoint, support=support, settings={"gaussian_sigma": 8.0})
    assert "evaluation settings changed relative to checkpoint" in capsys.readouterr().err
    with pytest.raises(SettingsMismatchError, match="n_ctx: checkpoint 4, config 3"):
        Inferencer.from_checkpoint(checkpoint, support=support, settings={"n_ctx": 3})
