"""Per-run result tables: ``results.csv`` and ``results.md`` in the run directory, plus the W&B run summary."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from fsad.callbacks.metrics import AnomalyMetrics

METRIC_PREFIXES = ("image_", "pixel_")


def config_hash(*parts: Any) -> str:
    """Short sha1 of a canonical JSON dump of the run's hyper-parameters."""
    text = json.dumps([dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_identity(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """method, dataset, category, k and seed of this run, read from the module and the datamodule."""
    data = trainer.datamodule
    return {
        "method": getattr(pl_module, "method_name", type(pl_module).__name__),
        "dataset": getattr(data, "dataset_name", type(data).__name__ if data is not None else ""),
        "category": getattr(data, "category", ""),
        "k": getattr(data, "k_shot", ""),
        "seed": getattr(data, "seed", ""),
    }


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def replace_directory(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` folder in place of ``target`` (the previous run's copy goes only now)."""
    retired = target.with_name(target.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def fresh_directory(path: Path) -> Path:
    """An empty ``path`` (leftovers of an interrupted attempt removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table of ``rows`` (floats with 4 decimals)."""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class ResultsWriter(Callback):
    """Writes one row per test run: identity, every metric, and the config hash. Prints it as a table too."""

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        self.row: dict[str, Any] = {}

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # AnomalyMetrics keeps float64 numbers; the logged copies are float32 tensors
        exact = {k: v for cb in trainer.callbacks if isinstance(cb, AnomalyMetrics) for k, v in cb.results.items()}
        logged = {n: float(v) for n, v in trainer.callback_metrics.items() if n.startswith(METRIC_PREFIXES)}
        metrics = dict(sorted({**logged, **exact}.items()))
        data_hparams = getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule is not None else {}
        self.row = {
            **run_identity(trainer, pl_module),
            **metrics,
            "config_hash": config_hash(pl_module.hparams, data_hparams),
        }
        run_dir = Path(trainer.default_root_dir)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.row))
        writer.writeheader()
        writer.writerow(self.row)
        write_text_atomically(run_dir / "results.csv", buffer.getvalue())
        table = markdown_table([self.row])
        write_text_atomically(run_dir / "results.md", table)
        if self.print_table:
            print(f"\nResults ({run_dir}):\n{table}")
        self._log_to_wandb(trainer)

    def _log_to_wandb(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                logger.experiment.summary.update(self.row)
                logger.log_table(key="results", columns=list(self.row), data=[list(self.row.values())])
            except Exception as err:  # W&B problems never end the run
                warnings.warn(f"could not log results to W&B ({type(err).__name__}: {err})", UserWarning, stacklevel=2)
