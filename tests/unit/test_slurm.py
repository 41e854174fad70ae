"""``fsad slurm`` job scripts, the SLURM allocation check, and the timed progress lines' arithmetic."""

from __future__ import annotations

import importlib.util
import io
import shlex
import sys
from pathlib import Path

import pytest

from fsad.errors import FsadError
from fsad.progress import LineProgress
from fsad.slurm import check_allocation, generate

REPO = Path(__file__).resolve().parents[2]
FIT_2X4 = ["--nodes", "2", "--gpus-per-node", "4", "--time", "08:00:00", "--partition", "gpu", "--account", "lab",
           "--log-dir", "slurm-logs", "--", "fit", "-c", "configs/finegrainedad/mvtec.yaml", "-c",
           "configs/trainer/slurm.yaml", "--data.init_args.root", "/data/my mvtec", "--data.init_args.category",
           "bottle"]  # fmt: skip


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_line(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def test_a_two_node_four_gpu_fit_asks_slurm_and_the_trainer_for_the_same_numbers() -> None:
    script, _ = generate(FIT_2X4)
    asked = directives(script)
    for wanted in ("--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--time=08:00:00", "--partition=gpu",
                   "--account=lab", "--requeue", "--signal=SIGUSR1@90", "--output=slurm-logs/%x-%j.out"):  # fmt: skip
        assert wanted in asked, (wanted, asked)
    assert script.startswith("#!/bin/bash\n") and "set -euo pipefail" in script
    command = srun_line(script)
    assert command[:3] == ["srun", "fsad", "fit"]
    # every -c and override the user gave, in order (the space in the root survives quoting), then the two counts
    assert command[3:-4] == FIT_2X4[FIT_2X4.index("fit") + 1 :]
    assert command[-4:] == ["--trainer.num_nodes", "2", "--trainer.devices", "4"]


def test_a_benchmark_sweep_becomes_a_job_array_of_one_cell_per_task() -> None:
    script, _ = generate(["--max-parallel", "16", "--", "benchmark", "-c", "configs/benchmark/promptad_mvtec.yaml"])
    asked = directives(script)
    # 15 categories x 3 shots x 3 seeds, counted from the config itself
    assert "--array=0-134%16" in asked
    assert {"--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1", "--requeue", "--signal=SIGUSR1@90"} <= set(asked)
    assert "--output=logs/%x-%A_%a.out" in asked
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert line.endswith('--cell-index "$SLURM_ARRAY_TASK_ID"')  # expanded by bash, not quoted away
    assert "benchmark -c configs/benchmark/promptad_mvtec.yaml --collect" in script  # the follow-up is spelled out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--", "fit", "-c", "x.yaml", "--trainer.devices=2"], "--trainer.devices is set from --gpus-per-node"),
        (["--", "fit", "-c", "x.yaml", "--trainer.num_nodes", "2"], "--trainer.num_nodes is set from --nodes"),
        (["--", "export", "-c", "x.yaml"], "cannot submit `export`"),
        (["--nodes", "0", "--", "fit"], "--nodes must be at least 1"),
        (["--nodes", "2", "--", "benchmark", "-c", "b.yaml"], "one cell on one GPU"),
        (["--", "benchmark", "-c", "b.yaml", "--cell-index", "3"], "drop --cell-index"),
        (["--nodes", "2"], "give the command after `--`"),
    ],
)
def test_requests_that_cannot_work_are_refused_in_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(FsadError, match=message) as refused:
        generate(argv)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("example", sorted((REPO / "configs/slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_the_shipped_job_scripts_are_what_fsad_slurm_writes_today(example: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    text = example.read_text()
    (header,) = [line for line in text.splitlines() if line.startswith("#   fsad slurm ")]
    regenerated, _ = generate(shlex.split(header.removeprefix("#   fsad slurm ")))
    assert text == regenerated, f"regenerate {example.name} with the command in its header"


def test_shipped_examples_cover_a_multi_node_fit_and_a_benchmark_array() -> None:
    texts = [p.read_text() for p in (REPO / "configs/slurm").glob("*.sbatch")]
    assert any("--nodes=2" in directives(t) and "--trainer.num_nodes 2" in t for t in texts)
    assert any(any(d.startswith("--array=") for d in directives(t)) for t in texts)


SLURM_JOB = {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "fsad-fit", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4"}  # fmt: skip


def test_a_trainer_that_disagrees_with_the_allocation_is_one_line_naming_both_values(monkeypatch) -> None:
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    check_allocation(2, 4)
    check_allocation(2, "4")
    with pytest.raises(FsadError) as nodes:
        check_allocation(1, 4)
    assert str(nodes.value).startswith("trainer.num_nodes is 1 but SLURM gave this job 2 nodes (SLURM_NNODES=2)")
    with pytest.raises(FsadError, match=r"trainer.devices is 2 but SLURM runs 4 tasks per node") as devices:
        check_allocation(2, [0, 1])
    assert "\n" not in str(nodes.value) + str(devices.value)
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive shell: Lightning does not use SLURM there
    check_allocation(1, 1)


def test_progress_lines_report_rate_and_eta_from_the_steps_done_here(monkeypatch) -> None:
    clock = iter([100.0, 105.0, 105.0, 110.0, 110.0])
    monkeypatch.setattr("fsad.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = LineProgress("benchmark cells", total=40, unit="cell", initial=20, interval=0, stream=out)
    progress.update(10, "(last: bottle)")  # 10 cells in 5 s here: 2/s; 10 left -> 5 s
    progress.update(10)
    assert out.getvalue().splitlines() == [
        "benchmark cells 30/40 cell (75%) 2.00 cell/s ETA 0:00:05 (last: bottle)",
        "benchmark cells 40/40 cell (100%) 2.00 cell/s ETA 0:00:00",
    ]


def test_the_gpu_check_is_one_line_and_a_no_op_without_a_gpu(monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)  # a CPU-only machine, as in CI
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 0
    assert (
        capsys.readouterr().out
        == "gpu_check skipped: no CUDA GPU on this machine (run `make gpu-check` on a GPU node)\n"
    )
