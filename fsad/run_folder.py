"""A run folder never mixes two runs: it is claimed by one process and one config at a time.

``runs/<method>/<dataset>/<category>/k<k>_s<seed>/`` is named after five settings only, so two configs that differ
elsewhere (sigma, eval size, epochs of training data...) map to the same folder. Rules, applied by ``fsad
fit|test|predict`` on rank 0 before anything is written:

* ``.lock`` (created exclusively, holding the pid and host) makes a second concurrent run into the same folder stop
  with one line; a lock whose process is gone on this host is stale and taken over;
* ``run.json`` is written when a ``fit`` or ``test`` finishes and records its config hash (of ``model``, ``data``
  and ``seed_everything``: the settings that decide what a run computes; trainer, logger and checkpoint options may
  differ, so fit-then-test, resuming with more epochs and re-testing share a folder). A run whose hash differs
  from a finished run's refuses to start unless ``--overwrite`` is given, which empties the folder first;
* a failed run never writes ``run.json``, ``results.csv``, ``heatmaps/`` or ``predictions/``: those are written
  only at its end (heatmaps and predictions through a staging folder swapped into place).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

from fsad.errors import RunFolderError

MARKER = "run.json"
LOCK = ".lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """Claim, check and complete one run folder (see the module docstring for the rules)."""

    def __init__(self, path: Path, config_hash: str) -> None:
        self.path = path
        self.config_hash = config_hash
        self._locked = False

    def claim(self, overwrite: bool) -> None:
        """Take the lock, then refuse (or with ``overwrite`` empty) a folder holding another config's run."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        marker = self.path / MARKER
        if not marker.is_file():
            return
        previous = json.loads(marker.read_text()).get("config_hash")
        if previous == self.config_hash:
            return
        if not overwrite:
            self.release()
            raise RunFolderError(
                f"run folder {self.path} holds a finished run of another config (hash {previous}; this one is "
                f"{self.config_hash}): pass --overwrite to replace it, or --run_root / trainer.default_root_dir "
                "to keep both"
            )
        for entry in self.path.iterdir():
            if entry.name != LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _lock(self) -> None:
        lock = self.path / LOCK
        owner = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, _, host = lock.read_text().strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
                    lock.unlink(missing_ok=True)  # stale: its process ended without releasing it (SIGKILL)
                    continue
                raise RunFolderError(
                    f"run folder {self.path} is in use by another fsad process (pid {pid} on {host}); wait for it "
                    "to finish, or give this run another --run_root"
                ) from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(owner)
            self._locked = True
            return

    def complete(self, subcommand: str) -> None:
        """Record that a ``subcommand`` of this config finished here."""
        record = {"config_hash": self.config_hash, "subcommand": subcommand, "finished": datetime.now(UTC).isoformat()}
        tmp = self.path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.path / MARKER)

    def release(self) -> None:
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False
