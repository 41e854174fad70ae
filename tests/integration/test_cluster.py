"""Cluster jobs: a generated 2-node script starts a 2-node trainer under fake SLURM variables, a disagreeing
allocation is one line, a requeued job takes its lock over on another host and resumes from ``hpc_ckpt``, live
locks of other jobs are refused, progress goes to log files as timed lines, and metrics options come from the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fsad.errors import FsadError, RunFolderError
from fsad.run_folder import LOCK, RunFolder
from fsad.slurm import generate

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/promptad/synthetic_tiny.yaml")
DEMO = str(REPO / "configs/demo.yaml")
RUN_DIR = Path("promptad/synthetic/disc/k2_s0")


def slurm_env(monkeypatch: pytest.MonkeyPatch, job: str, nodes: int = 1, tasks_per_node: int = 1) -> dict[str, str]:
    """The variables ``srun`` sets for global rank 0 of a batch job (Lightning reads them to find its ranks)."""
    variables = {
        "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "fsad-fit", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node[1-2]",
    }  # fmt: skip
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return variables


def test_the_generated_two_node_command_starts_a_two_node_trainer_under_slurm(tmp_path, monkeypatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from fsad.cli import FsadCLI

    script, _ = generate(["--nodes", "2", "--gpus-per-node", "4", "--", "fit", "-c", TINY, "-c",
                          str(REPO / "configs/trainer/slurm.yaml")])  # fmt: skip
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    command = shlex.split(line)[3:]  # after `srun fsad fit`
    slurm_env(monkeypatch, "77", nodes=2, tasks_per_node=4)
    # no GPU here: only the accelerator is changed; the node and device counts are the script's
    cli = FsadCLI(args=[*command, "--trainer.accelerator", "cpu", "--run_root", str(tmp_path)], run=False)
    trainer = cli.trainer
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)


def test_a_trainer_that_disagrees_with_slurm_stops_with_one_line(tmp_path, monkeypatch, capfd) -> None:
    from fsad.cli import main

    slurm_env(monkeypatch, "77", nodes=2)  # a hand-written script: --nodes=2, trainer.num_nodes left at 1
    assert main(["fit", "-c", TINY, "--run_root", str(tmp_path)]) == 1
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [
        "error: trainer.num_nodes is 1 but SLURM gave this job 2 nodes (SLURM_NNODES=2); set both from one value: "
        "`fsad slurm --nodes 2 ...` writes a script passing --trainer.num_nodes 2"
    ]
    assert not (tmp_path / RUN_DIR).exists()  # stopped before anything was written


@pytest.mark.filterwarnings("ignore")
def test_a_requeued_job_takes_its_lock_over_on_another_host_and_resumes_from_hpc_ckpt(tmp_path, monkeypatch) -> None:
    from fsad.cli import FsadCLI

    slurm_env(monkeypatch, "4242")
    first = FsadCLI(args=["fit", "-c", TINY, "--run_root", str(tmp_path), "--trainer.max_epochs", "1"])
    run_dir = tmp_path / RUN_DIR
    assert first.trainer.current_epoch == 1
    # the job was killed on gpu-node-17 after Lightning's SIGUSR1 checkpoint; its lock stayed behind
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    shutil.copy(run_dir / "checkpoints/last.ckpt", hpc)
    (run_dir / LOCK).write_text(json.dumps({"pid": 12345, "host": "gpu-node-17", "slurm_job": "4242"}))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-tools"))  # the same job id is enough; no squeue asked
    requeued = FsadCLI(args=["fit", "-c", TINY, "--run_root", str(tmp_path), "--trainer.max_epochs", "2"])
    assert requeued.trainer.ckpt_path == str(hpc)  # Lightning resumed from the job's own hpc checkpoint
    assert requeued.trainer.current_epoch == 2
    assert not (run_dir / LOCK).exists()  # released at the end


def fake_squeue(folder: Path, states: dict[str, str]) -> None:
    """An executable ``squeue`` answering ``--jobs <id>`` as SLURM does: the state, or an invalid-id error."""
    folder.mkdir(exist_ok=True)
    script = folder / "squeue"
    script.write_text(
        "#!/bin/sh\n"
        'job=""; while [ $# -gt 0 ]; do [ "$1" = "--jobs" ] && job="$2"; shift; done\n'
        f'case "$job" in {" ".join(f"{job}) echo {state};;" for job, state in states.items())}\n'
        '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n'
    )
    script.chmod(0o755)


def other_jobs_lock(folder: Path, job: str, age_seconds: float = 0.0) -> None:
    lock = folder / LOCK
    lock.write_text(json.dumps({"pid": 999, "host": "gpu-node-17", "slurm_job": job}))
    if age_seconds:
        os.utime(lock, (time.time() - age_seconds, time.time() - age_seconds))


def test_a_live_lock_of_another_job_is_refused_and_a_finished_jobs_lock_is_taken(tmp_path, monkeypatch, capsys) -> None:
    slurm_env(monkeypatch, "4242")
    tools = tmp_path / "bin"
    fake_squeue(tools, {"5151": "RUNNING"})
    monkeypatch.setenv("PATH", str(tools))
    folder = tmp_path / "run"
    folder.mkdir()
    other_jobs_lock(folder, "5151", age_seconds=3600)  # squeue's answer wins over an old heartbeat
    with pytest.raises(
        RunFolderError, match=r"in use by another fsad process \(pid 999 on gpu-node-17, SLURM job 5151\)"
    ):
        RunFolder(folder, "abc").claim(overwrite=False)
    other_jobs_lock(folder, "6262")  # squeue no longer knows it: the job has ended
    claimed = RunFolder(folder, "abc")
    claimed.claim(overwrite=False)
    assert capsys.readouterr().err == f"run folder {folder}: lock taken over (SLURM job 6262 is no longer running)\n"
    assert json.loads((folder / LOCK).read_text()) == {"pid": os.getpid(), "host": os.uname().nodename,
                                                       "slurm_job": "4242"}  # fmt: skip
    claimed.release()


def test_without_slurm_tools_a_lock_is_stale_only_when_its_heartbeat_stopped(tmp_path, monkeypatch) -> None:
    slurm_env(monkeypatch, "4242")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    other_jobs_lock(tmp_path, "5151", age_seconds=60)  # refreshed a minute ago: its holder may be alive
    with pytest.raises(RunFolderError, match="in use"):
        RunFolder(tmp_path, "abc").claim(overwrite=False)
    other_jobs_lock(tmp_path, "5151", age_seconds=600)  # no heartbeat for 10 min (the limit is 5)
    claimed = RunFolder(tmp_path, "abc")
    claimed.claim(overwrite=False)
    claimed.release()


def test_the_lock_holder_refreshes_its_heartbeat(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("fsad.run_folder.HEARTBEAT_SECONDS", 0.05)
    folder = RunFolder(tmp_path, "abc")
    folder.claim(overwrite=False)
    lock = tmp_path / LOCK
    os.utime(lock, (time.time() - 600, time.time() - 600))
    time.sleep(0.5)
    assert time.time() - lock.stat().st_mtime < 5
    folder.release()


def test_a_redirected_fit_prints_timed_progress_lines_and_no_carriage_return(tmp_path) -> None:
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"PYTHONWARNINGS": "ignore", "FSAD_PROGRESS_SECONDS": "0"}
    with out.open("w") as stdout, err.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "fsad", "fit", "-c", TINY, "--run_root", str(tmp_path / "runs"),
             "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "true"],
            cwd=REPO, env=env, stdout=stdout, stderr=stderr, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, err.read_text()[-3000:]
    text = out.read_text()
    assert "\r" not in text and "\r" not in err.read_text()
    number = r"\d+\.\d+ (it/s|s/it)"
    lines = [line for line in text.splitlines() if line.startswith("fit ")]
    assert re.fullmatch(rf"fit epoch 1/2 batch 1/1 \(50%\) {number} ETA \d+:\d\d:\d\d loss \d+\.\d{{4}}", lines[0])
    assert re.fullmatch(rf"fit epoch 2/2 batch 1/1 \(100%\) {number} ETA 0:00:00 loss \d+\.\d{{4}}", lines[1])
    assert re.fullmatch(r"fit epoch 2/2 batch 1/1 \(100%\) .* done in \d+:\d\d:\d\d", lines[-1])


@pytest.mark.filterwarnings("ignore")
def test_metrics_options_switch_aupro_on_without_replacing_the_callbacks(tmp_path) -> None:
    from fsad.callbacks.metrics import AnomalyMetrics
    from fsad.cli import FsadCLI

    demo = yaml.safe_load(Path(DEMO).read_text())
    assert not demo["trainer"]["callbacks"][0].get("init_args", {}).get("aupro")  # off in the config
    cli = FsadCLI(args=["test", "-c", DEMO, "--run_root", str(tmp_path), "--metrics.aupro", "true"])
    (metrics,) = [c for c in cli.trainer.callbacks if isinstance(c, AnomalyMetrics)]
    assert metrics.aupro and metrics.f1  # f1 kept as configured
    assert len([c for c in cli.trainer.callbacks if type(c).__module__.startswith("fsad.callbacks")]) == 3
    run_dir = tmp_path / "membank/synthetic/disc/k4_s0"
    with (run_dir / "results.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert 0.5 < float(row["pixel_AUPRO"]) <= 1.0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["aupro"] is True  # config.yaml says what ran

    no_metrics = tmp_path / "no_metrics.yaml"
    demo["trainer"]["callbacks"] = demo["trainer"]["callbacks"][1:]
    no_metrics.write_text(yaml.safe_dump(demo))
    with pytest.raises(FsadError, match=r"--metrics.aupro: the config has no fsad.callbacks.metrics.AnomalyMetrics"):
        FsadCLI(args=["-c", str(no_metrics), "--run_root", str(tmp_path), "--metrics.aupro", "true"], run=False)


@pytest.mark.filterwarnings("ignore")
def test_test_stage_lines_in_a_log_and_the_bar_on_a_terminal(tmp_path, monkeypatch, capsys) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    from fsad.callbacks.progress import LogProgress
    from fsad.cli import FsadCLI

    monkeypatch.setenv("FSAD_PROGRESS_SECONDS", "0")
    args = ["-c", DEMO, "--run_root", str(tmp_path), "--trainer.enable_progress_bar", "true"]
    monkeypatch.setattr("fsad.cli.is_terminal", lambda: True)
    assert isinstance(FsadCLI(args=args, run=False).trainer.progress_bar_callback, TQDMProgressBar)
    monkeypatch.setattr("fsad.cli.is_terminal", lambda: False)
    cli = FsadCLI(args=["test", *args])
    assert isinstance(cli.trainer.progress_bar_callback, LogProgress)
    batches = int(sum(cli.trainer.num_test_batches))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test ")]
    assert len(lines) == batches + 1 and batches > 1  # one per batch at interval 0, then the closing line
    assert re.fullmatch(rf"test batch 1/{batches} \(\d+%\) \d+\.\d+ (it/s|s/it) ETA \d+:\d\d:\d\d", lines[0])
    assert re.fullmatch(rf"test batch {batches}/{batches} \(100%\) .* done in \d+:\d\d:\d\d", lines[-1])
