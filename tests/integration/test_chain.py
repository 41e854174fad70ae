"""The chain from ``fit`` to the inspection line, for every method and both variants, on real MVTec bottle images.

For each method: ``fsad fit`` (trained methods; KAG-prompt and APRIL-GAN train on another dataset) → ``fsad test`` writes
``scores.csv`` → ``fsad predict`` on the same test images → ``fsad export`` (ONNX, default support) →
``Inferencer.from_export`` and ``Inferencer.from_checkpoint``, given the run's support list and given none (it then
finds the evaluated support itself). Every link must give ``fsad test``'s image scores, and the run, its results, its
checkpoint and the export must carry one config hash. The last tests swap the support set of one link (``fsad export
--support``, ``Inferencer.from_checkpoint(support=...)``): the swap is announced and the comparison catches it.

The data is a copy of a few real bottle images in the MVTec layout (4 normal training images, 2 good and 2 broken
test images), the backbone the tiny random one under the run's seed; commands run in this process through
``fsad.cli.main``, as a user's shell would call them.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything

from fsad import Inferencer, SupportReplacedWarning
from fsad.cli import main
from fsad.errors import CheckpointError

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
REPO = Path(__file__).resolve().parents[2]
PREDICT = str(REPO / "configs" / "data" / "predict.yaml")
TINY = {"arch": "fsad-tiny", "pretrained": None, "taps": [2, 4]}
KAG_TINY = {"arch": "fsad-tiny", "pretrained": None, "taps": [1, 2, 3, 4], "vv_attention": False}
MODELS = {
    "membank": ("fsad.lightning_modules.membank.module.MemoryBankAD", {"backbone": TINY}),
    "promptad": ("fsad.lightning_modules.promptad.module.PromptAD", {"backbone": TINY, "lr": 0.05}),
    "finegrainedad": ("fsad.lightning_modules.finegrainedad.module.FineGrainedAD",
                      {"backbone": TINY, "lr": 0.05, "slice_factor": 2}),
    "kagprompt": ("fsad.lightning_modules.kagprompt.module.KAGPrompt",
                  {"backbone": KAG_TINY, "rounds": 2, "graph_dim": None, "lr": 0.005}),
    "aprilgan": ("fsad.lightning_modules.aprilgan.module.AprilGan", {"backbone": KAG_TINY, "lr": 0.01}),
    "winclip": ("fsad.lightning_modules.winclip.module.WinCLIP", {"backbone": {**KAG_TINY, "taps": [0, 4]}}),
}  # fmt: skip
CASES = ["membank", "promptad-paper", "promptad-code", "finegrainedad-paper", "finegrainedad-code", "kagprompt-paper",
         "kagprompt-code", "aprilgan"]  # fmt: skip
SAME = 1e-6  # relative: fsad test, fsad predict and the checkpoint run the same torch code on the same pixels
EXPORTED = 1e-5  # relative: onnxruntime's kernels against torch's


def bottle_subset(destination: Path) -> Path:
    """A small MVTec-layout copy of real bottle images: train/good 000-003, test/good and test/broken_large 000-001."""
    from tests.conftest import SHARED_DATA

    source = SHARED_DATA / "mvtec_ad" / "bottle"
    if not source.is_dir():
        pytest.skip("mvtec_ad/bottle not in the shared data")
    picks = [f"train/good/00{i}.png" for i in range(4)] + [f"test/good/00{i}.png" for i in range(2)]
    picks += [f"test/broken_large/00{i}.png" for i in range(2)] + [f"ground_truth/broken_large/00{i}_mask.png"
                                                                 for i in range(2)]  # fmt: skip
    for pick in picks:
        (destination / "bottle" / pick).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / pick, destination / "bottle" / pick)
    return destination


def write_config(path: Path, method: str, variant: str | None, data: dict) -> str:
    class_path, arguments = MODELS[method]
    init_args = {**arguments, "gaussian_sigma": 2.0, **({"variant": variant} if variant else {})}
    if variant == "code" and method != "kagprompt":  # the authors' tap hook reads the block after each tap
        init_args["backbone"] = {**init_args["backbone"], "taps": [2, 3]}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "fsad.callbacks.metrics.AnomalyMetrics"},
                                  {"class_path": "fsad.callbacks.results.ResultsWriter",
                                   "init_args": {"print_table": False}},
                                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True}}]},
        "model": {"class_path": class_path, "init_args": init_args},
        "data": data,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def fsad(*args: str) -> None:
    assert main(list(args)) == 0, args


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def assert_same_scores(reference: dict[str, float], other: dict[str, float], rel: float, link: str) -> None:
    """Every test image scored, each within ``rel`` of ``fsad test``'s score (the chain comparison)."""
    assert other.keys() == reference.keys(), f"{link}: other images than fsad test's"
    for path, score in reference.items():
        assert other[path] == pytest.approx(score, rel=rel), f"{link}: {path} scores {other[path]!r}, test {score!r}"


def inferencer_scores(inferencer: Inferencer, images: Path, paths: list[str]) -> dict[str, float]:
    return {path: inferencer.predict(images / path).score for path in paths}


def bottle_data(data_root: Path, k_shot: int = 2) -> dict:
    """The datamodule config of every case: the bottle subset, k shots of seed 0, 96 px in, 64 px maps."""
    return {"class_path": "fsad.datamodules.mvtec.MVTecDataModule",
            "init_args": {"root": str(data_root), "category": "bottle", "k_shot": k_shot, "seed": 0,
                          "image_size": 96, "eval_size": 64, "batch_size": 4}}  # fmt: skip


def fsad_test_scores(run_dir: Path, bottle: Path) -> dict[str, float]:
    """``fsad test``'s image scores (``scores.csv``), keyed by the path under ``bottle/test``."""
    return {Path(row["path"]).relative_to(bottle / "test").as_posix(): float(row["score"])
            for row in read_csv(run_dir / "scores.csv")}  # fmt: skip


def run_chain(name: str, work: Path, data_root: Path) -> SimpleNamespace:
    """fit (trained methods), test, predict and export one case; the run folder, export and scores of each link."""
    method, _, variant = name.partition("-")
    bottle = data_root / "bottle"
    data = bottle_data(data_root)
    config = write_config(work / "config.yaml", method, variant or None, data)
    runs = work / "runs"
    run_dir = runs / method / "mvtec" / "bottle" / "k2_s0"
    checkpoint: Path | None = None
    if method in ("kagprompt", "aprilgan"):  # pretrained once on another dataset: NSA anomalies, or its test split
        split = {"split": "test"} if method == "aprilgan" else {}
        auxiliary = {"class_path": "fsad.datamodules.auxiliary.AuxiliaryDataModule",
                     "init_args": {"dataset": "synthetic", "categories": ["tile"], "image_size": 96, "eval_size": 64,
                                   "batch_size": 10, **split}}  # fmt: skip
        train_config = write_config(work / "train.yaml", method, variant or None, auxiliary)
        fsad("fit", "-c", train_config, "--run_root", str(work / "pretraining"), "--trainer.limit_train_batches", "2")
        (checkpoint,) = (work / "pretraining").rglob("last.ckpt")
    elif method != "membank":
        fsad("fit", "-c", config, "--run_root", str(runs))
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
    with_checkpoint = ["--ckpt_path", str(checkpoint)] if checkpoint else []
    fsad("test", "-c", config, "--run_root", str(runs), *with_checkpoint)
    tested = fsad_test_scores(run_dir, bottle)

    fsad("predict", "-c", config, "-c", PREDICT, "--run_root", str(work / "predict"), *with_checkpoint,
         "--data.init_args.path", str(bottle / "test"), "--data.init_args.normal_dir", str(bottle / "train" / "good"),
         "--data.init_args.category", "bottle", "--data.init_args.k_shot", "2",
         "--trainer.callbacks.init_args.overlays", "false")  # fmt: skip
    (predictions,) = (work / "predict").rglob("predictions/scores.csv")
    predicted = {row["path"]: float(row["score"]) for row in read_csv(predictions)}

    export = work / "export"
    fsad("export", "-c", config, "--run_root", str(runs), *with_checkpoint, "--format", "onnx", "--thresholds", "none",
         "--out", str(export))  # fmt: skip
    paths = sorted(tested)
    exported = inferencer_scores(Inferencer.from_export(export), bottle / "test", paths)
    seed_everything(0)  # the run's seed: the random tiny backbone is rebuilt as the run drew it
    support = (run_dir / "support.txt").read_text().split()
    # KAG-prompt's checkpoint was trained on other categories: the category to score is named, as a user would
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_checkpoint = Inferencer.from_checkpoint(
            checkpoint or export / "model.ckpt", support=support, category="bottle"
        )
    checkpointed = inferencer_scores(from_checkpoint, bottle / "test", paths)
    # no support given: a fit checkpoint in its run folder, else the export's model.ckpt with its banks (KAG-prompt's
    # and APRIL-GAN's pretraining checkpoint records no bottle shots: see the no-support test)
    recorded = checkpoint if checkpoint and run_dir in checkpoint.parents else export / "model.ckpt"
    seed_everything(0)
    without_support = Inferencer.from_checkpoint(recorded)
    return SimpleNamespace(
        config=config, runs=runs, run_dir=run_dir, checkpoint=checkpoint, export=export, bottle=bottle,
        predict_support=next((work / "predict").rglob("support.txt")), tested=tested, predicted=predicted,
        exported=exported, checkpointed=checkpointed, same_support_warnings=[w.category for w in caught],
        recorded=recorded, recorded_metadata=without_support.metadata,
        recorded_scores=inferencer_scores(without_support, bottle / "test", paths),
    )  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bottle_subset(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="module")
def chain(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SimpleNamespace]:
    """Runs each case's chain once for the tests of this module."""
    done: dict[str, SimpleNamespace] = {}

    def get(name: str) -> SimpleNamespace:
        if name not in done:
            done[name] = run_chain(name, tmp_path_factory.mktemp(name), data_root)
        return done[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_every_link_scores_as_fsad_test_and_carries_one_config_hash(chain, name: str) -> None:
    run = chain(name)
    assert len(run.tested) == 4 and len(set(run.tested.values())) > 1  # distinct scores: a swap would show
    assert run.predict_support.read_text() == (run.run_dir / "support.txt").read_text()
    assert_same_scores(run.tested, run.predicted, SAME, "fsad predict")
    assert_same_scores(run.tested, run.exported, EXPORTED, "fsad export (ONNX)")
    assert_same_scores(run.tested, run.checkpointed, SAME, "Inferencer.from_checkpoint")
    assert SupportReplacedWarning not in run.same_support_warnings  # the evaluated shots, given: nothing to announce
    assert_same_scores(run.tested, run.recorded_scores, SAME, "Inferencer.from_checkpoint without support")
    assert run.recorded_metadata["support_files"] == (run.run_dir / "support.txt").read_text().split()
    in_run_folder = run.recorded == run.checkpoint
    assert run.recorded_metadata["support_source"] == (
        str(run.run_dir / "support.txt") if in_run_folder else f"the support features held by {run.recorded}"
    )

    metadata = json.loads((run.export / "metadata.json").read_text())
    assert metadata["support_files"] == (run.run_dir / "support.txt").read_text().split()
    hashes = {
        "run.json": json.loads((run.run_dir / "run.json").read_text())["config_hash"],
        "results.csv": read_csv(run.run_dir / "results.csv")[0]["config_hash"],
        "metadata.json": metadata["config_hash"],
        "model.ckpt": torch.load(run.export / "model.ckpt", weights_only=True)["config_hash"],
    }
    if run.run_dir in (run.checkpoint.parents if run.checkpoint else []):  # fitted in the run folder it tests in
        hashes["last.ckpt"] = torch.load(run.checkpoint, weights_only=True)["config_hash"]
    assert len(set(hashes.values())) == 1, hashes


def announced_lines(caught: pytest.WarningsRecorder) -> list[str]:
    """The SupportReplacedWarning lines among the warnings caught (the random tiny backbone warns too)."""
    return [str(w.message) for w in caught if w.category is SupportReplacedWarning]


def other_shots(run: SimpleNamespace, work: Path) -> Path:
    """A folder holding copies of the two training images the run did not evaluate with."""
    evaluated = (run.run_dir / "support.txt").read_text().split()
    others = work / "other_good"
    others.mkdir()
    for image in sorted((run.bottle / "train" / "good").iterdir()):
        if str(image) not in evaluated:
            shutil.copyfile(image, others / image.name)
    return others


@pytest.fixture(scope="module")
def swapped(chain, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The membank run exported with ``--support`` naming the two training images it did not evaluate with."""
    run = chain("membank")
    work = tmp_path_factory.mktemp("swapped")
    others = other_shots(run, work)
    printed = exported_with("--run_root", str(run.runs), "--support", str(others), config=run.config,
                            out=work / "export", kind="pt2")  # fmt: skip
    scores = inferencer_scores(Inferencer.from_export(work / "export"), run.bottle / "test", sorted(run.tested))
    return SimpleNamespace(run=run, work=work, others=others, printed=printed, scores=scores)


def exported_with(*args: str, config: str, out: Path, kind: str = "onnx") -> list[str]:
    """``fsad export`` of ``config`` into ``out`` (no thresholds); the ``support:`` line(s) it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fsad("export", "-c", config, *args, "--format", kind, "--thresholds", "none", "--out", str(out))
    return [line for line in printed.getvalue().splitlines() if line.startswith("support:")]


def test_a_different_support_set_is_announced_and_caught_by_the_chain(swapped) -> None:
    run = swapped.run
    assert swapped.printed == [f"support: 2 image(s) from {swapped.others} replace the 2 evaluated shot(s) "
                               f"({run.run_dir / 'support.txt'})"]  # fmt: skip
    with pytest.raises(AssertionError, match="fsad export"):
        assert_same_scores(run.tested, swapped.scores, EXPORTED, "fsad export")


def test_another_support_given_to_from_checkpoint_is_announced_and_caught_by_the_chain(
    chain, swapped, tmp_path: Path
) -> None:
    """``support=`` other than the evaluated shots: used, and announced by a SupportReplacedWarning in the line
    ``fsad export --support`` prints; its scores are the swapped export's, not ``fsad test``'s. Both places a
    checkpoint records its shots: the membank export's banks, PromptAD's run folder."""
    membank = swapped.run
    held = membank.export / "model.ckpt"
    seed_everything(0)
    with pytest.warns(SupportReplacedWarning) as announced:
        inferencer = Inferencer.from_checkpoint(held, support=swapped.others)
    assert announced_lines(announced) == [
        f"support: 2 image(s) from {swapped.others} replace the 2 evaluated shot(s) (the support features held by "
        f"{held})"
    ]
    scores = inferencer_scores(inferencer, membank.bottle / "test", sorted(membank.tested))
    assert_same_scores(swapped.scores, scores, EXPORTED, "from_checkpoint(support=) against export --support")
    with pytest.raises(AssertionError, match="from_checkpoint"):
        assert_same_scores(membank.tested, scores, SAME, "from_checkpoint")

    promptad = chain("promptad-paper")
    others = [str(path) for path in sorted(other_shots(promptad, tmp_path).iterdir())]
    seed_everything(0)
    with pytest.warns(SupportReplacedWarning) as announced:
        inferencer = Inferencer.from_checkpoint(promptad.checkpoint, support=others)
    assert announced_lines(announced) == [
        f"support: 2 image(s) from the support= list replace the 2 evaluated shot(s) ({promptad.run_dir}/support.txt)"
    ]
    assert inferencer.metadata["support_files"] == others
    scores = inferencer_scores(inferencer, promptad.bottle / "test", sorted(promptad.tested))
    with pytest.raises(AssertionError, match="from_checkpoint"):
        assert_same_scores(promptad.tested, scores, SAME, "from_checkpoint")


def test_from_checkpoint_without_support_where_none_is_recorded_is_one_error(chain, tmp_path: Path) -> None:
    """KAG-prompt's pretraining checkpoint (its run folder trained on other data and lists no shots) and a PromptAD
    checkpoint moved out of its run folder record no support: one CheckpointError naming the file and ``support=``."""
    moved = tmp_path / "last.ckpt"
    shutil.copyfile(chain("promptad-paper").checkpoint, moved)
    for checkpoint in (chain("kagprompt-paper").checkpoint, moved):
        with pytest.raises(CheckpointError) as raised:
            Inferencer.from_checkpoint(checkpoint)
        assert str(raised.value) == (
            f"checkpoint {checkpoint}: no support set recorded (no support.txt in its run folder, no memory banks in "
            "it); pass support= (a folder or a list of normal images)"
        )


def test_an_export_checkpoint_keeps_the_support_features_it_holds(swapped) -> None:
    """Re-exported from the swapped export's ``model.ckpt`` with no run folder to read: the banks in the checkpoint
    are kept (refitting on the config's k-shot draw would give ``fsad test``'s scores instead)."""
    checkpoint = swapped.work / "export" / "model.ckpt"
    printed = exported_with("--ckpt_path", str(checkpoint), "--run_root", str(swapped.work / "no_runs"),
                            config=swapped.run.config, out=swapped.work / "again", kind="pt2")  # fmt: skip
    assert printed == [f"support: the 2 evaluated shot(s) from the support features held by {checkpoint}"]
    again = Inferencer.from_export(swapped.work / "again", "pt2")
    assert_same_scores(swapped.scores, inferencer_scores(again, swapped.run.bottle / "test", sorted(swapped.scores)),
                       EXPORTED, "re-export from model.ckpt")  # fmt: skip
    metadata = json.loads((swapped.work / "again" / "metadata.json").read_text())
    assert sorted(Path(p).name for p in metadata["support_files"]) == sorted(p.name for p in swapped.others.iterdir())


@pytest.mark.parametrize("name", ["finegrainedad-paper", "finegrainedad-code"])
def test_finegrainedad_predicts_from_its_exported_model_ckpt(chain, name: str, tmp_path: Path) -> None:
    """``fsad predict --ckpt_path <export>/model.ckpt`` on the recursive test folder: the caption record comes from
    the checkpoint (the predict data's dataset is ``predict``), and the scores are ``fsad test``'s."""
    run = chain(name)
    fsad("predict", "-c", run.config, "-c", PREDICT, "--run_root", str(tmp_path), "--ckpt_path",
         str(run.export / "model.ckpt"), "--data.init_args.path", str(run.bottle / "test"),
         "--data.init_args.normal_dir", str(run.bottle / "train" / "good"), "--data.init_args.category", "bottle",
         "--data.init_args.k_shot", "2", "--trainer.callbacks.init_args.overlays", "false")  # fmt: skip
    (predictions,) = tmp_path.rglob("predictions/scores.csv")
    assert_same_scores(run.tested, {row["path"]: float(row["score"]) for row in read_csv(predictions)}, SAME,
                       "fsad predict from the exported model.ckpt")  # fmt: skip


def test_winclip_from_its_exported_model_ckpt_without_support_scores_as_fsad_test(
    data_root: Path, tmp_path: Path
) -> None:
    """WinCLIP is training-free: ``fsad test``, ``fsad export`` (its default support: the run's ``support.txt``, which
    for zero-shot lists no image) and ``Inferencer.from_checkpoint(<export>/model.ckpt)`` with no support, which keeps
    the export's banks (k = 2) or stays zero-shot (k = 0). ``support=[]`` on the few-shot export is zero-shot WinCLIP:
    the k = 0 run's scores, announced as a swap."""
    tested, exports = {}, {}
    for k_shot in (0, 2):
        work = tmp_path / f"k{k_shot}"
        config = write_config(tmp_path / f"k{k_shot}.yaml", "winclip", None, bottle_data(data_root, k_shot))
        fsad("test", "-c", config, "--run_root", str(work / "runs"))
        run_dir = work / "runs" / "winclip" / "mvtec" / "bottle" / f"k{k_shot}_s0"
        tested[k_shot] = fsad_test_scores(run_dir, data_root / "bottle")
        assert len(set(tested[k_shot].values())) > 1
        exports[k_shot] = work / "export"
        printed = exported_with("--run_root", str(work / "runs"), config=config, out=exports[k_shot], kind="pt2")
        assert printed == [f"support: the {k_shot} evaluated shot(s) from {run_dir / 'support.txt'}"]
        seed_everything(0)
        inferencer = Inferencer.from_checkpoint(exports[k_shot] / "model.ckpt")
        held = "the support features held by" if k_shot else "the zero-shot model"
        assert inferencer.metadata["support_source"].startswith(f"{held} {exports[k_shot] / 'model.ckpt'}")
        scores = inferencer_scores(inferencer, data_root / "bottle" / "test", sorted(tested[k_shot]))
        assert_same_scores(tested[k_shot], scores, SAME, "Inferencer.from_checkpoint without support")
        exported = Inferencer.from_export(exports[k_shot], "pt2")
        scores = inferencer_scores(exported, data_root / "bottle" / "test", sorted(tested[k_shot]))
        assert_same_scores(tested[k_shot], scores, EXPORTED, "fsad export (pt2)")
    seed_everything(0)
    with pytest.warns(SupportReplacedWarning, match="support: 0 image"):
        zero_shot = Inferencer.from_checkpoint(exports[2] / "model.ckpt", support=[])
    scores = inferencer_scores(zero_shot, data_root / "bottle" / "test", sorted(tested[0]))
    assert_same_scores(tested[0], scores, SAME, "Inferencer.from_checkpoint(support=[]) against the zero-shot run")
