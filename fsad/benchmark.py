"""``fsad benchmark``: sweep categories × shots × seeds of one method, resumably, into a paper-style table.

Each cell runs fit (when the method trains) then test in this process, through the same :class:`FsadCLI` as
``fsad fit``/``fsad test``, and is appended to ``benchmark.csv`` the moment it finishes, so a killed sweep resumes
where it stopped. ``--cell-index N`` runs one cell (a SLURM array task); ``--collect`` rebuilds the table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from fsad.callbacks.metrics import AnomalyMetrics
from fsad.callbacks.results import markdown_table, write_text_atomically
from fsad.cli import FsadCLI

KEY_COLUMNS = ("method", "dataset", "category", "k", "seed")
TABLE_METRICS = (("image_AUROC", "I-AUROC"), ("pixel_AUROC", "P-AUROC"), ("pixel_AUPRO", "AUPRO"),
                 ("image_F1max", "I-F1"), ("pixel_F1max", "P-F1"))  # fmt: skip


class BenchmarkConfig(BaseModel):
    """The sweep: method config(s), data root, and the lists to cross."""

    model_config = ConfigDict(extra="forbid")
    method_config: list[str] = Field(min_length=1, description="LightningCLI config files, as given to -c")
    root: str | None = Field(None, description="dataset root, overriding data.init_args.root")
    categories: list[str] | Literal["all"] = "all"
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output: str = "runs/benchmark"
    extra_args: list[str] = Field(default_factory=list, description="more CLI overrides for every cell")
    wandb_project: str | None = None


def load_config(path: str) -> BenchmarkConfig:
    """Read and validate a benchmark config; errors name the file and the field."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"error: cannot read benchmark config {path}: {err}") from None
    if isinstance(data.get("method_config"), str):
        data["method_config"] = [data["method_config"]]
    try:
        return BenchmarkConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SystemExit(f"error: {path}: {problems}") from None


@dataclass(frozen=True)
class Cell:
    index: int
    category: str
    k: int
    seed: int

    def args(self, config: BenchmarkConfig) -> list[str]:
        """CLI arguments of this cell (without a subcommand)."""
        args = [arg for cfg in config.method_config for arg in ("-c", cfg)]
        args += ["--run_root", str(Path(config.output) / "runs"), *config.extra_args]
        if config.root is not None:
            args += ["--data.init_args.root", config.root]
        return args + [
            "--data.init_args.category", self.category, "--data.init_args.k_shot", str(self.k),
            "--data.init_args.seed", str(self.seed),
        ]  # fmt: skip


class Sweep:
    """The cells of a benchmark config and the CSV of finished ones."""

    def __init__(self, config: BenchmarkConfig) -> None:
        self.config = config
        self.output = Path(config.output)
        self.csv_path = self.output / "benchmark.csv"
        probe = FsadCLI(args=Cell(0, "__probe__", config.shots[0], config.seeds[0]).args(config), run=False)
        self.method = getattr(probe.model, "method_name", type(probe.model).__name__)
        self.dataset = getattr(probe.datamodule, "dataset_name", type(probe.datamodule).__name__)
        self.trains = is_overridden("training_step", probe.model, LightningModule)
        if config.categories == "all":
            if hasattr(probe.datamodule, "prepare_data"):
                probe.datamodule.prepare_data()
            categories = probe.datamodule.available_categories()
        else:
            categories = list(config.categories)
        self.cells = [
            Cell(i, c, k, s)
            for i, (c, k, s) in enumerate(itertools.product(categories, config.shots, config.seeds))
        ]

    def key(self, cell: Cell) -> tuple[str, ...]:
        return (self.method, self.dataset, cell.category, str(cell.k), str(cell.seed))

    def finished(self) -> dict[tuple[str, ...], dict[str, str]]:
        """Finished cells from ``benchmark.csv`` and from the per-cell files of array tasks (``cells/*.csv``)."""
        return {tuple(row[c] for c in KEY_COLUMNS): row for row in read_rows(self.output)}

    def run_cell(self, cell: Cell) -> dict[str, object]:
        """fit (if the method trains) then test; returns the CSV row."""
        cli = FsadCLI(args=cell.args(self.config), run=False)
        if self.trains:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        metrics = next((cb.results for cb in cli.trainer.callbacks if isinstance(cb, AnomalyMetrics)), None)
        if metrics is None:
            raise SystemExit("error: the method config has no fsad.callbacks.metrics.AnomalyMetrics callback to read from")
        return dict(zip(KEY_COLUMNS, self.key(cell), strict=True)) | dict(metrics)

    def append(self, row: dict[str, object], path: Path) -> None:
        """Append one finished cell to ``path`` and flush it to disk at once (a killed sweep keeps it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            with path.open(newline="") as handle:
                columns = next(csv.reader(handle))
            if set(row) - set(columns):
                raise SystemExit(f"error: {path} has columns {columns}; this cell adds {sorted(set(row) - set(columns))}")
        else:
            columns = list(row)
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())

    def run(self, only: int | None = None) -> list[int]:
        """Run the unfinished cells (or only cell ``only``); returns the indices that ran."""
        done = self.finished()
        todo = [c for c in self.cells if self.key(c) not in done and (only is None or c.index == only)]
        ran = []
        with tqdm(total=len(self.cells), initial=len(self.cells) - len(todo) if only is None else 0,
                  desc="benchmark", unit="cell") as bar:  # fmt: skip
            for cell in todo:
                bar.set_postfix_str(f"{cell.category} k={cell.k} seed={cell.seed}")
                target = self.csv_path if only is None else self.output / "cells" / f"{cell.index}.csv"
                self.append(self.run_cell(cell), target)
                ran.append(cell.index)
                bar.update(1)
        return ran


def format_mean_std(values: list[float]) -> str:
    """Percent, two decimals, ``mean ± std`` over seeds (population std; no ± with one seed)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f} ± {100 * statistics.pstdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def build_table(rows: list[dict[str, str]]) -> str:
    """Paper-style table: one row per category plus the mean, one column group per k, mean ± std over seeds.

    The mean row averages the categories per seed first, then reports mean ± std of those averages over seeds.
    """
    metrics = [(name, label) for name, label in TABLE_METRICS if any(r.get(name) not in (None, "") for r in rows)]
    shots = sorted({int(r["k"]) for r in rows})
    categories = sorted({r["category"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})

    def value(row: dict[str, str], name: str) -> float:
        return float(row[name]) if row.get(name) not in (None, "") else float("nan")

    lines = []
    for category in [*categories, "mean"]:
        line: dict[str, object] = {"category": category}
        for k in shots:
            for name, label in metrics:
                if category == "mean":
                    per_seed = [
                        statistics.fmean(
                            value(r, name) for r in rows if int(r["k"]) == k and r["seed"] == seed
                        )
                        for seed in seeds
                        if any(int(r["k"]) == k and r["seed"] == seed for r in rows)
                    ]
                else:
                    per_seed = [value(r, name) for r in rows if r["category"] == category and int(r["k"]) == k]
                line[f"k={k} {label}"] = format_mean_std(per_seed)
        lines.append(line)
    first = rows[0]
    return f"# {first['method']} on {first['dataset']}\n\n" + markdown_table(lines)


def log_table_to_wandb(project: str, table_rows: list[dict[str, str]], markdown: str) -> None:
    try:
        import wandb

        run = wandb.init(project=project, job_type="benchmark", reinit=True)
        columns = list(table_rows[0])
        run.log({"benchmark": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table_rows])})
        run.summary["benchmark_markdown"] = markdown
        run.finish()
    except Exception as err:  # W&B failures never lose the table on disk
        warnings.warn(f"could not log the benchmark table to W&B ({type(err).__name__}: {err})", stacklevel=2)


def read_rows(sweep_output: Path) -> list[dict[str, str]]:
    """Rows of ``benchmark.csv`` followed by those of ``cells/*.csv``."""
    paths = [sweep_output / "benchmark.csv", *sorted((sweep_output / "cells").glob("*.csv"))]
    rows = []
    for path in paths:
        if path.is_file():
            with path.open(newline="") as handle:
                rows += list(csv.DictReader(handle))
    return rows


def collect(sweep_output: Path, wandb_project: str | None = None) -> str:
    """Write ``benchmark.md`` from every finished cell; returns the markdown."""
    rows = list({tuple(r[c] for c in KEY_COLUMNS): r for r in read_rows(sweep_output)}.values())
    if not rows:
        raise SystemExit(f"error: no finished cells yet under {sweep_output}")
    markdown = build_table(rows)
    write_text_atomically(sweep_output / "benchmark.md", markdown)
    if wandb_project:
        log_table_to_wandb(wandb_project, rows, markdown)
    return markdown


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsad benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="benchmark config YAML (configs/benchmark/*.yaml)")
    parser.add_argument("--cell-index", type=int, help="run only this cell (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--list-cells", action="store_true", help="print the cells and exit")
    parser.add_argument("--collect", action="store_true", help="only rebuild benchmark.md from benchmark.csv")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    output = Path(config.output)
    if args.collect:
        print(collect(output, config.wandb_project))
        return 0
    sweep = Sweep(config)
    if args.list_cells:
        done = sweep.finished()
        for cell in sweep.cells:
            state = "done" if sweep.key(cell) in done else "todo"
            print(f"{cell.index}\t{sweep.method}\t{sweep.dataset}\t{cell.category}\tk={cell.k}\tseed={cell.seed}\t{state}")
        return 0
    if args.cell_index is not None and not 0 <= args.cell_index < len(sweep.cells):
        raise SystemExit(f"error: --cell-index {args.cell_index} outside 0..{len(sweep.cells) - 1}")
    ran = sweep.run(args.cell_index)
    print(f"ran cells: {ran}")
    if args.cell_index is None:
        print(collect(output, config.wandb_project))
    return 0
