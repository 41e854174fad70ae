"""Quiet output for ``fsad`` commands: no Lightning product tips, no upstream deprecation noise, each warning once.

A user saw Lightning's litlogger/litmodels tips, torch's ``LeafSpec`` deprecation (raised inside Lightning, nothing
the user can act on) and the random-weights warning twice on every run (ours, then open_clip's root-logger line
saying the same). Warnings the user asked for with ``-W`` or
``PYTHONWARNINGS`` keep their setting: the once-rule is only added when neither is given.
"""

from __future__ import annotations

import logging
import sys
import warnings

LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _drop(logger_name: str, fragment: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.fragment == fragment for f in logger.filters):
        logger.addFilter(_DropMessages(fragment))


def quiet_output() -> None:
    """Install the filters; safe to call more than once."""
    _drop(LIGHTNING_INFO_LOGGER, "Tip:")
    _drop("", "No pretrained weights loaded")  # open_clip's copy of our random-weights warning
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    if not sys.warnoptions:
        warnings.filterwarnings("once", category=UserWarning)
