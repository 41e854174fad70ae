"""A run folder never mixes two runs: it is claimed by one process and one config at a time.

``runs/<method>/<dataset>/<category>/k<k>_s<seed>/`` is named after five settings only, so two configs that differ
elsewhere (sigma, eval size, epochs of training data...) map to the same folder. Rules, applied by ``fsad
fit|test|predict`` on rank 0 before anything is written:

* ``.lock`` (created exclusively, holding the pid, host and, under SLURM, the job id with its array task) makes a
  second concurrent run into the same folder stop with one line. The holder touches the lock every
  :data:`HEARTBEAT_SECONDS`. A lock is taken over when its holder is gone: a process on this host is checked by
  pid; a requeued SLURM job finds its own job id in it (on whichever node it now runs, and resumes from its
  ``hpc_ckpt``); a lock of another SLURM job is stale once ``squeue`` (or ``sacct``) no longer lists that job as
  active; otherwise (another host, no SLURM tools) a lock is stale when its heartbeat is older than
  :data:`STALE_AFTER_SECONDS`. Taking a lock over prints one line saying why;
* ``run.json`` is written when a ``fit`` or ``test`` finishes and records its config hash (``config_hash`` of
  ``lightning_modules/components/run_settings.py``: the ``model``, ``data`` and ``seed_everything`` settings that
  decide what a run computes; trainer, logger and checkpoint options may differ, so fit-then-test, resuming with
  more epochs and re-testing share a folder). A run whose hash differs
  from a finished run's refuses to start unless ``--overwrite`` is given, which empties the folder first;
* a run publishes all or nothing. Its writers (``config.yaml``, ``support.txt``, ``results.*``, ``scores.csv``,
  ``heatmaps/``, ``predictions/``, ``report.html``, ``run.json``) write through :func:`output_path` into
  ``.staging/``; when the run has finished, :meth:`RunFolder.publish` checks every staged file (not empty, images
  decodable) and swaps them in. A failed, interrupted or out-of-space run leaves the previous finished run byte for
  byte as it was, and its staging folder is removed. Write failures are :class:`PublishError` lines naming the path
  and the reason (a full disk, a read-only folder), never a ``libpng error`` beside an exit code 0.

Outside the fsad command (a user's own ``Trainer``) there is no staging folder, and :func:`output_path` is the path
in the run directory itself.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fsad.errors import FsadError, RunFolderError

MARKER = "run.json"
LOCK = ".lock"
#: The lock holder refreshes the lock file's modification time this often...
HEARTBEAT_SECONDS = 60.0
#: ... and a lock whose holder cannot be asked about (another host, no SLURM tools) is stale after this long.
STALE_AFTER_SECONDS = 5 * HEARTBEAT_SECONDS
#: SLURM job states in which a job may still write into its run folder.
ACTIVE_JOB_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
})  # fmt: skip
STAGING = ".staging"
RETIRED = ".retired"


class PublishError(FsadError):
    """An output could not be written or published (full disk, I/O error, no permission); the message names it."""


def describe_os_error(err: OSError) -> str:
    """``<path>: <reason>`` of an ``OSError`` (``No space left on device``, ``Permission denied``...)."""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{err.filename}: {reason}" if err.filename else reason


def output_path(run_dir: str | Path, name: str) -> Path:
    """Where a writer puts the run output ``name`` (``results.csv``, ``heatmaps``...): in the staging folder while
    the fsad command runs, so nothing is visible before the run has finished; else in ``run_dir`` itself."""
    staging = Path(run_dir) / STAGING
    return staging / name if staging.is_dir() else Path(run_dir) / name


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, flushed to disk and renamed into place. A failed write
    leaves ``path`` as it was and raises a :class:`PublishError` naming it and the reason."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PublishError(f"cannot write {path}: {err.strerror or err}") from err


#: ``errno`` values that say the storage, not one input, failed: a sweep stops at the first instead of failing
#: every remaining cell the same way.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES}


def is_storage_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed write of an output (full disk, I/O error, no permission)."""
    return isinstance(err, PublishError) or isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def write_text_atomically(path: Path, text: str) -> None:
    """:func:`write_bytes_atomically` of UTF-8 text."""
    write_bytes_atomically(path, text.encode())


def write_image(path: Path, image: np.ndarray) -> None:
    """Encode ``image`` (BGR or grayscale, uint8 or uint16) as the format of ``path``'s suffix and write it; unlike
    ``cv2.imwrite``, which only prints ``libpng error`` and returns False, a failure raises (``OSError``)."""
    ok, encoded = cv2.imencode(path.suffix, image)
    if not ok:
        raise PublishError(f"{path}: cannot encode a {image.dtype} image of shape {image.shape} as {path.suffix}")
    write_bytes_atomically(path, encoded.tobytes())


def replace_directory(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` folder in place of ``target`` (the previous run's copy goes only now)."""
    retired = target.with_name(target.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def fresh_directory(path: Path) -> Path:
    """An empty ``path`` (leftovers of an interrupted attempt removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def verify_output(path: Path) -> None:
    """A staged file is complete: not empty, and an image decodes (a write cut short by a full disk fails here)."""
    if path.stat().st_size == 0:
        raise PublishError(f"{path}: written empty (a full disk or a failed write); nothing was published")
    if path.suffix.lower() in IMAGE_SUFFIXES and cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
        raise PublishError(f"{path}: the written image does not decode (cut short?); nothing was published")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_job_key() -> str | None:
    """This process's SLURM job as ``<job>`` or ``<array job>_<task>``; None outside SLURM. A requeued job keeps it."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job_active(job: str) -> bool | None:
    """Whether SLURM still lists ``job`` as active (``squeue``, else ``sacct``); None when neither can tell."""
    queries = (["squeue", "--noheader", "--jobs", job, "--format", "%T"],
               ["sacct", "--noheader", "--allocations", "--jobs", job, "--format", "State"])  # fmt: skip
    for query in queries:
        try:
            answer = subprocess.run(query, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        states = {line.split()[0].rstrip("+") for line in answer.stdout.splitlines() if line.strip()}
        if answer.returncode == 0 and states:
            return bool(states & ACTIVE_JOB_STATES)
        if query[0] == "squeue" and (answer.returncode == 0 or "Invalid job id" in answer.stderr):
            return False  # squeue answered: the job is no longer queued or running
    return None


def read_lock_owner(lock: Path) -> dict[str, object]:
    """The holder recorded in ``lock`` (JSON; an older ``"<pid> <host>"`` lock reads as such)."""
    text = lock.read_text().strip()
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        pid, _, host = text.partition(" ")
        owner = {"pid": int(pid) if pid.isdigit() else None, "host": host}
    return owner if isinstance(owner, dict) else {}


def lock_takeover_reason(lock: Path) -> str | None:
    """Why the lock's holder is gone and the lock may be taken (see the module docstring); None if it may be alive."""
    owner = read_lock_owner(lock)
    job, host, pid = owner.get("slurm_job"), owner.get("host"), owner.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return None if _process_alive(pid) else f"process {pid} ended without releasing the lock"
    if job and job == slurm_job_key():
        return f"SLURM job {job} was requeued: its lock, left on {host}, is taken over"
    if job:
        active = slurm_job_active(str(job))
        if active is not None:
            return None if active else f"SLURM job {job} is no longer running"
    age = time.time() - lock.stat().st_mtime
    return f"no heartbeat for {age:.0f} s" if age > STALE_AFTER_SECONDS else None


class RunFolder:
    """Claim, check and complete one run folder (see the module docstring for the rules)."""

    def __init__(self, path: Path, config_hash: str) -> None:
        self.path = path
        self.config_hash = config_hash
        self._locked = False
        self._heartbeat_stop = threading.Event()

    def claim(self, overwrite: bool) -> None:
        """Take the lock, refuse (or with ``overwrite`` empty) a folder holding another config's run, then open an
        empty staging folder for this run's outputs."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._check_marker(overwrite)
        fresh_directory(self.path / STAGING)

    def _check_marker(self, overwrite: bool) -> None:
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
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job_key()}
        for _ in range(2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                reason = lock_takeover_reason(lock)
                if reason is not None:
                    print(f"run folder {self.path}: lock taken over ({reason})", file=sys.stderr)
                    lock.unlink(missing_ok=True)
                    continue
                holder = read_lock_owner(lock)
                job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
                raise RunFolderError(
                    f"run folder {self.path} is in use by another fsad process (pid {holder.get('pid')} on "
                    f"{holder.get('host')}{job}); wait for it to finish, or give this run another --run_root"
                ) from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(owner))
            self._locked = True
            self._heartbeat_stop.clear()
            threading.Thread(target=self._heartbeat, args=(lock,), name="fsad-lock-heartbeat", daemon=True).start()
            return

    def _heartbeat(self, lock: Path) -> None:
        """Touch the lock until it is released, so that a lock nobody refreshes can be told stale."""
        while not self._heartbeat_stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(lock)
            except OSError:
                return

    def complete(self, subcommand: str) -> None:
        """Record that a ``subcommand`` of this config finished here (``run.json``, only for ``fit`` and ``test``),
        then publish everything the run staged."""
        if subcommand in ("fit", "test"):
            record = {"config_hash": self.config_hash, "subcommand": subcommand,
                      "finished": datetime.now(UTC).isoformat()}  # fmt: skip
            write_text_atomically(self.path / STAGING / MARKER, json.dumps(record, indent=2) + "\n")
        self.publish()

    def publish(self) -> None:
        """Check every staged output, then swap them into the run folder; on any failure put the previous ones back.

        Renames within one folder need no free space, so a full disk fails while writing or checking, before
        anything of the previous run is touched.
        """
        staging, retired = self.path / STAGING, self.path / RETIRED
        staged = sorted(staging.iterdir())
        for path in staged:
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                verify_output(file)
        fresh_directory(retired)
        moved: list[str] = []
        try:
            for path in staged:
                target = self.path / path.name
                if target.exists() or target.is_symlink():
                    target.rename(retired / path.name)
                path.rename(target)
                moved.append(path.name)
        except OSError:
            for name in moved:  # undo: this run's outputs back to staging, the previous ones back in place
                (self.path / name).rename(staging / name)
            for previous in retired.iterdir():
                previous.rename(self.path / previous.name)
            raise
        shutil.rmtree(retired, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    def write_records(self, records: dict[str, Any]) -> None:
        """Write the run's self-description files (``captions.json`` ...) beside ``config.yaml``, staged with it."""
        for name, content in records.items():
            write_text_atomically(output_path(self.path, name), json.dumps(content, indent=2) + "\n")

    def release(self) -> None:
        """Remove what an unfinished run staged and give the folder back."""
        if self._locked:
            self._heartbeat_stop.set()
            shutil.rmtree(self.path / STAGING, ignore_errors=True)
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False
