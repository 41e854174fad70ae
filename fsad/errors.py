"""The one error type for user mistakes: every ``fsad`` command prints it as one line, never a traceback."""


class FsadError(Exception):
    """A mistake the user can fix (a path, a field, a file): the message names it and says what to change.

    Datamodules, checkpoints, the backbone, captions and the benchmark runner raise subclasses of this; the CLI
    catches it anywhere on an exception's cause chain and prints ``error: <message>``.
    """


class CheckpointError(FsadError):
    """``--ckpt_path`` names a missing, unreadable or unsafe checkpoint file."""


class RunFolderError(FsadError):
    """The run folder holds another config's finished run, or another process is writing into it."""
