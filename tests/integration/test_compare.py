"""``fsad compare``: every method's sweep on the same cells, one table with the published numbers beside each row."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from fsad.benchmark import load_config, read_rows
from fsad.cli import main
from fsad.compare import load_compare_config
from fsad.datamodules.synthetic import SyntheticDataModule

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "configs" / "benchmark"


def demo_comparison(tmp_path: Path) -> Path:
    """configs/benchmark/compare_demo.yaml with absolute paths and its output under tmp_path."""
    config = yaml.safe_load((BENCHMARKS / "compare_demo.yaml").read_text())
    config["output"] = str(tmp_path / "compare")
    for method in config["methods"]:
        method["benchmark"] = str(BENCHMARKS / method["benchmark"])
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_demo_comparison_runs_every_method_and_prints_one_table(tmp_path: Path, capsys) -> None:
    assert main(["compare", "-c", str(demo_comparison(tmp_path))]) == 0
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert table in capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line
    }
    methods = {"membank", "WinCLIP", "WinCLIP+", "APRIL-GAN", "PromptAD", "FineGrainedAD", "KAG-prompt"}
    assert set(rows) == {"method", *methods}
    assert rows["method"].split("|")[2:6] == [" k=0 image ", " k=0 pixel ", " k=1 image ", " k=1 pixel "]
    assert "(93.1)" in rows["WinCLIP+"] and "(95.2)" in rows["WinCLIP+"]
    assert rows["WinCLIP"].split("|")[2].strip() != "—" and rows["WinCLIP"].split("|")[4].strip() == "—"
    # the membank cell, read from its own sweep's CSV, is the number in the table (×100, one decimal)
    with (tmp_path / "compare" / "membank" / "benchmark.csv").open() as handle:
        (cell,) = list(csv.DictReader(handle))
    assert rows["membank"].split("|")[5].strip() == f"{100 * float(cell['pixel_AUROC']):.1f}"
    # KAG-prompt and APRIL-GAN kept their own protocol: pretrained once, never fitted on the cell's shot
    assert (tmp_path / "compare" / "KAG-prompt" / "pretrain").is_dir()
    assert (tmp_path / "compare" / "APRIL-GAN" / "pretrain").is_dir()


def test_a_missing_benchmark_config_is_one_error_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": "x", "benchmark": "nowhere.yaml"}]}))
    assert main(["compare", "-c", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {path}: methods.x.benchmark: {tmp_path / 'nowhere.yaml'} does not exist"


@pytest.mark.parametrize("name", sorted(p.name for p in BENCHMARKS.glob("compare_*.yaml")))
def test_shipped_comparisons_name_valid_sweeps(name: str) -> None:
    """Every row's benchmark config loads; the real-data comparisons hold every method the papers compare with."""
    config = load_compare_config(str(BENCHMARKS / name))
    for method in config.methods:
        load_config(method.benchmark)
    names = [m.name for m in config.methods]
    assert names == ["membank", "WinCLIP", "WinCLIP+", "APRIL-GAN", "PromptAD", "FineGrainedAD", "KAG-prompt"]
    if name != "compare_demo.yaml":
        assert all(config.methods[i].published.keys() == {1, 2, 4} for i in range(2, 7))


def winclip_comparison(tmp_path: Path, share: bool = True) -> Path:
    """WinCLIP (k = 0) then WinCLIP+ (k = 1) on the demo data through float32 feature-cache entries; the shared
    comparison's benchmark config names a cache folder of its own, which the comparison replaces."""
    benchmark = yaml.safe_load((BENCHMARKS / "winclip_demo.yaml").read_text())
    benchmark["method_config"] = [str(BENCHMARKS / p) for p in benchmark["method_config"]]
    benchmark["extra_args"] += ["--data.init_args.root", str(tmp_path / "synthetic")]
    benchmark["feature_cache"] = {"dtype": "float32"} | ({"folder": str(tmp_path / "own_cache")} if share else {})
    (tmp_path / "winclip.yaml").write_text(yaml.safe_dump(benchmark))
    output = tmp_path / ("compare" if share else "apart")
    config = {"categories": ["disc"], "seeds": [0], "output": str(output), "share_feature_cache": share, "methods": [
        {"name": "WinCLIP", "benchmark": str(tmp_path / "winclip.yaml"), "shots": [0]},
        {"name": "WinCLIP+", "benchmark": str(tmp_path / "winclip.yaml"), "shots": [1]},
    ]}  # fmt: skip
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


CACHE_LINE = re.compile(r"^benchmark: feature cache (\S+) \(float32\): (.*)$", re.MULTILINE)


def cache_counts(summary: str) -> dict[str, tuple[int, int]]:
    """``{part: (hits, misses)}`` of one printed feature-cache line."""
    found = re.findall(r"(\S+) (\d+) hits / (\d+) misses", summary)
    return {part: (int(hits), int(misses)) for part, hits, misses in found}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_winclip_plus_reads_what_winclip_stored_in_the_one_cache_and_gets_the_uncached_numbers(
    tmp_path: Path, capsys
) -> None:
    assert main(["compare", "-c", str(winclip_comparison(tmp_path))]) == 0
    out, err = capsys.readouterr()
    lines = CACHE_LINE.findall(out)
    # the benchmark config's own cache folder gives way to the shared one, and the run says so
    assert f"compare: WinCLIP+: feature_cache.folder {tmp_path / 'own_cache'} of " in err
    names = ("WinCLIP", "WinCLIP+")
    assert [folder for folder, _ in lines] == [str(tmp_path / "compare" / "feature_cache")] * len(names)
    data = SyntheticDataModule(root=str(tmp_path / "synthetic"), category="disc", k_shot=1)
    data.setup()
    images = len(data.test_samples)
    parts = ("backbone", "winclip-windows-2x2", "winclip-windows-3x3")
    assert cache_counts(lines[0][1]) == dict.fromkeys(parts, (0, images))  # WinCLIP computes and stores
    assert cache_counts(lines[1][1]) == dict.fromkeys(parts, (images, 0))  # WinCLIP+ reads every entry back

    plain = yaml.safe_load((tmp_path / "winclip.yaml").read_text())
    plain |= {"shots": [1], "seeds": [0], "categories": ["disc"], "output": str(tmp_path / "plain"),
              "feature_cache": {"enabled": False}}  # fmt: skip
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    assert main(["benchmark", "-c", str(tmp_path / "plain.yaml")]) == 0
    (shared,) = read_rows(tmp_path / "compare" / "WinCLIP+")
    (uncached,) = read_rows(tmp_path / "plain")
    metrics = ("image_AUROC", "pixel_AUROC", "image_F1max", "pixel_F1max")
    assert [shared[m] for m in metrics] == [uncached[m] for m in metrics]

    # control: with one cache per method's sweep, WinCLIP+ finds nothing WinCLIP computed
    assert main(["compare", "-c", str(winclip_comparison(tmp_path, share=False))]) == 0
    lines = CACHE_LINE.findall(capsys.readouterr().out)
    assert [folder for folder, _ in lines] == [str(tmp_path / "apart" / name / "feature_cache") for name in names]
    assert cache_counts(lines[1][1]) == dict.fromkeys(parts, (0, images))
