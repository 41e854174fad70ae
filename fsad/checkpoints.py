"""The one way fsad opens a checkpoint file: ``weights_only=True``, and every failure is one line naming the file.

A checkpoint can be a malicious pickle; ``weights_only=True`` is the only thing that keeps it from running code. When
that refuses a file, PyTorch's own message advises re-running with ``weights_only=False``. fsad never shows that
advice: every error of :func:`read_checkpoint` is replaced by a :class:`CheckpointError` of our own. Callers are
``--ckpt_path`` (also ``last``, resolved by Lightning), ``fsad export``, :meth:`fsad.Inferencer.from_checkpoint`, a
benchmark's ``pretrained_checkpoint``, ``backbone.checkpoint`` and the feature cache.

This module imports only torch, so the shared components can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fsad.errors import CheckpointError

UNREADABLE = (
    "is not a readable fsad checkpoint (corrupt, truncated, or not created by fsad); fsad never loads checkpoints "
    "with weights_only=False"
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6; only it can be memory-mapped
#: How many leading bytes decide whether a file is text (an HTML error page, a git-lfs pointer, a JSON reply).
SNIFF_BYTES = 512


def looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file are text: a checkpoint is a zip (``PK``) or a pickle (``0x80``), never text."""
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(character.isprintable() or character in "\r\n\t" for character in text)


def read_checkpoint(path: str | Path, field: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or a :class:`CheckpointError` naming ``field`` and the file.

    ``mmap=True`` reads nothing into memory up front (a cheap check before the real load; zip-format files only).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{field}: no such file: {file}")
    try:
        with file.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as err:
        raise CheckpointError(f"{field}: cannot read {file}: {err.strerror or err}") from None
    if looks_like_text(head):
        first_line = head.decode("utf-8").strip().splitlines()[0][:60] if head.strip() else ""
        raise CheckpointError(
            f"{field}: {file} is not a PyTorch checkpoint (did a download fail?): it holds text ({first_line!r})"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(ZIP_MAGIC))
    except Exception:  # torch's message would advise weights_only=False; never show it
        raise CheckpointError(f"{field}: {file} {UNREADABLE}") from None
