"""The ``fsad`` command: LightningCLI's ``fit|validate|test|predict`` plus extension subcommands.

``fsad fit -c configs/<method>/<dataset>.yaml [--key value ...]`` works as in any LightningCLI, with three additions:

* every run writes into ``<run_root>/<method>/<dataset>/<category>/k<k>_s<seed>/`` (config, support.txt,
  checkpoints, heatmaps, results), unless ``trainer.default_root_dir`` is set;
* ``data.image_size`` and ``data.eval_size`` are linked to the model, so they are set in one place;
* ``seed_everything`` defaults to ``data.seed``, so the same config and seed give the same numbers.

Logger configs may write ``{run_dir}`` in their string arguments (``save_dir: "{run_dir}"``) to log into the run
directory. Other subcommands (``benchmark``, ``captions``, ``data``) are plain functions registered in
:data:`EXTENSION_COMMANDS`, imported only when called.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

# The methods, datamodules and callbacks are imported so that their classes are loaded subclasses of
# LightningModule, LightningDataModule and Callback: jsonargparse resolves short class names on the command line
# (``--model FineGrainedAD``, ``--data MVTecDataModule``) among those.
from fsad.callbacks import heatmaps, metrics, paper_protocol, predictions, results  # noqa: F401
from fsad.datamodules import auxiliary, folder, mvtec, predict, realiad, synthetic, visa  # noqa: F401
from fsad.errors import FsadError
from fsad.lightning_modules.finegrainedad import module as finegrainedad_module  # noqa: F401
from fsad.lightning_modules.kagprompt import module as kagprompt_module  # noqa: F401
from fsad.lightning_modules.membank import module as membank_module  # noqa: F401
from fsad.lightning_modules.promptad import module as promptad_module  # noqa: F401
from fsad.network import host_reachable

RUN_DIR_PLACEHOLDER = "{run_dir}"

#: Subcommands that are not Lightning trainer entry points: name -> "module:function" taking ``argv`` and
#: returning an exit code.
EXTENSION_COMMANDS: dict[str, str] = {
    "data": "fsad.data_check:main",
    "captions": "fsad.captions:main",
    "benchmark": "fsad.benchmark:main",
    "export": "fsad.export:main",
}


def run_directory(run_root: str | Path, method: str, dataset: str, category: str, k_shot: int, seed: int) -> Path:
    """``<run_root>/<method>/<dataset>/<category>/k<k>_s<seed>`` (DESIGN.md, "CLI")."""
    return Path(run_root) / method / dataset / category / f"k{k_shot}_s{seed}"


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL``, default api.wandb.ai) accepts a TCP connection."""
    return host_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout)


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run directory, overwriting an earlier run's copy."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, str(run_dir / self.config_filename), skip_unset=False, overwrite=True, multifile=False
            )
        self.already_saved = trainer.strategy.broadcast(True)


class FsadCLI(LightningCLI):
    """LightningCLI over any :class:`FewShotAnomalyModule` and :class:`FewShotDataModule` subclass."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_root", type=str, default="runs", help="Folder under which run directories go.")
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
            category, k_shot, seed = data_args.get("category", "all"), data_args.get("k_shot", 0), data_args.get("seed", 0)
        method = getattr(model_cls, "method_name", model_cls.__name__.lower())
        return run_directory(config.run_root, method, dataset, str(category), int(k_shot), int(seed))

    def before_instantiate_classes(self) -> None:
        config = self._active_config()
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        return trainer


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``fsad <subcommand> ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTENSION_COMMANDS:
        module_name, _, function = EXTENSION_COMMANDS[args[0]].partition(":")
        return int(getattr(importlib.import_module(module_name), function)(args[1:]) or 0)
    try:
        FsadCLI(args=argv)
    except Exception as err:
        cause = user_facing_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1
    return 0


def user_facing_error(err: BaseException) -> BaseException | None:
    """The :class:`FsadError` (missing weights, bad data, bad captions, ...) behind ``err``, if any.

    jsonargparse wraps exceptions raised while instantiating the model or data in its own ``ValueError``; the
    original is on the ``__cause__``/``__context__`` chain. Such errors are printed as one line, no traceback.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, FsadError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
