"""fsad benchmark: the method's protocol stage, resume keyed on the config hash, failures, paths, paper columns."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer

from fsad.benchmark import BenchmarkError, Sweep, build_table, collect, load_config, read_rows
from fsad.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings(
    "ignore:backbone.pretrained is null", "ignore:paper protocol", "ignore:.*does not have many workers"
)


def write(tmp_path: Path, name: str, **fields: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / name), **fields}))
    return path


def count_fits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the datamodule class of every ``Trainer.fit`` call."""
    calls: list[str] = []
    original = Trainer.fit

    def fit(self: Trainer, model, *args, datamodule=None, **kwargs):  # noqa: ANN001, ANN202
        calls.append(type(datamodule).__name__)
        return original(self, model, *args, datamodule=datamodule, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    return calls


@pytest.mark.slow
def test_kag_sweep_pretrains_once_then_only_tests_every_cell(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    fits = count_fits(monkeypatch)
    config = write(
        tmp_path, "kag", method_config=[str(REPO / "configs/kagprompt/synthetic_tiny.yaml")], categories=["disc"],
        shots=[1, 2], seeds=[0],
        pretrain={"method_config": [str(REPO / "configs/kagprompt/train_synthetic_tiny.yaml")],
                  "extra_args": ["--trainer.max_epochs", "1"]},
    )  # fmt: skip
    assert main(["benchmark", "-c", str(config), "--cell-index", "0"]) == 1  # array tasks never pretrain
    assert fits == [] and read_rows(tmp_path / "kag") == []
    assert main(["benchmark", "-c", str(config)]) == 0
    assert fits == ["AuxiliaryDataModule"], "the auxiliary training runs exactly once and no cell calls fit"
    rows = read_rows(tmp_path / "kag")
    assert sorted((r["k"], r["seed"]) for r in rows) == [("1", "0"), ("2", "0")]
    assert all(r["fit_seconds"] == "" and float(r["test_seconds"]) > 0 for r in rows)
    for row in rows:  # each row carries its cell's run config hash, the one in the cell's results.csv
        (cell_results,) = (tmp_path / "kag/runs").rglob(f"k{row['k']}_s{row['seed']}/results.csv")
        assert row["run_config_hash"] == next(csv.DictReader(cell_results.read_text().splitlines()))["config_hash"]
    assert rows[0]["run_config_hash"] != rows[1]["run_config_hash"]
    records = list((tmp_path / "kag/pretrain").glob("*/pretrain.json"))
    assert len(records) == 1 and Path(yaml.safe_load(records[0].read_text())["checkpoint"]).is_file()

    # a second run neither pretrains again nor reruns a cell
    assert main(["benchmark", "-c", str(config)]) == 0
    assert fits == ["AuxiliaryDataModule"] and len(read_rows(tmp_path / "kag")) == 2


def test_pretrained_method_without_weights_and_fewshot_method_with_them_are_refused(tmp_path: Path, capsys) -> None:
    kag = write(
        tmp_path, "kag", method_config=[str(REPO / "configs/kagprompt/synthetic_tiny.yaml")], categories=["disc"]
    )
    assert main(["benchmark", "-c", str(kag)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: kagprompt is a pretrained-protocol method") and "\n" not in err
    checkpoint = tmp_path / "weights.ckpt"
    checkpoint.write_bytes(b"")
    membank = write(
        tmp_path, "mb", method_config=[str(REPO / "configs/demo.yaml")], pretrained_checkpoint=str(checkpoint)
    )
    assert main(["benchmark", "-c", str(membank)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: pretrained_checkpoint: only for pretrained-protocol methods; membank is training_free"
    )


def demo_sweep(tmp_path: Path, *extra: str) -> Path:
    return write(tmp_path, "demo", method_config=[str(REPO / "configs/demo.yaml")], categories=["tile"], shots=[1],
                 seeds=[0], extra_args=["--data.init_args.root", str(tmp_path / "synthetic"), *extra])  # fmt: skip


@pytest.mark.slow
def test_changed_extra_arg_reruns_the_cells_and_collect_refuses_to_mix(tmp_path: Path, capsys) -> None:
    assert main(["benchmark", "-c", str(demo_sweep(tmp_path))]) == 0
    first = read_rows(tmp_path / "demo")
    assert len(first) == 1 and len({r["config_hash"] for r in first}) == 1
    capsys.readouterr()
    assert main(["benchmark", "-c", str(demo_sweep(tmp_path))]) == 0  # unchanged: nothing reruns
    assert "ran cells: []" in capsys.readouterr().out

    changed = demo_sweep(tmp_path, "--model.init_args.gaussian_sigma", "8")
    assert main(["benchmark", "-c", str(changed)]) == 0
    out = capsys.readouterr()
    assert "ran cells: [0]" in out.out
    assert "the resolved config changed" in out.err and "model.init_args.gaussian_sigma: 2.0 -> 8.0" in out.err
    rows = read_rows(tmp_path / "demo")
    assert len(rows) == 2 and len({r["config_hash"] for r in rows}) == 2
    new_hash = rows[-1]["config_hash"]
    assert f"config {new_hash}\n" in (tmp_path / "demo/benchmark.md").read_text()  # the run's table: its own cells
    assert rows[1]["pixel_AUROC"] != rows[0]["pixel_AUROC"]  # the new sigma changed the maps

    assert main(["benchmark", "-c", str(changed), "--collect"]) == 1
    assert "holds cells of 2 different configs" in capsys.readouterr().err
    assert main(["benchmark", "-c", str(changed), "--collect", "--allow-mixed"]) == 0
    with pytest.raises(BenchmarkError, match="different configs"):
        collect(tmp_path / "demo")


@pytest.mark.slow
def test_a_failed_cell_is_one_line_the_others_run_and_the_exit_code_says_so(tmp_path: Path, capsys) -> None:
    config = write(tmp_path, "fail", method_config=[str(REPO / "configs/demo.yaml")], categories=["tile", "nope"],
                   shots=[1], seeds=[0], extra_args=["--data.init_args.root", str(tmp_path / "synthetic")])  # fmt: skip
    assert main(["benchmark", "-c", str(config)]) == 1
    log = (tmp_path / "fail/failures.log").read_text().splitlines()
    assert (
        len(log) == 1 and "cell 1 (nope k=1 seed=0" in log[0] and "DataError: data.category: 'nope' not found" in log[0]
    )
    assert [r["category"] for r in read_rows(tmp_path / "fail")] == ["tile"]
    assert "failed cells: [1]" in capsys.readouterr().out

    fail_fast = write(tmp_path, "ff", method_config=[str(REPO / "configs/demo.yaml")], categories=["nope", "tile"],
                      shots=[1], seeds=[0], extra_args=["--data.init_args.root", str(tmp_path / "synthetic")])  # fmt: skip
    assert main(["benchmark", "-c", str(fail_fast), "--fail-fast"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cell 0 (nope k=1 seed=0") and err.endswith("(--fail-fast)")
    assert read_rows(tmp_path / "ff") == []


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "configs/benchmark").glob("*.yaml") if not p.name.startswith("compare_"))
)
def test_list_cells_of_every_shipped_config_works_from_another_folder_offline(
    name: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """No weights are loaded to list cells (the pretrained tags are not cached here) and paths are file-relative."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["benchmark", "-c", str(REPO / "configs/benchmark" / name), "--list-cells"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    config = yaml.safe_load((REPO / "configs/benchmark" / name).read_text())
    cells = [line.split("\t") for line in out.splitlines() if line[:1].isdigit()]
    if config["categories"] != "all":
        assert len(cells) == len(config["categories"]) * len(config["shots"]) * len(config["seeds"])
        assert cells[0][3] == config["categories"][0]
    assert len(cells) == len(out.splitlines())  # one line per cell: `--list-cells | wc -l` sizes a SLURM array
    assert f"output {(REPO / 'configs/benchmark' / config['output']).resolve()}" in captured.err


def test_config_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "method.yaml").write_text((REPO / "configs/demo.yaml").read_text())
    (folder / "s.yaml").write_text(yaml.safe_dump({"method_config": "method.yaml", "root": "../data", "output": "out",
                                                   "feature_cache": {"folder": "../cache"}}))  # fmt: skip
    config = load_config(str(folder / "s.yaml"))
    assert config.method_config == [str(folder / "method.yaml")]
    assert config.root == str(tmp_path / "data") and config.output == str(folder / "out")
    assert config.feature_cache.folder == str(tmp_path / "cache")
    (folder / "bad.yaml").write_text(yaml.safe_dump({"method_config": "missing.yaml"}))
    with pytest.raises(BenchmarkError, match=r"method_config: .*sweeps/missing.yaml does not exist"):
        load_config(str(folder / "bad.yaml"))


def test_paper_columns_sit_beside_the_honest_ones_with_a_legend() -> None:
    rows = [
        {"config_hash": "h", "method": "m", "dataset": "d", "category": "a", "k": "1", "seed": s,
         "image_AUROC": "0.8", "pixel_AUROC": "0.9", "paper_best_epoch_image_AUROC": v, "paper_best_epoch_pixel_AUROC": "0.95",
         "image_AUROC_paper_max_fusion": "0.85"}
        for s, v in (("0", "0.9"), ("1", "0.8"))
    ]  # fmt: skip
    table = build_table(rows)
    header = next(line for line in table.splitlines() if line.startswith("| category"))
    assert header == "| category | k=1 I-AUROC | k=1 P-AUROC | k=1 I-AUROC† | k=1 P-AUROC† | k=1 I-AUROC‡ |"
    assert "| a | 80.00 ± 0.00 | 90.00 ± 0.00 | 85.00 ± 5.00 | 95.00 ± 0.00 | 85.00 ± 0.00 |" in table
    assert "† best epoch chosen on the test set" in table and "‡ max of the image AUROCs" in table
    honest_only = build_table([{k: v for k, v in r.items() if "paper" not in k} for r in rows])
    assert "†" not in honest_only and "Paper-protocol" not in honest_only


def test_benchmark_csv_gains_columns_without_losing_rows(tmp_path: Path) -> None:
    from fsad.benchmark import append_row

    path = tmp_path / "benchmark.csv"
    append_row({"config_hash": "a", "image_AUROC": 0.5}, path)
    append_row({"config_hash": "b", "image_AUROC": 0.6, "fit_seconds": 1.5}, path)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"config_hash": "a", "image_AUROC": "0.5", "fit_seconds": ""},
                    {"config_hash": "b", "image_AUROC": "0.6", "fit_seconds": "1.5"}]  # fmt: skip


@pytest.mark.slow
def test_every_cell_reads_the_feature_cache_and_float32_entries_give_the_uncached_numbers(tmp_path: Path) -> None:
    def sweep(name: str, cache: dict[str, object]) -> tuple[Sweep, list[dict[str, str]]]:
        path = write(tmp_path, name, method_config=[str(REPO / "configs/demo.yaml")], categories=["tile"], shots=[1, 2],
                     seeds=[0], feature_cache=cache,
                     extra_args=["--data.init_args.root", str(tmp_path / "synthetic"), "--seed_everything", "0"])  # fmt: skip
        runner = Sweep(load_config(str(path)))
        assert runner.run() == ([0, 1], [])
        return runner, read_rows(tmp_path / name)

    cached, cached_rows = sweep("cached", {"dtype": "float32"})
    images = cached.feature_cache.misses
    assert images > 0 and cached.feature_cache.hits == images  # the second cell read every test image back
    _, plain_rows = sweep("plain", {"enabled": False})
    metrics = ("image_AUROC", "pixel_AUROC", "image_F1max", "pixel_F1max")
    assert [[r[m] for m in metrics] for r in cached_rows] == [[r[m] for m in metrics] for r in plain_rows]


@pytest.mark.slow
def test_fewshot_fit_cells_fit_then_test_and_record_the_paper_protocol(tmp_path: Path, monkeypatch) -> None:
    fits = count_fits(monkeypatch)
    config = write(tmp_path, "pad", method_config=[str(REPO / "configs/promptad/synthetic_tiny.yaml")],
                   categories=["disc"], shots=[2], seeds=[0],
                   extra_args=["--data.init_args.root", str(tmp_path / "synthetic"), "--trainer.max_epochs", "2",
                               "--model.init_args.protocol", "paper"])  # fmt: skip
    assert main(["benchmark", "-c", str(config)]) == 0
    assert fits == ["SyntheticDataModule"]
    (row,) = read_rows(tmp_path / "pad")
    assert float(row["fit_seconds"]) > 0 and float(row["test_seconds"]) > 0
    best = yaml.safe_load(
        next((tmp_path / "pad/runs").glob("*/promptad/synthetic/disc/k2_s0/paper_best_epoch.json")).read_text()
    )
    assert float(row["paper_best_epoch_image_AUROC"]) == best["best"]["image_AUROC"]
    assert 0 <= float(row["image_AUROC_paper_max_fusion"]) <= 1
    table = (tmp_path / "pad/benchmark.md").read_text()
    assert "k=2 I-AUROC† |" in table and "k=2 I-AUROC‡ |" in table and "† best epoch chosen on the test set" in table
