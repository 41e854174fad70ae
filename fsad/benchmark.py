"""``fsad benchmark``: sweep categories × shots × seeds of one method, resumably, into a paper-style table.

Each cell runs in this process through the same :class:`FsadCLI` as ``fsad fit``/``fsad test``, the way the
method's ``protocol_stage`` says (README.md, "Sweeps: the papers' tables"):

* ``fewshot_fit``: fit on the cell's k shots, then test (PromptAD, FineGrainedAD);
* ``training_free``: test only (memory bank);
* ``pretrained``: test every cell from one checkpoint, given as ``pretrained_checkpoint:`` or trained once by the
  config's ``pretrain:`` block (resumable, recorded in ``<output>/pretrain/``); never fitted on support shots.

A finished cell is appended to ``benchmark.csv`` at once, with the hash of the resolved config, so a killed sweep
resumes where it stopped and a changed config reruns its cells. ``--cell-index N`` runs one cell (a SLURM array
task); ``--collect`` rebuilds the table. The backbone outputs of test images are cached under
``<output>/feature_cache`` (or ``feature_cache.folder``; ``fsad compare`` gives all its methods one) and shared by
every cell (components/feature_cache.py); the sweep prints one line of hits and misses at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.pytorch.loggers import WandbLogger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fsad.callbacks.metrics import AnomalyMetrics
from fsad.callbacks.results import markdown_table
from fsad.checkpoints import read_checkpoint
from fsad.cli import FsadCLI, _import_class
from fsad.errors import FsadError, OneLineArgumentParser
from fsad.lightning_modules.components.feature_cache import FeatureCache
from fsad.lightning_modules.components.run_settings import evaluation_change_line
from fsad.progress import progress_reporter
from fsad.run_folder import is_storage_failure, write_text_atomically
from fsad.signals import exception_chain, user_facing_error

KEY_COLUMNS = ("method", "dataset", "category", "k", "seed")
HASH_COLUMN = "config_hash"
TABLE_METRICS = (("image_AUROC", "I-AUROC"), ("pixel_AUROC", "P-AUROC"), ("pixel_AUPRO", "AUPRO"),
                 ("image_F1max", "I-F1"), ("pixel_F1max", "P-F1"))  # fmt: skip
PAPER_METRICS = (
    ("paper_best_epoch_image_AUROC", "I-AUROC†"),
    ("paper_best_epoch_pixel_AUROC", "P-AUROC†"),
    ("image_AUROC_paper_max_fusion", "I-AUROC‡"),
)
PAPER_LEGEND = (
    "Honest columns: last epoch, one image-score fusion. Paper-protocol columns (the authors' reporting, for "
    "comparison with their tables only; both select with test labels): † best epoch chosen on the test set; "
    "‡ max of the image AUROCs of the two image-score fusions."
)
AP_AUPRO_METRICS = (("image_AP", "I-AP"), ("pixel_AP", "P-AP"), ("pixel_AUPRO", "AUPRO"))
METRIC_DEFINITIONS = (
    "Metrics, in percent: I-AUROC / P-AUROC, area under the image- / pixel-level ROC curve (ties count ½); I-F1 / "
    "P-F1, the best F1 over all thresholds; I-AP / P-AP, average precision Σ ΔRecall·Precision; AUPRO, area under "
    "the per-region-overlap curve up to a false-positive rate of 0.3, divided by 0.3; – where a cell did not record it."
)
HONEST_LEGEND = "Protocol: honest (last epoch, one image-score fusion, no test labels used for any choice)."
PROTOCOL_STAGES = ("fewshot_fit", "training_free", "pretrained")


class BenchmarkError(FsadError):
    """A mistake in a benchmark config or its output folder."""


class PretrainConfig(BaseModel):
    """The once-per-sweep training of a ``pretrained`` method (e.g. KAG-prompt's auxiliary NSA training)."""

    model_config = ConfigDict(extra="forbid")
    method_config: list[str] = Field(min_length=1, description="LightningCLI config files of the `fsad fit` run")
    extra_args: list[str] = Field(default_factory=list, description="more CLI overrides of that fit")


class FeatureCacheConfig(BaseModel):
    """The sweep's cache of test-image backbone outputs (``<output>/feature_cache`` unless ``folder`` is given)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    folder: str | None = Field(None, description="null = <output>/feature_cache; fsad compare sets one for all")
    max_gb: float = Field(4.0, gt=0)
    dtype: Literal["float16", "float32"] = "float16"


class BenchmarkConfig(BaseModel):
    """The sweep: method config(s), data root, the lists to cross, and how a pretrained method gets its weights.

    Relative paths (``method_config``, ``root``, ``output``, ``pretrained_checkpoint``, ``pretrain.method_config``)
    resolve against the benchmark config file's folder, so a sweep runs the same from any folder.
    """

    model_config = ConfigDict(extra="forbid")
    method_config: list[str] = Field(min_length=1, description="LightningCLI config files, as given to -c")
    root: str | None = Field(None, description="dataset root, overriding data.init_args.root")
    categories: list[str] | Literal["all"] = "all"
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)  # 0: zero-shot (WinCLIP only)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output: str = "runs/benchmark"
    extra_args: list[str] = Field(default_factory=list, description="more CLI overrides for every cell")
    wandb_project: str | None = None
    ap_aupro_columns: bool = Field(False, description="benchmark.md also shows I-AP, P-AP and AUPRO columns")
    pretrained_checkpoint: str | None = Field(None, description="checkpoint every cell of a pretrained method tests")
    pretrain: PretrainConfig | None = None
    feature_cache: FeatureCacheConfig = Field(default_factory=FeatureCacheConfig)


def _resolve(base: Path, path: str | None) -> str | None:
    return None if path is None else str((base / Path(path).expanduser()).resolve())


def load_config(path: str) -> BenchmarkConfig:
    """Read and validate a benchmark config; errors name the file and the field; relative paths become absolute."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BenchmarkError(f"cannot read benchmark config {path}: {err}") from None
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: a benchmark config is a mapping of fields, got {type(data).__name__}")
    for holder in (data, data.get("pretrain")):
        if isinstance(holder, dict) and isinstance(holder.get("method_config"), str):
            holder["method_config"] = [holder["method_config"]]
    try:
        config = BenchmarkConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise BenchmarkError(f"{path}: {problems}") from None
    base = Path(path).resolve().parent
    config.method_config = [_resolve(base, p) for p in config.method_config]
    config.root = _resolve(base, config.root)
    config.output = _resolve(base, config.output)
    config.pretrained_checkpoint = _resolve(base, config.pretrained_checkpoint)
    config.feature_cache.folder = _resolve(base, config.feature_cache.folder)
    if config.pretrain is not None:
        config.pretrain.method_config = [_resolve(base, p) for p in config.pretrain.method_config]
    for field, files in (("method_config", config.method_config),
                         ("pretrain.method_config", config.pretrain.method_config if config.pretrain else [])):  # fmt: skip
        missing = [file for file in files if not Path(file).is_file()]
        if missing:
            raise BenchmarkError(f"{path}: {field}: {', '.join(missing)} does not exist")
    return config


@dataclass(frozen=True)
class Cell:
    index: int
    category: str
    k: int
    seed: int

    def args(self, config: BenchmarkConfig, run_root: Path) -> list[str]:
        """CLI arguments of this cell (without a subcommand)."""
        args = [arg for cfg in config.method_config for arg in ("-c", cfg)]
        args += ["--run_root", str(run_root), *config.extra_args]
        if config.root is not None:
            args += ["--data.init_args.root", config.root]
        return args + [
            "--data.init_args.category", self.category, "--data.init_args.k_shot", str(self.k),
            "--data.init_args.seed", str(self.seed),
        ]  # fmt: skip


class ParsedConfig(FsadCLI):
    """A cell's config parsed and resolved, but nothing instantiated: no backbone weights are loaded, so listing
    and hashing a sweep works offline and in a second."""

    def instantiate_classes(self) -> None:
        self.model_class = _import_class(self.config.model.class_path)
        self.data_class = _import_class(self.config.data.class_path)

    def after_instantiate_classes(self) -> None:
        return None


def sweep_hash(resolved: dict[str, Any]) -> str:
    """The sweep's identity (``benchmark.csv``'s ``config_hash`` column, the resume key): a short SHA-1 of its resolved
    config with the cell keys left out. Each row also carries its cell's run config hash (``run_config_hash``)."""
    text = json.dumps([resolved], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def resolved_config(cli: FsadCLI, drop: tuple[str, ...]) -> dict[str, Any]:
    """The fully resolved LightningCLI config of ``cli`` (defaults included) without the keys in ``drop``."""
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_validation=True, skip_none=False))
    for dotted in drop:
        *parents, leaf = dotted.split(".")
        holder = config
        for name in parents:
            holder = holder.get(name) or {} if isinstance(holder, dict) else {}
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    return config


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of a nested mapping (lists are leaves)."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for the keys that differ between two resolved configs."""
    before, after = flatten(old), flatten(new)
    changed = [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]  # fmt: skip
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more if changed else "no difference in the saved configs"


CELL_KEYS = ("config", "data.init_args.category", "data.init_args.k_shot", "data.init_args.seed", "seed_everything",
             "run_root", "trainer.default_root_dir", "report")  # fmt: skip


class Sweep:
    """The cells of a benchmark config, how the method is run, and the CSV of finished ones."""

    def __init__(self, config: BenchmarkConfig, fail_fast: bool = False) -> None:
        self.config = config
        self.fail_fast = fail_fast
        self.output = Path(config.output)
        self.csv_path = self.output / "benchmark.csv"
        self.failures_path = self.output / "failures.log"
        probe = ParsedConfig(
            args=Cell(0, "__probe__", config.shots[0], config.seeds[0]).args(config, self.output), run=False
        )
        model_cls, data_cls = probe.model_class, probe.data_class
        self.method = getattr(model_cls, "method_name", model_cls.__name__)
        self.dataset = getattr(data_cls, "dataset_name", data_cls.__name__)
        self.stage = getattr(model_cls, "protocol_stage", None)
        if self.stage not in PROTOCOL_STAGES:
            raise BenchmarkError(f"{model_cls.__name__} declares no protocol_stage (one of {PROTOCOL_STAGES})")
        self.check_protocol()
        if 0 in config.shots and not getattr(model_cls, "zero_shot_capable", False):
            raise BenchmarkError(
                f"shots: 0 (zero-shot) but {self.method} needs at least one support image; drop 0 from `shots:`"
            )
        self.pretrain_hash = self.pretrain_digest() if config.pretrain is not None else None
        self.resolved = resolved_config(probe, CELL_KEYS) | {
            "benchmark": {"pretrained_checkpoint": self.checkpoint_identity(), "pretrain": self.pretrain_hash}
        }
        self.config_hash = sweep_hash(self.resolved)
        self.run_root = self.output / "runs" / self.config_hash
        cache = config.feature_cache
        self.feature_cache = (
            FeatureCache(cache.folder or self.output / "feature_cache", "", int(cache.max_gb * 2**30), cache.dtype)
            if cache.enabled
            else None
        )
        if config.categories == "all":
            datamodule = data_cls(**{k: v for k, v in vars(probe.config.data.init_args).items()})
            if hasattr(datamodule, "prepare_data"):
                datamodule.prepare_data()
            root = getattr(datamodule, "root", None)
            if root is not None and not Path(root).is_dir():
                raise BenchmarkError(f"root: dataset root {root} does not exist (categories: all lists the ones there)")
            categories = datamodule.available_categories()
        else:
            categories = list(config.categories)
        self.cells = [
            Cell(i, c, k, s) for i, (c, k, s) in enumerate(itertools.product(categories, config.shots, config.seeds))
        ]

    # ----------------------------------------------------------------- protocol
    def check_protocol(self) -> None:
        """A pretrained method needs its checkpoint (or a pretrain block); the others must not be given one."""
        given = [name for name in ("pretrained_checkpoint", "pretrain") if getattr(self.config, name) is not None]
        if self.stage == "pretrained":
            if len(given) != 1:
                raise BenchmarkError(
                    f"{self.method} is a pretrained-protocol method (trained once on another dataset, then tested per "
                    f"cell): give exactly one of `pretrained_checkpoint:` or a `pretrain:` block in the benchmark "
                    f"config (got {given or 'neither'}); it is never fitted on the support shots"
                )
            if self.config.pretrained_checkpoint is not None:  # a bad file is one line here, not one per cell
                read_checkpoint(self.config.pretrained_checkpoint, field="pretrained_checkpoint", mmap=True)
        elif given:
            raise BenchmarkError(
                f"{', '.join(given)}: only for pretrained-protocol methods; {self.method} is {self.stage}"
            )

    def checkpoint_identity(self) -> str | None:
        """Path, size and modification time of ``pretrained_checkpoint`` (a replaced file changes the hash)."""
        checkpoint = self.config.pretrained_checkpoint
        if checkpoint is None:
            return None
        stat = Path(checkpoint).stat()
        return f"{checkpoint}:{stat.st_size}:{stat.st_mtime_ns}"

    def pretrain_args(self) -> list[str]:
        pretrain = self.config.pretrain
        return [arg for cfg in pretrain.method_config for arg in ("-c", cfg)] + list(pretrain.extra_args)

    def pretrain_digest(self) -> str:
        cli = ParsedConfig(args=[*self.pretrain_args(), "--run_root", str(self.output / "pretrain")], run=False)
        if getattr(cli.model_class, "protocol_stage", None) != "pretrained":
            raise BenchmarkError(f"pretrain: {cli.model_class.__name__} is not a pretrained-protocol method")
        return sweep_hash(resolved_config(cli, ("config", "run_root", "trainer.default_root_dir")))

    def pretrained_weights(self, train: bool = True) -> Path:
        """The checkpoint the cells test: the given one, or the pretrain block's, trained now unless recorded.

        The pretrain run goes to ``<output>/pretrain/<hash>/``; ``pretrain.json`` there records the finished
        checkpoint. A killed pretrain resumes from its ``last.ckpt`` when its config saves one.
        """
        if self.config.pretrained_checkpoint is not None:
            return Path(self.config.pretrained_checkpoint)
        folder = self.output / "pretrain" / self.pretrain_hash
        record = folder / "pretrain.json"
        if record.is_file():
            return Path(json.loads(record.read_text())["checkpoint"])
        if not train:
            raise BenchmarkError(
                f"the pretrain block has not run yet ({record} is missing); array tasks never train it concurrently: "
                "run `fsad benchmark -c <config> --pretrain` once first"
            )
        cli = FsadCLI(args=[*self.pretrain_args(), "--run_root", str(folder / "runs")], run=False)
        resume = next(Path(cli.trainer.default_root_dir).glob("**/last.ckpt"), None)
        print(f"benchmark: pretraining {self.method} once ({'resuming ' + str(resume) if resume else 'from scratch'})")
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
        checkpoint = folder / "pretrained.ckpt"
        cli.trainer.save_checkpoint(checkpoint)
        write_text_atomically(record, json.dumps({
            "checkpoint": str(checkpoint), "pretrain_hash": self.pretrain_hash, "run_dir": cli.trainer.default_root_dir,
            "fit_seconds": round(time.perf_counter() - start, 3), "args": self.pretrain_args(),
        }, indent=1))  # fmt: skip
        return checkpoint

    @staticmethod
    def preprocessing_of(datamodule: Any) -> str:
        """The data side of the feature-cache key: resize variant and normalisation of the test transform."""
        parts = {name: getattr(datamodule, name, None) for name in ("resize", "mean", "std")}
        return ";".join(f"{name}={value}" for name, value in parts.items())

    # ----------------------------------------------------------------- cells
    def key(self, cell: Cell) -> tuple[str, ...]:
        return (self.config_hash, self.method, self.dataset, cell.category, str(cell.k), str(cell.seed))

    def finished(self) -> dict[tuple[str, ...], dict[str, str]]:
        """Finished cells from ``benchmark.csv`` and the per-cell files of array tasks (``cells/*.csv``)."""
        return {row_key(row): row for row in read_rows(self.output)}

    def explain_changes(self) -> str | None:
        """Why earlier finished cells do not count: the keys that changed since their config (None if none)."""
        hashes = {row.get(HASH_COLUMN, "") for row in read_rows(self.output)} - {self.config_hash}
        if not hashes:
            return None
        lines = []
        for old in sorted(hashes):
            saved = self.output / "configs" / f"{old}.yaml"
            if old and saved.is_file():
                lines.append(
                    f"config {old} -> {self.config_hash}: {config_changes(yaml.safe_load(saved.read_text()), self.resolved)}"
                )
            else:
                lines.append(f"cells of config {old or '(no hash: an older fsad)'} -> {self.config_hash}")
        return "benchmark: the resolved config changed, so its cells run again (" + " | ".join(lines) + ")"

    def run_cell(self, cell: Cell, checkpoint: Path | None) -> dict[str, object]:
        """One cell as the protocol says; returns its CSV row with fit/test wall times and paper columns.

        A W&B logger of the cell logs one W&B run of its own (finished with the cell), in the sweep's group unless
        its config names a group."""
        group = wandb_group([{"method": self.method, "dataset": self.dataset, HASH_COLUMN: self.config_hash}])
        cli = None
        try:
            cli = FsadCLI(args=cell.args(self.config, self.run_root), run=False)
            for logger in cli.trainer.loggers:
                if isinstance(logger, WandbLogger) and not logger._wandb_init.get("group"):
                    logger._wandb_init["group"] = group  # the wandb.init arguments its run will start with
            return self._run_cell(cell, checkpoint, cli)
        finally:
            for logger in cli.trainer.loggers if cli is not None else []:
                if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                    logger.experiment.finish()  # else the next cell's logger would join this run

    def _run_cell(self, cell: Cell, checkpoint: Path | None, cli: FsadCLI) -> dict[str, object]:
        if self.feature_cache is not None and hasattr(cli.model, "feature_cache"):
            self.feature_cache.preprocessing = self.preprocessing_of(cli.datamodule)
            cli.model.feature_cache = self.feature_cache
        run_dir = Path(cli.trainer.default_root_dir)
        (run_dir / "paper_best_epoch.json").unlink(missing_ok=True)
        fit_seconds: float | str = ""
        if self.stage == "fewshot_fit":
            start = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            fit_seconds = round(time.perf_counter() - start, 3)
        if checkpoint is not None:  # the cell's config must be the one the checkpoint was trained with
            source = f"pretrained checkpoint {checkpoint}"
            changes = cli.model.check_checkpoint_settings(
                read_checkpoint(checkpoint, field="pretrained_checkpoint"), cli.datamodule, source
            )
            if changes:
                print(evaluation_change_line(changes, source), file=sys.stderr)
        start = time.perf_counter()
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False, ckpt_path=checkpoint)
        test_seconds = round(time.perf_counter() - start, 3)
        metrics = next((cb.results for cb in cli.trainer.callbacks if isinstance(cb, AnomalyMetrics)), None)
        if metrics is None:
            raise BenchmarkError("the method config has no fsad.callbacks.metrics.AnomalyMetrics callback to read from")
        row = dict(zip((HASH_COLUMN, *KEY_COLUMNS), self.key(cell), strict=True)) | dict(metrics)
        row |= {"run_config_hash": cli.model.run_config_hash, "fit_seconds": fit_seconds, "test_seconds": test_seconds}
        return row | paper_columns(run_dir, cli.trainer.callback_metrics)

    def record_failure(self, cell: Cell, err: BaseException) -> str:
        """One line per failed cell in ``failures.log`` (the traceback goes to ``failures/<index>.txt``)."""
        cause = user_facing_error(err) or err
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        line = (f"cell {cell.index} ({cell.category} k={cell.k} seed={cell.seed}, config {self.config_hash}) "
                f"failed: {type(cause).__name__}: {message}")  # fmt: skip
        self.failures_path.parent.mkdir(parents=True, exist_ok=True)
        with self.failures_path.open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        write_text_atomically(self.output / "failures" / f"{cell.index}.txt", "".join(traceback.format_exception(err)))
        return line

    def run(self, only: int | None = None) -> tuple[list[int], list[int]]:
        """Run the unfinished cells (or only cell ``only``); returns the indices that ran and those that failed."""
        reason = self.explain_changes()
        if reason:
            print(reason, file=sys.stderr)
        write_text_atomically(self.output / "configs" / f"{self.config_hash}.yaml", yaml.safe_dump(self.resolved))
        done = self.finished()
        todo = [c for c in self.cells if self.key(c) not in done and (only is None or c.index == only)]
        checkpoint = self.pretrained_weights(train=only is None) if self.stage == "pretrained" and todo else None
        ran, failed = [], []
        total = len(self.cells) if only is None else len(todo)
        progress = progress_reporter("benchmark cells", total, "cell", total - len(todo))
        try:
            for cell in todo:
                target = self.csv_path if only is None else self.output / "cells" / f"{cell.index}.csv"
                try:
                    row = self.run_cell(cell, checkpoint)
                except Exception as err:
                    if any(is_storage_failure(e) for e in exception_chain(err)):
                        raise  # a full disk fails every cell the same way: stop, with one line
                    line = self.record_failure(cell, err)
                    if self.fail_fast:
                        raise BenchmarkError(f"{line} (--fail-fast)") from err
                    progress.write(f"benchmark: {line}")
                    failed.append(cell.index)
                else:
                    append_row(row, target)
                    ran.append(cell.index)
                progress.update(1, f"(last: cell {cell.index}, {cell.category} k={cell.k} seed={cell.seed})")
        finally:
            progress.close()
        if self.feature_cache is not None and todo:
            print(f"benchmark: {self.feature_cache.summary()}")
        return ran, failed


def paper_columns(run_dir: Path, logged: dict[str, Any]) -> dict[str, float]:
    """The paper-protocol numbers a cell recorded, if any: best epoch on test (``paper_best_epoch.json``) and
    the max over image-score fusions (logged as ``image_AUROC_paper_max_fusion``)."""
    columns: dict[str, float] = {}
    best = run_dir / "paper_best_epoch.json"
    if best.is_file():
        record = json.loads(best.read_text())["best"]
        columns |= {f"paper_best_epoch_{name}": float(record[name]) for name in ("image_AUROC", "pixel_AUROC")}
    if "image_AUROC_paper_max_fusion" in logged:
        columns["image_AUROC_paper_max_fusion"] = float(logged["image_AUROC_paper_max_fusion"])
    return columns


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return (row.get(HASH_COLUMN) or "", *(row[c] for c in KEY_COLUMNS))


def append_row(row: dict[str, object], path: Path) -> None:
    """Add one finished cell to ``path`` at once (a killed sweep keeps it), rewriting the file atomically: a failed
    write (a full disk) leaves it byte for byte as it was. A row with columns the file lacks (a new metric, paper
    columns, an older file) widens the file to the union of the columns."""
    rows: list[dict[str, str]] = []
    columns = list(row)
    if path.is_file():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            existing = list(reader.fieldnames or [])
            rows = list(reader)
        columns = existing + [c for c in row if c not in existing]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows([*rows, row])
    write_text_atomically(path, buffer.getvalue())


def format_mean_std(values: list[float]) -> str:
    """Percent, two decimals, ``mean ± std`` over seeds (population std; no ± with one seed)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f} ± {100 * statistics.pstdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def statistics_legend(seeds: list[str]) -> str:
    """The line naming the statistic behind ``mean ± std`` and the seeds it is taken over."""
    if len(seeds) == 1:
        return f"Each value is one run (seed {seeds[0]}); with one seed there is no ±."
    return (
        f"mean ± std over n = {len(seeds)} seeds ({', '.join(seeds)}); std is the population standard deviation "
        "(divisor n, not n − 1). The mean row averages the categories within each seed first."
    )


def build_table(rows: list[dict[str, str]], ap_aupro: bool = False) -> str:
    """Paper-style table: one row per category plus the mean, one column group per k, mean ± std over seeds.

    The mean row averages the categories per seed first, then reports mean ± std of those averages over seeds.
    Paper-protocol columns follow the honest ones when any cell recorded them. ``ap_aupro`` adds the I-AP, P-AP and
    AUPRO columns. A legend under the table names the statistic, the metrics and the protocol marks.
    """
    wanted = (*TABLE_METRICS, *(m for m in AP_AUPRO_METRICS if m not in TABLE_METRICS)) if ap_aupro else TABLE_METRICS
    forced = {name for name, _ in AP_AUPRO_METRICS} if ap_aupro else set()
    present = [
        (n, label)
        for n, label in (*wanted, *PAPER_METRICS)
        if n in forced or any(r.get(n) not in (None, "") for r in rows)
    ]
    shots = sorted({int(r["k"]) for r in rows})
    categories = sorted({r["category"] for r in rows})
    seeds = sorted({r["seed"] for r in rows}, key=int)

    def value(row: dict[str, str], name: str) -> float:
        return float(row[name]) if row.get(name) not in (None, "") else float("nan")

    lines = []
    for category in [*categories, "mean"]:
        line: dict[str, object] = {"category": category}
        for k in shots:
            for name, label in present:
                if category == "mean":
                    per_seed = [
                        statistics.fmean(value(r, name) for r in rows if int(r["k"]) == k and r["seed"] == seed)
                        for seed in seeds
                        if any(int(r["k"]) == k and r["seed"] == seed for r in rows)
                    ]
                else:
                    per_seed = [value(r, name) for r in rows if r["category"] == category and int(r["k"]) == k]
                line[f"k={k} {label}"] = format_mean_std(per_seed)
        lines.append(line)
    first = rows[0]
    hashes = sorted({r.get(HASH_COLUMN) or "?" for r in rows})
    title = f"# {first['method']} on {first['dataset']}\n\nconfig {', '.join(hashes)}\n\n"
    paper = any(name for name, _ in present if name.startswith(("paper", "image_AUROC_paper")))
    legend = [statistics_legend(seeds), METRIC_DEFINITIONS, PAPER_LEGEND if paper else HONEST_LEGEND]
    return title + markdown_table(lines) + "\n" + "\n\n".join(legend) + "\n"


def wandb_group(rows: list[dict[str, str]]) -> str:
    """The W&B group of a sweep's runs: method, dataset and config hash (every cell's run and the table's run)."""
    hashes = sorted({r.get(HASH_COLUMN) or "none" for r in rows})
    return f"{rows[0]['method']}-{rows[0]['dataset']}-{hashes[0] if len(hashes) == 1 else 'mixed'}"


def log_table_to_wandb(
    project: str, table_rows: list[dict[str, str]], markdown: str, group: str, folder: Path
) -> None:  # fmt: skip
    """One W&B table row per cell, in a run of the sweep's group whose files go under ``folder``/wandb."""
    try:
        import wandb

        run = wandb.init(project=project, job_type="benchmark", group=group, dir=str(folder), reinit=True)
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


def collect(
    sweep_output: Path, wandb_project: str | None = None, config_hash: str | None = None, allow_mixed: bool = False,
    ap_aupro: bool = False,
) -> str:  # fmt: skip
    """Write ``benchmark.md`` from the finished cells of one config hash (``config_hash``, or the only one present;
    several only with ``allow_mixed``, the latest row of a cell winning); returns the markdown."""
    rows = read_rows(sweep_output)
    if config_hash is not None:
        rows = [r for r in rows if (r.get(HASH_COLUMN) or "") == config_hash]
    if not rows:
        raise BenchmarkError(
            f"no finished cells yet under {sweep_output}" + (f" for config {config_hash}" if config_hash else "")
        )
    hashes = sorted({r.get(HASH_COLUMN) or "(none)" for r in rows})
    if len(hashes) > 1 and not allow_mixed:
        counts = ", ".join(f"{h}: {sum((r.get(HASH_COLUMN) or '(none)') == h for r in rows)} cells" for h in hashes)
        raise BenchmarkError(
            f"{sweep_output} holds cells of {len(hashes)} different configs ({counts}); one table mixes one config: "
            "rerun the sweep to finish the current config's cells (its table is then written), or pass --allow-mixed"
        )
    rows = list({tuple(r[c] for c in KEY_COLUMNS): r for r in rows}.values())
    markdown = build_table(rows, ap_aupro)
    write_text_atomically(sweep_output / "benchmark.md", markdown)
    if wandb_project:
        log_table_to_wandb(wandb_project, rows, markdown, wandb_group(rows), sweep_output)
    return markdown


def main(argv: list[str]) -> int:
    """``fsad benchmark``; returns the exit code (1 when any cell failed). The ``fsad`` entry point's guard prints
    user mistakes (an FsadError anywhere on the cause chain) as one line and turns signals into 143/130."""
    parser = OneLineArgumentParser(prog="fsad benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="benchmark config YAML (configs/benchmark/*.yaml)")
    parser.add_argument("--cell-index", type=int, help="run only this cell (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--list-cells", action="store_true", help="print the cells and exit")
    parser.add_argument("--collect", action="store_true", help="only rebuild benchmark.md from benchmark.csv")
    parser.add_argument("--allow-mixed", action="store_true", help="let --collect combine cells of several configs")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    parser.add_argument("--pretrain", action="store_true", help="only run the pretrain block (before array tasks)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    output = Path(config.output)
    if args.collect:
        print(collect(output, config.wandb_project, allow_mixed=args.allow_mixed, ap_aupro=config.ap_aupro_columns))
        return 0
    sweep = Sweep(config, fail_fast=args.fail_fast)
    if args.list_cells:
        done = sweep.finished()
        print(f"# config {sweep.config_hash}, protocol {sweep.stage}, output {output}", file=sys.stderr)
        for cell in sweep.cells:
            state = "done" if sweep.key(cell) in done else "todo"
            print(
                f"{cell.index}\t{sweep.method}\t{sweep.dataset}\t{cell.category}\tk={cell.k}\tseed={cell.seed}\t{state}"
            )
        return 0
    if args.pretrain:
        if sweep.config.pretrain is None:
            raise BenchmarkError("--pretrain: the benchmark config has no `pretrain:` block")
        print(f"pretrained checkpoint: {sweep.pretrained_weights()}")
        return 0
    if args.cell_index is not None and not 0 <= args.cell_index < len(sweep.cells):
        raise BenchmarkError(f"--cell-index {args.cell_index} outside 0..{len(sweep.cells) - 1}")
    ran, failed = sweep.run(args.cell_index)
    print(f"ran cells: {ran}" + (f"; failed cells: {failed} (see {sweep.failures_path})" if failed else ""))
    if args.cell_index is None and any(key[0] == sweep.config_hash for key in sweep.finished()):
        print(collect(output, config.wandb_project, config_hash=sweep.config_hash, ap_aupro=config.ap_aupro_columns))
    return 1 if failed else 0
