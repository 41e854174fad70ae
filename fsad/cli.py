"""The ``fsad`` command: LightningCLI's ``fit|validate|test|predict`` plus extension subcommands.

``fsad fit -c configs/<method>/<dataset>.yaml [--key value ...]`` works as in any LightningCLI, with four additions:

* every run writes into ``<run_root>/<method>/<dataset>/<category>/k<k>_s<seed>/`` (config, support.txt,
  checkpoints, heatmaps, results), unless ``trainer.default_root_dir`` is set;
* ``data.image_size`` and ``data.eval_size`` are linked to the model, so they are set in one place;
* ``seed_everything`` defaults to ``data.seed``, so the same config and seed give the same numbers;
* ``--ckpt_path`` never replaces the config: the model is built from the config and compared with the checkpoint
  (another model class or trained-structure setting is refused, changed evaluation settings are reported), and the
  run folder is claimed under the config hash of what runs.

Logger configs may write ``{run_dir}`` in their string arguments (``save_dir: "{run_dir}"``) to log into the run
directory. Other subcommands (``benchmark``, ``captions``, ``data``) are plain functions registered in
:data:`EXTENSION_COMMANDS`, imported only when called.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

# The methods, datamodules and callbacks are imported so that their classes are loaded subclasses of
# LightningModule, LightningDataModule and Callback: jsonargparse resolves short class names on the command line
# (``--model FineGrainedAD``, ``--data MVTecDataModule``) among those.
from fsad.callbacks import heatmaps, metrics, paper_protocol, predictions, results  # noqa: F401
from fsad.callbacks.metrics import AnomalyMetrics
from fsad.callbacks.paper_protocol import paper_protocol_callbacks
from fsad.callbacks.progress import LogProgress
from fsad.checkpoints import read_checkpoint
from fsad.datamodules import auxiliary, folder, mvtec, predict, realiad, synthetic, visa  # noqa: F401
from fsad.errors import FsadError, RunFolderError, UsageError
from fsad.lightning_modules.aprilgan import module as aprilgan_module  # noqa: F401
from fsad.lightning_modules.components.run_settings import evaluation_change_line, run_config_hash
from fsad.lightning_modules.finegrainedad import module as finegrainedad_module  # noqa: F401
from fsad.lightning_modules.kagprompt import module as kagprompt_module  # noqa: F401
from fsad.lightning_modules.membank import module as membank_module  # noqa: F401
from fsad.lightning_modules.promptad import module as promptad_module  # noqa: F401
from fsad.lightning_modules.winclip import module as winclip_module  # noqa: F401
from fsad.network import wandb_reachable
from fsad.progress import is_terminal
from fsad.quiet import quiet_output
from fsad.run_folder import STAGING, RunFolder, output_path, write_text_atomically
from fsad.signals import CheckpointOnSignal, SignalGuard, run_guarded
from fsad.slurm import check_allocation

RUN_DIR_PLACEHOLDER = "{run_dir}"

#: Subcommands that are not Lightning trainer entry points: name -> "module:function" taking ``argv`` and
#: returning an exit code.
EXTENSION_COMMANDS: dict[str, str] = {
    "data": "fsad.data_check:main",
    "captions": "fsad.captions:main",
    "benchmark": "fsad.benchmark:main",
    "compare": "fsad.compare:main",
    "export": "fsad.export:main",
    "slurm": "fsad.slurm:main",
    "report": "fsad.report:main",
}
#: One line each for ``fsad --help`` (what it does, then its usage); each command's own ``--help`` has the details.
TRAINER_HELP: dict[str, str] = {
    "fit": "Train a method: fsad fit -c <method>/<dataset>.yaml [--key value ...]",
    "test": "Score the test split, write metrics and heatmaps: fsad test -c <config> [--ckpt_path <ckpt>]",
    "predict": "Score new images into predictions/: fsad predict -c <config> -c configs/data/predict.yaml "
    "--ckpt_path <ckpt>",
}
EXTENSION_HELP: dict[str, str] = {
    "data": "Check a dataset before a run: fsad data check --dataset mvtec|visa|realiad|folder --root <dir>",
    "captions": "MFSC caption records: fsad captions validate|show|import|generate ...",
    "benchmark": "Sweep categories x k x seeds, resumable, into the paper-style table: fsad benchmark -c <sweep>.yaml",
    "compare": "Several methods' sweeps on the same cells, one table with the published numbers: fsad compare -c "
    "<comparison>.yaml",
    "export": "Export a self-contained ONNX/torch.export model: fsad export -c <config> --ckpt_path <ckpt> --out <dir>",
    "slurm": "Write a SLURM job script: fsad slurm --nodes N --gpus-per-node G -- fit|test|predict|benchmark -c ...",
    "report": "Write a self-contained report.html of a run or sweep: fsad report <run_dir|sweep_output>",
}
FSAD_DESCRIPTION = (
    "fsad: few-shot industrial anomaly detection on OpenCLIP. Exit codes: 0 done, 1 an error you can fix (one "
    "`error:` line), 2 a command-line usage error, 143 SIGTERM, 130 SIGINT."
)


def run_directory(run_root: str | Path, method: str, dataset: str, category: str, k_shot: int, seed: int) -> Path:
    """``<run_root>/<method>/<dataset>/<category>/k<k>_s<seed>`` (docs/architecture.md, "CLI")."""
    return Path(run_root) / method / dataset / category / f"k{k_shot}_s{seed}"


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml``, staged with the run's other outputs: it replaces an earlier
    run's copy only when this run has finished."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_unset=False)
            write_text_atomically(output_path(trainer.default_root_dir, self.config_filename), text)
        self.already_saved = trainer.strategy.broadcast(True)


class FsadArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose usage errors end as one :class:`UsageError` line instead of the whole usage text.

    jsonargparse also parses with ``exit_on_error=False`` internally (trying each type of a union); those errors
    stay its own, so only the final verdict is turned into a :class:`UsageError`.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        raise UsageError(one_line_usage_error(message)) from None


PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
NOT_A_REASON = (
    "Parser key",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "Given value",
    "- Expected a <class 'NoneType'>",
)


def one_line_usage_error(message: str) -> str:
    """jsonargparse's verdict in one line: the dotted field and the innermost reason.

    A union's verdict nests one block per tried type (``Parser key "data": Does not validate against any of the Union
    subtypes ... Problem with given class_path ...: Parser key "k_shot": Expected a <class 'int'>. Got value: four``);
    this keeps the first type's path (``data.init_args.k_shot``) and its reason.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) == 1:
        return lines[0]
    path: list[str] = []
    reason = lines[-1]
    for line in lines:
        key = PARSER_KEY.match(line)
        if key:
            path.append(key.group(1))
            rest = line[key.end() :].lstrip(": ")
            if rest:
                reason = rest
                break
            continue
        if "Problem with given class_path" in line:
            path.append("init_args")
            continue
        if not line.startswith(NOT_A_REASON):
            reason = line.removeprefix("- ")
            break
    return f"{'.'.join(path)}: {reason}" if path else reason


def check_config_files(args: list[str]) -> list[tuple[str, Any]]:
    """Every ``-c`` file exists and is valid YAML, else one :class:`UsageError` naming it (jsonargparse's own
    message names neither the file nor, for broken YAML, anything a user can find).

    Returns each file as (``-c <path>`` as given, its parsed contents), in command-line order.
    """
    files = []
    pairs = [
        arg.partition("=")[::2] if arg.startswith("--config=") else (arg, nxt)
        for arg, nxt in zip(args, [*args[1:], ""], strict=True)
    ]
    for flag, value in pairs:
        if flag not in ("-c", "--config"):
            continue
        file = Path(value).expanduser()
        if not file.is_file():
            if value.lstrip().startswith("{"):  # an inline config, which jsonargparse parses itself
                continue
            raise UsageError(f"{flag} {value}: no such config file")
        try:
            files.append((f"{flag} {value}", yaml.safe_load(file.read_text())))
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{flag} {value}: cannot read the config file ({err})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise UsageError(f"{flag} {value}: not valid YAML{where}: {problem}") from None
    return files


UNKNOWN_KEY = re.compile(
    r"does not accept option '(?P<key>[^']+)'|^(?:(?P<parent>\S+): )?Option '(?P<option>[^']+)' is not accepted"
)


def unknown_key(message: str) -> list[str] | None:
    """The dotted path, split, of the key a one-line usage error refuses as unknown (``trainer.max_epochz`` or
    ``model.init_args: Option 'sigmaz' ...``); None for any other error."""
    found = UNKNOWN_KEY.search(message)
    if found is None:
        return None
    key = found["key"] or ".".join(filter(None, (found["parent"], found["option"])))
    return key.split(".")


def sets_key(tree: Any, parts: list[str]) -> bool:
    """Whether the parsed YAML ``tree`` sets the key ``parts``; ``init_args`` may be left out, as jsonargparse
    allows (``model: {gaussian_sigma: 4}``), and a list (``trainer.callbacks``) sets what any of its items sets."""
    if not parts:
        return True
    if isinstance(tree, list):
        return any(sets_key(item, parts) for item in tree)
    if not isinstance(tree, dict):
        return False
    head, *rest = parts
    return (head in tree and sets_key(tree[head], rest)) or (head == "init_args" and sets_key(tree, rest))


def name_config_file(error: UsageError, config_files: list[tuple[str, Any]]) -> UsageError:
    """``error`` prefixed with the ``-c`` file(s) setting the unknown key it refuses: jsonargparse merges the files
    before it validates, so its message names the key but not the file it came from."""
    key = unknown_key(str(error))
    sources = [label for label, tree in config_files if key is not None and sets_key(tree, key)]
    return UsageError(f"{', '.join(sources)}: {error}") if sources else error


class FsadCLI(LightningCLI):
    """LightningCLI over any :class:`FewShotAnomalyModule` and :class:`FewShotDataModule` subclass."""

    def __init__(
        self, args: list[str] | None = None, run: bool = True, signal_guard: SignalGuard | None = None, **kwargs: Any
    ) -> None:
        self.signal_guard = signal_guard
        self.run_folder: RunFolder | None = None
        self.checkpoint: dict[str, Any] | None = None  # --ckpt_path's contents, compared with the model once built
        self.checkpoint_source = ""
        self.checkpoint_file: Path | None = None
        try:
            self._construct(args, run, **kwargs)
        finally:
            if self.run_folder is not None:
                self.run_folder.release()

    def _construct(self, args: list[str] | None, run: bool, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("parser_class", FsadArgumentParser)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, test and predict. ``validate`` is not offered: no method has a validation step and no dataset a
        labelled validation split (the F1 threshold is fitted by ``predict``'s validation folders instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "validate"}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands with our one-line help (Lightning's is its docstrings cut mid-sentence), plus the
        extension commands, so that ``fsad --help`` lists every one with its usage."""
        super()._add_subcommands(parser, **kwargs)
        parser.description = FSAD_DESCRIPTION
        for name, subparser in self._subcommand_parsers.items():
            subparser.description = TRAINER_HELP[name]
        for choice in parser._subcommands_action._choices_actions:
            choice.help = TRAINER_HELP[choice.dest]
        for name, description in EXTENSION_HELP.items():
            parser._subcommands_action.add_subcommand(name, self.init_parser(description=description), help=description)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_root", type=str, default="runs", help="Folder under which run directories go.")
        parser.add_argument(
            "--overwrite", type=bool, default=False, help="Replace a finished run of another config in the run folder."
        )
        for name, kind in metrics_options().items():
            parser.add_argument(
                f"--metrics.{name}", type=kind | None, default=None,
                help=f"AnomalyMetrics.{name} for this run (default: as the callback in trainer.callbacks says)",
            )  # fmt: skip
        parser.add_argument("--report", type=bool, default=True, help="`fsad test` writes report.html (fsad report).")
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.init_args.eval_size", "model.init_args.eval_size")
        if any(action.dest == "weights_only" for action in parser._actions):  # fit/validate/test/predict --ckpt_path
            parser.set_defaults(weights_only=True)

    def _active_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        config = self._active_config()
        check_allocation(int(config.trainer.get("num_nodes") or 1), config.trainer.get("devices"))
        if config.get("seed_everything") is True:
            config.seed_everything = int(config.data.init_args.get("seed", 0))

    def resolve_run_dir(self) -> Path:
        """The run directory this config writes to, from the model's method and the data's dataset and split."""
        config = self._active_config()
        if config.trainer.get("default_root_dir"):
            return Path(config.trainer.default_root_dir)
        model_cls = _import_class(config.model.class_path)
        data_cls = _import_class(config.data.class_path)
        data_args = dict(vars(config.data.init_args))
        if hasattr(data_cls, "run_key"):
            dataset, category, k_shot, seed = data_cls.run_key(data_args)
        else:
            dataset = data_cls.__name__.lower()
            category, k_shot, seed = (
                data_args.get("category", "all"),
                data_args.get("k_shot", 0),
                data_args.get("seed", 0),
            )
        method = getattr(model_cls, "method_name", model_cls.__name__.lower())
        return run_directory(config.run_root, method, dataset, str(category), int(k_shot), int(seed))

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` (one line if it is not a readable checkpoint) for the settings check made once the
        model is built (:meth:`check_against_checkpoint`). Lightning's own version is not called: it would put the
        checkpoint's hyper-parameters, even its model class, over the config without a word."""
        path = self._active_config().get("ckpt_path") if self.config.get("subcommand") else None
        if not path:
            return
        check_checkpoint(path)
        file = checkpoint_keyword_file(path, self.resolve_run_dir())
        if file is not None:
            self.checkpoint_file, self.checkpoint_source = file, f"--ckpt_path {file}"
            self.checkpoint = read_checkpoint(file, field="--ckpt_path", mmap=True)

    def before_instantiate_classes(self) -> None:
        config = self._active_config()
        apply_metrics_options(config)
        run_dir = self.resolve_run_dir()
        config.trainer.default_root_dir = str(run_dir)
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, Namespace) and logger.get("init_args") is not None:
                for key, value in vars(logger.init_args).items():
                    if isinstance(value, str) and RUN_DIR_PLACEHOLDER in value:
                        logger.init_args[key] = value.replace(RUN_DIR_PLACEHOLDER, str(run_dir))
                if logger.class_path.endswith("WandbLogger"):
                    self._fall_back_to_offline_wandb(logger.init_args)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer from the config; then check the model against ``--ckpt_path``, hash what
        runs, and claim the run folder under that hash."""
        super().instantiate_classes()
        self.check_against_checkpoint()
        config = self._active_config()
        seed = config.get("seed_everything")
        self.model.run_config_hash = run_config_hash(
            self.model, self.datamodule, seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        )
        if self.subcommand is None:
            return
        run_dir = Path(config.trainer.default_root_dir)
        if (
            config.get("overwrite")
            and self.checkpoint_file
            and run_dir.resolve() in self.checkpoint_file.resolve().parents
        ):
            raise RunFolderError(
                f"--overwrite would empty {run_dir}, which holds the --ckpt_path checkpoint {self.checkpoint_file}: "
                "write this run elsewhere with --run_root or trainer.default_root_dir"
            )
        if rank_zero_only.rank == 0:
            self.run_folder = RunFolder(run_dir, self.model.run_config_hash)
            self.run_folder.claim(bool(config.get("overwrite")))
        for logger in self.trainer.loggers:  # the W&B run config, CSV hparams, ...
            logger.log_hyperparams({"config_hash": self.model.run_config_hash})

    def check_against_checkpoint(self) -> None:
        """The config decides what runs: a checkpoint of another model class or other trained-structure settings is
        refused in one line; evaluation settings that differ from the checkpoint's are applied and listed in one."""
        if self.checkpoint is None:
            return
        changes = self.model.check_checkpoint_settings(self.checkpoint, self.datamodule, self.checkpoint_source)
        if changes and rank_zero_only.rank == 0:
            print(evaluation_change_line(changes, self.checkpoint_source), file=sys.stderr)

    @staticmethod
    def _fall_back_to_offline_wandb(init_args: Namespace) -> None:
        """An online W&B logger whose server cannot be reached logs offline instead of failing the run."""
        if init_args.get("offline") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
            return
        if not wandb_reachable():
            warnings.warn(
                "W&B server unreachable: logging offline instead (sync later with `wandb sync <run_dir>/wandb`)",
                UserWarning,
                stacklevel=2,
            )
            init_args.offline = True

    def _run_subcommand(self, subcommand: str) -> None:
        super()._run_subcommand(subcommand)
        if self.run_folder is None:  # ranks other than 0 write nothing
            return
        self.run_folder.write_records(self.model.run_records())
        report = self._stage_report() if subcommand == "test" and self._active_config().get("report") else None
        self.run_folder.complete(subcommand)  # publishes the run's outputs, report.html with them
        if report is not None:
            print(f"report: {report}")

    def _stage_report(self) -> Path | None:
        """Write report.html from the staged outputs into the staging folder, so that it is published in the same
        swap as the outputs it shows; returns where it will be published, or None (with a warning) when the run
        wrote no results.csv (a config without ResultsWriter: the run itself is fine)."""
        from fsad.report import ReportError, write_run_report

        run_dir = self.run_folder.path
        try:
            staged = write_run_report(run_dir, staging=run_dir / STAGING)
        except ReportError as err:
            warnings.warn(f"no report.html: {err}", UserWarning, stacklevel=2)
            return None
        return run_dir / staged.name

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        settings = self._get(self.config_init, "trainer", default={})
        configured = settings.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        progress_shown = settings.get("enable_progress_bar") is not False
        if progress_shown and not is_terminal() and not any(isinstance(c, ProgressBar) for c in configured):
            kwargs.setdefault("callbacks", [*configured, LogProgress()])  # timed lines instead of a \r bar in logs
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO stays
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        if self.signal_guard is not None:
            trainer.callbacks.append(CheckpointOnSignal(self.signal_guard))
        trainer.callbacks.extend(paper_protocol_callbacks(self.model))  # protocol: paper (reads test labels)
        return trainer


def metrics_options() -> dict[str, Any]:
    """The ``--metrics.<name>`` options: every argument of :class:`AnomalyMetrics` with its type."""
    hints = typing.get_type_hints(AnomalyMetrics.__init__)
    return {name: hints[name] for name in inspect.signature(AnomalyMetrics.__init__).parameters if name != "self"}


def apply_metrics_options(config: Namespace) -> None:
    """Set each ``--metrics.<name>`` given on the command line on the AnomalyMetrics callback of
    ``trainer.callbacks``, so AUPRO or F1 can be switched without rewriting the whole callbacks list; the saved
    ``config.yaml`` shows the callback as it ran."""
    options = config.get("metrics")
    chosen = {name: value for name, value in vars(options).items() if value is not None} if options else {}
    if not chosen:
        return
    callbacks = config.trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    targets = [c for c in callbacks if isinstance(c, Namespace) and c.get("class_path", "").endswith(".AnomalyMetrics")]
    if not targets:
        raise FsadError(
            f"--metrics.{next(iter(chosen))}: the config has no fsad.callbacks.metrics.AnomalyMetrics in "
            "trainer.callbacks to apply it to"
        )
    for callback in targets:
        if callback.get("init_args") is None:
            callback.init_args = Namespace()
        for name, value in chosen.items():
            callback.init_args[name] = value


CHECKPOINT_KEYWORDS = ("last", "best", "hpc", "registry")


def check_checkpoint(path: str) -> None:
    """``--ckpt_path`` must be a readable checkpoint (or one of Lightning's keywords); one line if not.

    The file is opened the way the trainer will open it (``weights_only=True``, memory-mapped so it costs no copy).
    """
    if path in CHECKPOINT_KEYWORDS or path.startswith("registry:"):
        return
    read_checkpoint(path, field="--ckpt_path", mmap=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader, through :func:`read_checkpoint`: a file Lightning finds by itself
    (``--ckpt_path last``, a requeued job's ``hpc_ckpt``) fails in one line too, never with torch's advice."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, field="--ckpt_path")


def checkpoint_keyword_file(path: str, run_dir: Path) -> Path | None:
    """The file ``--ckpt_path`` names: the path itself, or for ``last`` the newest ``checkpoints/last*.ckpt`` of the
    run folder and for ``hpc`` its highest ``hpc_ckpt_<n>.ckpt`` (where Lightning looks); None when the keyword
    names no file yet (``best``, ``registry``, or a first run), which Lightning then reports."""
    if path == "last":
        found = sorted((run_dir / "checkpoints").glob("last*.ckpt"), key=lambda file: file.stat().st_mtime)
        return found[-1] if found else None
    if path == "hpc":
        found = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda file: int(file.stem.rpartition("_")[2] or 0))
        return found[-1] if found else None
    if path in CHECKPOINT_KEYWORDS or path.startswith("registry:"):
        return None
    return Path(path).expanduser()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``fsad <subcommand> ...``; exit codes and one-line endings from :func:`run_guarded`."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_output()
    guard = SignalGuard()
    if args and args[0] in EXTENSION_COMMANDS:
        module_name, _, function = EXTENSION_COMMANDS[args[0]].partition(":")
        command = getattr(importlib.import_module(module_name), function)
        return run_guarded(lambda: command(args[1:]), guard)

    def lightning_command() -> int:
        config_files = check_config_files(args)
        try:
            FsadCLI(args=argv, signal_guard=guard)
        except UsageError as err:
            raise name_config_file(err, config_files) from None
        return 0

    return run_guarded(lightning_command, guard)
