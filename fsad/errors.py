"""The one error type for user mistakes: every ``fsad`` command prints it as one line, never a traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn


class FsadError(Exception):
    """A mistake the user can fix (a path, a field, a file): the message names it and says what to change.

    Datamodules, checkpoints, the backbone, captions and the benchmark runner raise subclasses of this; the CLI
    catches it anywhere on an exception's cause chain, prints ``error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 1


class CheckpointError(FsadError):
    """A checkpoint file (``--ckpt_path``, ``fsad export``, the Inferencer) is missing, unreadable or unsafe, or
    lacks what its reader needs; the message names the file or field."""


class RunFolderError(FsadError):
    """The run folder holds another config's finished run, or another process is writing into it."""


class UsageError(FsadError):
    """A command line or config file the parser rejects (unknown key, wrong type, missing or corrupt ``-c`` file).

    It ends the command with exit code 2, like any command-line usage error; every other :class:`FsadError` ends
    it with 1.
    """

    exit_code = 2


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse`` for the extension commands: a usage mistake is one :class:`UsageError`, never the usage text."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")
