"""Per-run result tables: ``results.csv`` and ``results.md`` in the run directory, plus the W&B run summary, and
``scores.csv``: one row per test image (path, ground-truth label, defect type, raw image score, and the predicted
label when the model carries an image threshold), so a test run can be compared image by image with ``fsad
predict``, an export or the Inferencer."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from fsad.batch import Batch
from fsad.callbacks.metrics import AnomalyMetrics, gather_to_rank_zero
from fsad.lightning_modules.components.run_settings import run_config_hash
from fsad.run_folder import output_path, write_text_atomically

METRIC_PREFIXES = ("image_", "pixel_")


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


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of ``rows`` with a header of the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table of ``rows`` (floats with 4 decimals)."""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class ResultsWriter(Callback):
    """Writes one row per test run (identity, every metric, the config hash) and ``scores.csv`` (one row per test
    image). Prints the row as a table too."""

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        self.row: dict[str, Any] = {}
        self.scores: dict[int, dict[str, Any]] = {}

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.scores = {}

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        result = outputs if isinstance(outputs, Batch) else batch
        samples = getattr(trainer.datamodule, "test_samples", None) or []
        thresholds = pl_module.thresholds
        for row, path in enumerate(result.image_path):
            index = int(result.index[row])
            score = result.pred_score[row]
            defect = samples[index].defect if index < len(samples) else Path(path).parent.name
            self.scores[index] = {"path": path, "gt_label": int(result.gt_label[row]), "defect_type": defect,
                                  "score": repr(float(score))}  # fmt: skip
            if thresholds.has_image:
                self.scores[index]["pred_label"] = int(thresholds.image_label(score.reshape(1))[0])

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shards = gather_to_rank_zero(self.scores)  # rank 0 writes; DDP padding copies share their image's index
        if shards is None:
            return
        scores = {index: row for shard in shards for index, row in shard.items()}
        # AnomalyMetrics keeps float64 numbers; the logged copies are float32 tensors
        exact = {k: v for cb in trainer.callbacks if isinstance(cb, AnomalyMetrics) for k, v in cb.results.items()}
        logged = {n: float(v) for n, v in trainer.callback_metrics.items() if n.startswith(METRIC_PREFIXES)}
        metrics = dict(sorted({**logged, **exact}.items()))
        seed = os.environ.get("PL_GLOBAL_SEED")
        self.row = {
            **run_identity(trainer, pl_module),
            **metrics,
            "config_hash": pl_module.run_config_hash
            or run_config_hash(pl_module, trainer.datamodule, int(seed) if seed else None),
        }
        run_dir = Path(trainer.default_root_dir)
        write_text_atomically(output_path(run_dir, "scores.csv"), csv_text([scores[i] for i in sorted(scores)]))
        write_text_atomically(output_path(run_dir, "results.csv"), csv_text([self.row]))
        table = markdown_table([self.row])
        write_text_atomically(output_path(run_dir, "results.md"), table)
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
