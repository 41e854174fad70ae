"""The trainer's progress as timed lines, for logs: Lightning's tqdm bar is replaced by this when stdout is no
terminal (a SLURM log, CI, ``| tee``), so a log file gets whole lines instead of carriage-return fragments.

One line every ``FSAD_PROGRESS_SECONDS`` (default 30) and one at the end of each stage, on global rank 0 only:

    fit epoch 3/100 batch 5/8 (29%) 2.31 it/s ETA 0:12:03 loss 0.4123
    test batch 12/40 (30%) 4.10 it/s ETA 0:00:07
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from fsad.progress import format_duration, format_rate, progress_seconds


class LogProgress(ProgressBar):
    """A Lightning progress bar that prints timed lines (see the module docstring)."""

    def __init__(self, interval: float | None = None) -> None:
        super().__init__()
        self.interval = progress_seconds() if interval is None else interval
        self._enabled = True
        self._started = 0.0
        self._last_line = 0.0
        self._last_loss: float | None = None
        self._last_batch: tuple[int, int] | None = None  # (epoch, batch index) of the last training batch
        self._evaluated = 0
        self._done_before: int | None = None  # batches done before this process started (a resumed fit)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _start(self) -> None:
        self._started = self._last_line = time.monotonic()
        self._done_before = None

    def _report(self, stage: str, done: int, total: float, position: str, final: bool = False) -> None:
        """Print ``<stage> <position> (pct) rate ETA [loss]`` when the interval has passed (or ``final``)."""
        if not self.is_enabled:
            return
        now = time.monotonic()
        if not final and now - self._last_line < self.interval:
            return
        self._last_line = now
        elapsed = now - self._started
        rate = (done - (self._done_before or 0)) / elapsed if elapsed > 0 else 0.0
        parts = [stage, position]
        if math.isfinite(total) and total > 0:
            parts.append(f"({100 * done / total:.0f}%)")
            parts.append(format_rate(rate, "it"))
            parts.append(f"ETA {format_duration((total - done) / rate if rate > 0 else float('inf'))}")
        else:
            parts.append(format_rate(rate, "it"))
        if stage == "fit" and self._last_loss is not None:
            parts.append(f"loss {self._last_loss:.4f}")
        if final:
            parts.append(f"done in {format_duration(elapsed)}")
        print(" ".join(parts), flush=True)

    def _fit_position(self, epoch: int, batch_idx: int) -> tuple[int, float, str]:
        """Batches done, batches in the whole fit and ``epoch e/E batch b/B`` after batch ``batch_idx`` of ``epoch``."""
        trainer = self.trainer
        per_epoch = self.total_train_batches
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        done = epoch * per_epoch + batch_idx + 1 if math.isfinite(per_epoch) else batch_idx + 1
        if epochs is not None and math.isfinite(per_epoch):
            total: float = epochs * per_epoch
        elif trainer.max_steps and trainer.max_steps > 0:
            total = float(trainer.max_steps)
        else:
            total = float("inf")
        epoch_count = f"/{epochs}" if epochs is not None else ""
        batch_count = f"/{int(per_epoch)}" if math.isfinite(per_epoch) else ""
        return int(done), total, f"epoch {epoch + 1}{epoch_count} batch {batch_idx + 1}{batch_count}"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()
        self._last_loss, self._last_batch = None, None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._last_loss = float(loss.detach())
        self._last_batch = (trainer.current_epoch, batch_idx)
        done, total, position = self._fit_position(*self._last_batch)
        if self._done_before is None:
            self._done_before = done - 1
        self._report("fit", done, total, position)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_batch is not None:
            done, total, position = self._fit_position(*self._last_batch)
            self._report("fit", done, total, position, final=True)

    def _evaluation_total(self, stage: str) -> float:
        batches = self.trainer.num_test_batches if stage == "test" else self.trainer.num_predict_batches
        return float(sum(batches))

    def _evaluation_batch_end(self, stage: str, final: bool = False) -> None:
        self._evaluated += 0 if final else 1
        total = self._evaluation_total(stage)
        count = f"/{int(total)}" if math.isfinite(total) else ""
        self._report(stage, self._evaluated, total, f"batch {self._evaluated}{count}", final=final)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()
        self._evaluated = 0

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._evaluation_batch_end("test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluation_batch_end("test", final=True)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()
        self._evaluated = 0

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._evaluation_batch_end("predict")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluation_batch_end("predict", final=True)
