"""``fsad slurm``: write the SLURM job script of one ``fsad`` command, with nodes and GPUs set in one place.

``fsad slurm --nodes 2 --gpus-per-node 4 -- fit -c configs/finegrainedad/mvtec.yaml [overrides]`` prints a batch
script that asks SLURM for 2 nodes with 4 GPUs and 4 tasks each (one task per GPU, as Lightning's DDP under SLURM
expects), requeues the job when it is preempted or runs out of time (``--requeue``, and ``SIGUSR1`` 90 s before
the end, on which Lightning saves ``hpc_ckpt_<n>.ckpt`` and requeues), and runs the command through ``srun`` with
``--trainer.num_nodes 2 --trainer.devices 4`` appended: the allocation and the trainer come from the same two
numbers, so they cannot disagree. ``-- benchmark -c <sweep>.yaml`` writes a job array instead, one task per cell.

At run time, :func:`check_allocation` compares the trainer's ``num_nodes``/``devices`` with what SLURM granted
(for a script written by hand) and stops with one line naming both values.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fsad.errors import FsadError
from fsad.run_folder import write_text_atomically

TRAINER_COMMANDS = ("fit", "test", "predict")
#: Trainer settings ``fsad slurm`` owns: they are derived from ``--nodes`` and ``--gpus-per-node``.
OWNED_OVERRIDES = {"--trainer.num_nodes": "--nodes", "--trainer.devices": "--gpus-per-node"}
#: ``fsad benchmark`` options that are not a sweep to spread over an array.
NOT_ARRAY_OPTIONS = ("--cell-index", "--collect", "--list-cells", "--pretrain")


class SlurmError(FsadError):
    """A job request that cannot work: a bad option, or a trainer that disagrees with SLURM's allocation."""


@dataclass
class JobRequest:
    """What to ask SLURM for, and the ``fsad`` command (subcommand first) to run."""

    command: list[str]
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    log_dir: str = "logs"
    venv: str | None = ".venv"
    max_parallel: int | None = None
    sbatch_lines: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse requests whose job could not run as asked (one line naming the option)."""
        if not self.command:
            raise SlurmError("fsad slurm: give the command after `--`, e.g. `fsad slurm --nodes 2 -- fit -c cfg.yaml`")
        subcommand = self.command[0]
        if subcommand not in (*TRAINER_COMMANDS, "benchmark"):
            raise SlurmError(
                f"fsad slurm: cannot submit `{subcommand}`; the command after `--` is one of "
                f"{', '.join((*TRAINER_COMMANDS, 'benchmark'))}"
            )
        for name, value in (("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node),
                            ("--cpus-per-task", self.cpus_per_task)):  # fmt: skip
            if value < 1:
                raise SlurmError(f"fsad slurm: {name} must be at least 1, got {value}")
        for arg in self.command[1:]:
            key = arg.split("=", 1)[0]
            if key in OWNED_OVERRIDES:
                raise SlurmError(
                    f"fsad slurm: {key} is set from {OWNED_OVERRIDES[key]}; drop it from the command so the "
                    "trainer and the SLURM allocation come from the same value"
                )
        if subcommand == "benchmark":
            given = [arg for arg in self.command[1:] if arg.split("=", 1)[0] in NOT_ARRAY_OPTIONS]
            if given:
                raise SlurmError(f"fsad slurm: a benchmark job array runs every cell; drop {', '.join(given)}")
            if self.nodes != 1 or self.gpus_per_node != 1:
                raise SlurmError(
                    "fsad slurm: a benchmark array task runs one cell on one GPU; use --nodes 1 --gpus-per-node 1 "
                    f"(got --nodes {self.nodes} --gpus-per-node {self.gpus_per_node})"
                )
        elif self.max_parallel is not None:
            raise SlurmError("fsad slurm: --max-parallel applies to benchmark job arrays only")


def benchmark_config_path(command: list[str]) -> str:
    """The ``-c`` file of an ``fsad benchmark`` command."""
    for index, arg in enumerate(command):
        if arg in ("-c", "--config") and index + 1 < len(command):
            return command[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    raise SlurmError("fsad slurm: the benchmark command needs its sweep config: `-- benchmark -c <sweep>.yaml`")


def count_cells(config_path: str) -> int:
    """Number of cells of a benchmark sweep (the array's size); imports the runner only when asked."""
    from fsad.benchmark import Sweep, load_config

    return len(Sweep(load_config(config_path)).cells)


def render(request: JobRequest, generator_args: list[str], cells: int | None = None) -> str:
    """The batch script of ``request``; ``generator_args`` (the ``fsad slurm`` arguments) go into its header so
    that it says how to write it again, and ``cells`` sizes a benchmark array."""
    request.validate()
    subcommand = request.command[0]
    array = subcommand == "benchmark"
    if array and (cells is None or cells < 1):
        raise SlurmError("fsad slurm: the benchmark sweep has no cells")
    header = [
        "#!/bin/bash",
        "# Written by `fsad slurm`; write it again rather than editing it:",
        f"#   fsad slurm {shlex.join(generator_args)}",
        "# Submit from the folder it was written in (relative paths resolve there). SLURM does not create the log",
        f"# folder: `fsad slurm` made {request.log_dir}/ when it wrote this file.",
    ]
    if array:
        sweep = benchmark_config_path(request.command)
        header += [
            f"# One array task per cell ({cells} cells). A pretrained-protocol method trains once first:",
            f"#   fsad benchmark -c {shlex.quote(sweep)} --pretrain",
            "# then submit, and collect the table when every task has ended:",
            "#   JOB=$(sbatch --parsable <this file>)",
            f'#   sbatch --dependency=afterany:$JOB --wrap "fsad benchmark -c {shlex.quote(sweep)} --collect"',
        ]
    name = request.job_name or f"fsad-{subcommand}"
    log_name = "%x-%A_%a.out" if array else "%x-%j.out"
    directives = [
        f"--job-name={name}",
        f"--nodes={request.nodes}",
        f"--ntasks-per-node={request.gpus_per_node}",
        f"--gres=gpu:{request.gpus_per_node}",
        f"--cpus-per-task={request.cpus_per_task}",
        f"--time={request.time}",
    ]
    directives += [f"--partition={request.partition}"] if request.partition else []
    directives += [f"--account={request.account}"] if request.account else []
    if array:
        limit = f"%{request.max_parallel}" if request.max_parallel else ""
        directives.append(f"--array=0-{cells - 1}{limit}")
    directives += [
        "--requeue",
        "--signal=SIGUSR1@90",
        "--open-mode=append",
        f"--output={request.log_dir}/{log_name}",
        *request.sbatch_lines,
    ]
    body = ["set -euo pipefail"]
    if request.venv:
        body.append(f"source {shlex.quote(request.venv)}/bin/activate")
    if array:
        body.append(f'srun fsad {shlex.join(request.command)} --cell-index "$SLURM_ARRAY_TASK_ID"')
    else:
        owned = ["--trainer.num_nodes", str(request.nodes), "--trainer.devices", str(request.gpus_per_node)]
        body.append(f"srun fsad {shlex.join([*request.command, *owned])}")
    return "\n".join([*header, *(f"#SBATCH {line}" for line in directives), *body]) + "\n"


def slurm_node_count() -> int | None:
    """The number of nodes SLURM granted this job, or None outside a SLURM job."""
    for name in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def device_count(devices: object) -> int | None:
    """``trainer.devices`` as a number of processes per node, when it is one (not ``auto``)."""
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, list | tuple):
        return len(devices)
    return None


def check_allocation(num_nodes: int, devices: object) -> None:
    """Under a SLURM job that Lightning will run in (batch mode, not an interactive shell), refuse a trainer whose
    ``num_nodes`` or ``devices`` differs from the nodes and tasks per node SLURM granted, naming both values."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return
    nodes = slurm_node_count()
    if nodes is not None and nodes != num_nodes:
        raise SlurmError(
            f"trainer.num_nodes is {num_nodes} but SLURM gave this job {nodes} nodes (SLURM_NNODES={nodes}); set "
            f"both from one value: `fsad slurm --nodes {nodes} ...` writes a script passing --trainer.num_nodes {nodes}"
        )
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    wanted = device_count(devices)
    if per_node.isdigit() and wanted is not None and int(per_node) != wanted:
        raise SlurmError(
            f"trainer.devices is {wanted} but SLURM runs {per_node} tasks per node (SLURM_NTASKS_PER_NODE="
            f"{per_node}); one task per device: `fsad slurm --gpus-per-node {per_node} ...` sets both"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsad slurm",
        usage="fsad slurm [options] -- {fit,test,predict,benchmark} -c CONFIG [overrides ...]",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes (also trainer.num_nodes; default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs = tasks per node (also trainer.devices)")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (data loading; default 8)")
    parser.add_argument("--time", default="04:00:00", help="time limit, SLURM format (default 04:00:00)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--job-name", help="job name (default fsad-<subcommand>)")
    parser.add_argument("--log-dir", default="logs", help="folder of the job's log file (default logs; created)")
    parser.add_argument("--venv", default=".venv", help="virtualenv to activate ('' for none; default .venv)")
    parser.add_argument("--max-parallel", type=int, help="benchmark arrays: at most this many tasks at once")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="one more #SBATCH line, e.g. --sbatch=--mem=64G (repeatable)")  # fmt: skip
    parser.add_argument("--out", help="write the script to this file (default: print it)")
    return parser


def without_out(options: list[str]) -> list[str]:
    """The ``fsad slurm`` options less ``--out FILE``: where the script went is not part of what it says."""
    kept: list[str] = []
    skip_value = False
    for option in options:
        if skip_value:
            skip_value = False
        elif option == "--out":
            skip_value = True
        elif not option.startswith("--out="):
            kept.append(option)
    return kept


def generate(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """The job script for ``fsad slurm`` arguments ``argv`` (options, ``--``, the command), and the parsed options;
    nothing is written."""
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    args = build_parser().parse_args(options)
    request = JobRequest(
        command=command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, partition=args.partition, account=args.account, job_name=args.job_name,
        log_dir=args.log_dir, venv=args.venv or None, max_parallel=args.max_parallel, sbatch_lines=args.sbatch,
    )  # fmt: skip
    request.validate()
    cells = count_cells(benchmark_config_path(command)) if command[0] == "benchmark" else None
    return render(request, [*without_out(options), "--", *command], cells), args


def main(argv: list[str]) -> int:
    """``fsad slurm``: print (or ``--out``) the job script and create its log folder; exit 0."""
    script, args = generate(argv)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if args.out:
        write_text_atomically(Path(args.out), script)
        print(f"wrote {args.out}: submit it with `sbatch {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0
