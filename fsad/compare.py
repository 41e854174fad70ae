"""``fsad compare``: several methods' sweeps on the same categories, k and seeds, in one table beside the published rows.

Each entry names a benchmark config (``configs/benchmark/<method>_<dataset>.yaml``), so every method keeps its own
protocol (few-shot fit, training-free, or pretrained once); the comparison config sets what must be shared: the
dataset root, the categories, the k values and the seeds. Each method's sweep runs (or resumes) under
``<output>/<name>/`` as ``fsad benchmark`` would run it, but all of them share one feature cache,
``<output>/feature_cache`` (methods whose backbone and preprocessing match read each other's entries;
``share_feature_cache: false`` keeps one per sweep). ``compare.md`` gets one row per method with, per k, the image
and pixel AUROC (%) averaged over categories then seeds, and the published numbers beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fsad.benchmark import HASH_COLUMN, BenchmarkError, Sweep, load_config, read_rows
from fsad.callbacks.results import markdown_table, write_text_atomically

METRICS = (("image_AUROC", "image"), ("pixel_AUROC", "pixel"))


class CompareMethod(BaseModel):
    """One row: a benchmark config, the k values it runs (default: the comparison's) and its published numbers."""

    model_config = ConfigDict(extra="forbid")
    name: str
    benchmark: str = Field(description="benchmark config of the method, as given to `fsad benchmark -c`")
    shots: list[int] | None = Field(None, description="k values of this row (e.g. [0] for zero-shot WinCLIP)")
    extra_args: list[str] = Field(default_factory=list, description="added to the benchmark config's extra_args")
    published: dict[int, list[float | None]] = Field(
        default_factory=dict, description="k -> [image AUROC, pixel AUROC] in %, as the source table prints them"
    )
    source: str = ""


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str | None = None
    categories: list[str] | str = "all"
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output: str = "runs/compare"
    share_feature_cache: bool = Field(
        True, description="one feature cache, <output>/feature_cache, for every method; false: one per method's sweep"
    )
    methods: list[CompareMethod] = Field(min_length=1)


def load_compare_config(path: str) -> CompareConfig:
    """Read a comparison config; errors name the file and the field; relative paths resolve against its folder."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        config = CompareConfig.model_validate(data)
    except (OSError, yaml.YAMLError) as err:
        raise BenchmarkError(f"cannot read comparison config {path}: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise BenchmarkError(f"{path}: {problems}") from None
    base = Path(path).resolve().parent
    config.output = str((base / config.output).resolve())
    if config.root is not None:
        config.root = str((base / Path(config.root).expanduser()).resolve())
    for method in config.methods:
        method.benchmark = str((base / method.benchmark).resolve())
        if not Path(method.benchmark).is_file():
            raise BenchmarkError(f"{path}: methods.{method.name}.benchmark: {method.benchmark} does not exist")
    return config


def run_method(config: CompareConfig, method: CompareMethod) -> tuple[Sweep, list[int]]:
    """Run (or resume) one method's sweep on the comparison's categories, k and seeds, with the comparison's one
    feature-cache folder unless ``share_feature_cache`` is off; returns it and failed cells."""
    sweep_config = load_config(method.benchmark)
    cache = sweep_config.feature_cache
    if config.share_feature_cache:
        shared = str(Path(config.output) / "feature_cache")
        if cache.folder not in (None, shared):
            print(f"compare: {method.name}: feature_cache.folder {cache.folder} of {method.benchmark} gives way to the "
                  f"comparison's shared {shared} (share_feature_cache: false keeps it)", file=sys.stderr)  # fmt: skip
        cache = cache.model_copy(update={"folder": shared})
    sweep_config = sweep_config.model_copy(update={
        "root": config.root or sweep_config.root, "categories": config.categories,
        "shots": method.shots or config.shots, "seeds": config.seeds,
        "output": str(Path(config.output) / method.name), "extra_args": [*sweep_config.extra_args, *method.extra_args],
        "wandb_project": None,
        "feature_cache": cache,
    })  # fmt: skip
    sweep = Sweep(sweep_config)
    _, failed = sweep.run()
    return sweep, failed


def mean_over_seeds(rows: list[dict[str, str]], k: int, metric: str) -> float | None:
    """Mean over seeds of the mean over categories, in %, or None when no cell of that k finished."""
    seeds = sorted({r["seed"] for r in rows if int(r["k"]) == k})
    per_seed = [statistics.fmean(float(r[metric]) for r in rows if int(r["k"]) == k and r["seed"] == s) for s in seeds]
    return 100 * statistics.fmean(per_seed) if per_seed else None


def comparison_table(results: list[tuple[CompareMethod, list[dict[str, str]]]]) -> str:
    """One row per method; per k, ``ours (published)`` image and pixel AUROC in %."""
    shots = sorted({int(r["k"]) for _, rows in results for r in rows} | {k for m, _ in results for k in m.published})
    lines = []
    for method, rows in results:
        line: dict[str, object] = {"method": method.name}
        for k in shots:
            published = method.published.get(k, [None, None])
            for (metric, label), paper in zip(METRICS, published, strict=True):
                ours = mean_over_seeds(rows, k, metric)
                text = "—" if ours is None else f"{ours:.1f}"
                line[f"k={k} {label}"] = text + (f" ({paper:g})" if paper is not None else "")
        line["published in"] = method.source or "—"
        lines.append(line)
    return (
        "# Comparison: image / pixel AUROC (%), mean over categories then seeds; published numbers in brackets\n\n"
        + markdown_table(lines)
    )


def main(argv: list[str]) -> int:
    """``fsad compare -c configs/benchmark/compare_<dataset>.yaml``; 1 when any cell failed."""
    parser = argparse.ArgumentParser(prog="fsad compare", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="comparison config YAML")
    args = parser.parse_args(argv)
    config = load_compare_config(args.config)
    results, any_failed = [], False
    for method in config.methods:
        print(f"compare: {method.name} ({Path(method.benchmark).name})")
        sweep, failed = run_method(config, method)
        any_failed |= bool(failed)
        rows = [r for r in read_rows(sweep.output) if r.get(HASH_COLUMN) == sweep.config_hash]
        results.append((method, rows))
    markdown = comparison_table(results)
    write_text_atomically(Path(config.output) / "compare.md", markdown)
    print(markdown)
    return 1 if any_failed else 0
