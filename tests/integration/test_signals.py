"""Signals end every command honestly: real ``fsad`` subprocesses get SIGTERM/SIGINT during ``fit``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/promptad/synthetic_tiny.yaml")


def start_fit(run_root: Path, log: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "fsad", "fit", "-c", CONFIG, "--run_root", str(run_root), *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def interrupt_during_training(process: subprocess.Popen, run_dir: Path, signum: int) -> int:
    """Send ``signum`` once the first epoch's checkpoint exists (training is under way); the exit code."""
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints/last.ckpt").exists():
        assert process.poll() is None, "fit ended before it was interrupted"
        assert time.monotonic() < deadline, "fit did not reach its first checkpoint"
        time.sleep(0.2)
    process.send_signal(signum)
    return process.wait(timeout=120)


def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


@pytest.mark.slow
def test_sigterm_exits_143_saves_last_checkpoint_and_resume_works(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs/promptad/synthetic/disc/k2_s0"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    log = tmp_path / "fit.log"
    code = interrupt_during_training(
        start_fit(tmp_path / "runs", log, env, "--trainer.max_epochs", "10000"), run_dir, signal.SIGTERM
    )
    assert code == 143, log.read_text()[-3000:]
    line = last_line(log)
    saved = run_dir / "checkpoints/last.ckpt"
    assert line.startswith("interrupted by SIGTERM: saved ") and str(saved) in line and "--ckpt_path last" in line
    epoch = torch.load(saved, map_location="cpu", weights_only=False)["epoch"]
    resumed = subprocess.run(
        [sys.executable, "-m", "fsad", "fit", "-c", CONFIG, "--run_root", str(tmp_path / "runs"),
         "--ckpt_path", "last", "--trainer.max_epochs", str(epoch + 2)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {saved}" in resumed.stderr + resumed.stdout


@pytest.mark.slow
def test_sigint_under_slurm_exits_130_and_saves_the_checkpoint_a_requeued_job_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs/promptad/synthetic/disc/k2_s0"
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "fsad-test", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **slurm}
    log = tmp_path / "fit.log"
    code = interrupt_during_training(
        start_fit(tmp_path / "runs", log, env, "--trainer.max_epochs", "10000"), run_dir, signal.SIGINT
    )
    assert code == 130, log.read_text()[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"  # Lightning resumes a requeued SLURM job from hpc_ckpt_<n> by itself
    assert hpc.is_file()
    line = last_line(log)
    assert line.startswith("interrupted by SIGINT: saved ") and str(hpc) in line and "requeue" in line
