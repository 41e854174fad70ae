"""Progress for people and for log files: a tqdm bar on a terminal, one timed line at a time anywhere else.

A carriage-return bar written to a SLURM log or a ``| tee`` file becomes thousands of fragments, and no bar at all
leaves a long job silent. When standard output is not a terminal, loops report through :class:`LineProgress`
instead: one line every ``FSAD_PROGRESS_SECONDS`` seconds (default 30) and one when the loop ends, each with the
count, the rate, and an ETA from the rate so far. This module imports no Lightning, so datamodules, components and
the command-line tools can all use it; ``callbacks/progress.py`` is the trainer's version.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

from fsad.errors import FsadError

PROGRESS_SECONDS_ENV = "FSAD_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0

Item = TypeVar("Item")


def progress_seconds() -> float:
    """Seconds between two progress lines: ``$FSAD_PROGRESS_SECONDS``, default 30 (0 prints every step)."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or math.isinf(seconds):
        raise FsadError(f"{PROGRESS_SECONDS_ENV}={raw!r}: give a number of seconds ≥ 0 (0 prints every step)")
    return seconds


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is an interactive terminal, where a redrawn bar belongs."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    """``H:MM:SS``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_rate(per_second: float, unit: str) -> str:
    """``4.10 it/s``, or ``12.3 s/it`` when one step takes longer than a second."""
    if per_second <= 0 or not math.isfinite(per_second):
        return f"? {unit}/s"
    return f"{per_second:.2f} {unit}/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


class LineProgress:
    """Timed progress lines for ``total`` steps of ``unit``; ``initial`` steps were done before (a resumed sweep),
    so they count towards the fraction but not towards the rate."""

    def __init__(
        self, label: str, total: int | None, unit: str = "it", initial: int = 0,
        interval: float | None = None, stream: TextIO | None = None,
    ) -> None:  # fmt: skip
        self.label, self.total, self.unit = label, total, unit
        self.done, self.initial = initial, initial
        self.interval = progress_seconds() if interval is None else interval
        self.stream = stream
        self.started = time.monotonic()
        self.last_line = self.started

    def line(self, note: str = "") -> str:
        """``<label> 12/40 it (30%) 4.10 it/s ETA 0:00:07 <note>``."""
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total:
            remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
            count = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            eta = f" ETA {format_duration(remaining)}"
        else:
            count, eta = f"{self.done} {self.unit}", ""
        text = f"{self.label} {count} {format_rate(rate, self.unit)}{eta}"
        return f"{text} {note}".rstrip()

    def write(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def update(self, steps: int = 1, note: str = "") -> None:
        """Count ``steps`` more; print a line when the interval has passed or the last step is done."""
        self.done += steps
        now = time.monotonic()
        if now - self.last_line >= self.interval or (self.total is not None and self.done >= self.total):
            self.last_line = now
            self.write(self.line(note))

    def close(self) -> None:
        """Nothing to clear: lines are complete when written."""


class BarProgress:
    """The terminal's version of :class:`LineProgress`: a tqdm bar with the same methods."""

    def __init__(self, label: str, total: int | None, unit: str = "it", initial: int = 0) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def update(self, steps: int = 1, note: str = "") -> None:
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()


def progress_reporter(label: str, total: int | None, unit: str = "it", initial: int = 0) -> LineProgress | BarProgress:
    """A bar on a terminal, timed lines otherwise (see the module docstring)."""
    if is_terminal():
        return BarProgress(label, total, unit, initial)
    return LineProgress(label, total, unit, initial)


def tracked(items: Iterable[Item], label: str, total: int | None = None, unit: str = "it") -> Iterator[Item]:
    """Iterate over ``items`` while reporting progress through :func:`progress_reporter`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    reporter = progress_reporter(label, total, unit)
    try:
        for item in items:
            yield item
            reporter.update(1)
    finally:
        reporter.close()
