"""Honest endings for every ``fsad`` command: SIGTERM exits 143, SIGINT 130, a user mistake 1, each with one line.

SIGTERM is what SLURM preemption, time limits and ``kill`` send. Lightning turns it into ``SIGTERMException``, a
``SystemExit`` with no code, so without this a killed run reported success. :func:`run_guarded` records the
signal, lets Lightning stop at the next batch boundary when a trainer is running (so a checkpoint is never taken
half-way through an optimiser step), and ends the process with ``128 + signal`` and one line saying what was saved
and how to resume. :class:`CheckpointOnSignal` is that checkpoint: during ``fit`` it writes
``checkpoints/last.ckpt`` (``--ckpt_path last`` resumes), or under SLURM Lightning's ``hpc_ckpt_<n>.ckpt`` in the
run folder, which a requeued job resumes from by itself.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fsad.errors import FsadError
from fsad.run_folder import describe_os_error

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised by the handler when no trainer is running to stop at a batch boundary (a BaseException, like SIGINT's
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""


@dataclass
class SignalGuard:
    """What the process received and what was saved because of it; shared by the handler and the callback."""

    received: int | None = None
    saved: list[str] = field(default_factory=list)
    resume_hint: str = "rerun the same command"

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        """Record the signal; interrupt at once unless Lightning's own SIGTERM handler is in charge.

        Lightning, while a trainer runs, chains this handler after its own, which stops the loop at the next batch
        boundary; then ``signal.getsignal`` no longer returns this handler.
        """
        self.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signal.getsignal(signum) == self.handle:
            raise Interrupted

    def message(self) -> str:
        name = signal.Signals(self.received).name
        saved = f"saved {', '.join(self.saved)}" if self.saved else "nothing new saved"
        return f"interrupted by {name}: {saved}; to resume, {self.resume_hint}"


@contextmanager
def signals_recorded(guard: SignalGuard) -> Iterator[None]:
    """Install ``guard.handle`` for SIGTERM and SIGINT, and restore the previous handlers afterwards."""
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, guard.handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_guarded(command: Callable[[], int | None], guard: SignalGuard | None = None) -> int:
    """Run ``command`` and turn its ending into an exit code: 128 + signal, 1 for an :class:`FsadError`, else its own.

    Every ending other than success and ``--help`` prints exactly one line on stderr.
    """
    guard = guard or SignalGuard()
    code: int | None = None
    try:
        with signals_recorded(guard):
            code = command()
    except (Interrupted, KeyboardInterrupt, SystemExit):
        if guard.received is None:
            raise  # a plain SystemExit: argparse's --help or usage error, which printed its own message
    except Exception as err:
        cause = user_facing_error(err)
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
            return cause.exit_code
        os_error = next((e for e in exception_chain(err) if isinstance(e, OSError) and e.filename), None)
        if os_error is None:
            raise
        print(f"error: cannot write or read {describe_os_error(os_error)}; nothing of this run was published",
              file=sys.stderr)  # fmt: skip
        return 1
    if guard.received is None:
        return int(code or 0)
    print(guard.message(), file=sys.stderr)  # also when the signal came at the very end and the run finished
    return 128 + guard.received


def user_facing_error(err: BaseException) -> FsadError | None:
    """The :class:`FsadError` (missing weights, bad data, bad captions, ...) behind ``err``, if any.

    jsonargparse wraps exceptions raised while instantiating the model or data in its own ``ValueError``; the
    original is on the ``__cause__``/``__context__`` chain.
    """
    return next((e for e in exception_chain(err) if isinstance(e, FsadError)), None)


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception on its ``__cause__``/``__context__`` chain, each once."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


class CheckpointOnSignal(Callback):
    """During ``fit``, save a resumable checkpoint when SIGTERM/SIGINT stops the run, and tell ``guard`` where.

    It also stops ``predict`` at the next batch boundary: Lightning's fit and test loops check for SIGTERM after
    each batch, its predict loop does not (it ran to the end and published every prediction before exiting 143).
    """

    def __init__(self, guard: SignalGuard) -> None:
        self.guard = guard

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.received_sigterm or self.guard.received is not None:
            raise SIGTERMException

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt | Interrupted):
            return
        if trainer.state.fn != "fit":
            return
        if isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment):
            path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
            self.guard.resume_hint = "requeue the job: it resumes from that checkpoint by itself"
        else:
            path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            self.guard.resume_hint = "rerun the same `fsad fit` command with `--ckpt_path last`"
        trainer.save_checkpoint(path)
        self.guard.saved.append(path)
