"""Nothing lost: a full disk or an interrupt during ``test``, ``predict`` or ``benchmark`` ends in one line with exit
1 (143 for SIGTERM, 130 for SIGINT), publishes nothing, and leaves the previous finished run byte for byte as it was
(issue #29).

The full disk is real as far as the writer can tell: the child process runs with ``RLIMIT_FSIZE`` (and SIGXFSZ
ignored), so every write past the limit fails with ``EFBIG`` the way a full disk fails with ``ENOSPC``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsad.cli import main
from fsad.datamodules.synthetic import generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo.yaml")
PREDICT = str(REPO / "configs/data/predict.yaml")
#: Larger than config.yaml, support.txt and results.*, smaller than a heatmap, an overlay or a raw map.
FILE_LIMIT = 16_000
#: Larger than every output of the demo's test run (heatmaps are about 0.2 MB) but report.html (about 2 MB).
REPORT_LIMIT = 1_000_000
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from fsad.cli import main
sys.exit(main(sys.argv[1:]))
"""
#: The same command, each batch (and an export's checkpoint) slowed down so that a signal surely arrives half-way,
#: batches counted (one line per finished batch in the file ``$BATCH_LOG``).
SLOWED = """
import os, sys, time
from fsad.callbacks.predictions import PredictionWriter
from fsad.callbacks.heatmaps import HeatmapLogger
for callback, hook in ((PredictionWriter, "on_predict_batch_end"), (HeatmapLogger, "on_test_batch_end")):
    original = getattr(callback, hook)
    def slowed(*args, original=original, **kwargs):
        original(*args, **kwargs)
        with open(os.environ["BATCH_LOG"], "a") as log:
            log.write("batch\\n")
        time.sleep(0.4)
    setattr(callback, hook, slowed)
import fsad.export
save_checkpoint = fsad.export.save_checkpoint
def slowed_save(*args, **kwargs):  # written after the model file: an export stays half-way for a while
    time.sleep(3)
    save_checkpoint(*args, **kwargs)
fsad.export.save_checkpoint = slowed_save
from fsad.cli import main
sys.exit(main(sys.argv[1:]))
"""

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too: a leftover ``.staging`` or ``.lock`` would show)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def child(script: str, args: list[str], batch_log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1",
           "BATCH_LOG": str(batch_log)}  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def with_full_disk(args: list[str], limit: int = FILE_LIMIT) -> tuple[int, str]:
    process = child(LIMITED.format(limit=limit), args)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def the_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr and "libpng" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic")


def test_test_on_a_full_disk_exits_1_and_the_finished_run_its_config_and_report_stay_byte_identical(
    tmp_path: Path, data: Path
) -> None:
    args = ["test", "-c", DEMO, "--run_root", str(tmp_path / "runs"), "--data.init_args.root", str(data)]
    run_dir = tmp_path / "runs/membank/synthetic/disc/k4_s0"
    assert main(args) == 0
    finished = snapshot(run_dir)
    assert len([name for name in finished if name.startswith("heatmaps/") and name.endswith(".png")]) == 8
    assert "config.yaml" in finished

    code, stderr = with_full_disk([*args, "--trainer.enable_model_summary", "false"])
    assert code == 1
    line = the_error_line(stderr)
    assert line.startswith(f"error: cannot write {run_dir}/.staging/heatmaps") and line.endswith("File too large")
    assert snapshot(run_dir) == finished  # config.yaml too: it still describes the finished run

    # Only report.html is too large: it is staged with the other outputs, so none of them is published either.
    assert max(len(v) for k, v in finished.items() if k != "report.html") < REPORT_LIMIT < len(finished["report.html"])
    code, stderr = with_full_disk(args, REPORT_LIMIT)
    assert code == 1
    line = the_error_line(stderr)
    assert line == f"error: cannot write {run_dir}/.staging/report.html: File too large", line
    assert snapshot(run_dir) == finished  # run.json's finishing time included


def test_predict_on_a_full_disk_exits_1_and_the_previous_predictions_stay_byte_identical(
    tmp_path: Path, data: Path
) -> None:
    args = ["predict", "-c", DEMO, "-c", PREDICT, "--run_root", str(tmp_path / "runs"),
            "--data.init_args.path", str(data / "disc/test"), "--data.init_args.normal_dir",
            str(data / "disc/train/good")]  # fmt: skip
    run_dir = tmp_path / "runs/membank/predict/my_product/k4_s0"
    assert main(args) == 0
    finished = snapshot(run_dir)
    assert "predictions/scores.csv" in finished and "config.yaml" in finished

    code, stderr = with_full_disk(args)
    assert code == 1
    assert the_error_line(stderr).startswith(f"error: cannot write {run_dir}/.staging/predictions.partial/")
    assert snapshot(run_dir) == finished


def test_a_benchmark_on_a_full_disk_stops_in_one_line_and_its_table_stays_byte_identical(
    tmp_path: Path, data: Path
) -> None:
    config = tmp_path / "sweep.yaml"
    sweep = f"method_config: [{DEMO}]\nroot: {data}\ncategories: [disc]\nshots: [4]\nseeds: [{{seeds}}]\n" \
            f"output: {tmp_path / 'out'}\nfeature_cache: {{{{enabled: false}}}}\n"  # fmt: skip
    config.write_text(sweep.format(seeds="0"))
    assert main(["benchmark", "-c", str(config)]) == 0
    finished = {name: (tmp_path / "out" / name).read_bytes() for name in ("benchmark.csv", "benchmark.md")}

    config.write_text(sweep.format(seeds="0, 1, 2"))  # two new cells; the first one's heatmaps fill the disk
    code, stderr = with_full_disk(["benchmark", "-c", str(config)])
    assert code == 1
    assert the_error_line(stderr).startswith("error: cannot write ") and "File too large" in stderr
    assert not (tmp_path / "out/failures.log").exists()  # stopped at the first cell, not one failure per cell
    assert {name: (tmp_path / "out" / name).read_bytes() for name in finished} == finished


def interrupt_when(process: subprocess.Popen, started: Path, signum: int) -> tuple[int, str]:
    """Send ``signum`` as soon as ``started`` is a file or a folder holding one (the work is under way), then wait
    for the ending."""
    deadline = time.monotonic() + 240
    while not (started.is_file() or started.is_dir() and any(p.is_file() for p in started.rglob("*"))):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the work never started"
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.parametrize(
    ("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_during_predict_stops_it_within_a_batch_and_publishes_nothing(
    tmp_path: Path, data: Path, signum: signal.Signals, exit_code: int
) -> None:
    """SIGTERM stops at the next batch boundary; SIGINT's KeyboardInterrupt stops at once, maybe before the batch
    under way is counted."""
    args = ["predict", "-c", DEMO, "-c", PREDICT, "--run_root", str(tmp_path / "runs"),
            "--data.init_args.path", str(data / "disc/test"), "--data.init_args.normal_dir",
            str(data / "disc/train/good"), "--data.init_args.batch_size", "1"]  # fmt: skip
    run_dir = tmp_path / "runs/membank/predict/my_product/k4_s0"
    assert main(args) == 0
    finished = snapshot(run_dir)

    batches = tmp_path / "batches.log"
    process = child(SLOWED, args, batches)
    code, stderr = interrupt_when(process, run_dir / ".staging/predictions.partial", signum)
    assert code == exit_code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted by {signum.name}: nothing new saved")
    assert batches.is_file() or signum == signal.SIGINT
    assert (len(batches.read_text().splitlines()) if batches.is_file() else 0) <= 3  # of 20 batches
    assert snapshot(run_dir) == finished


def test_sigterm_during_a_benchmark_cell_stops_it_and_records_nothing(tmp_path: Path, data: Path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(f"method_config: [{DEMO}]\nroot: {data}\ncategories: [disc]\nshots: [4]\nseeds: [0, 1]\n"
                      f"output: {tmp_path / 'out'}\nextra_args: ['--data.init_args.batch_size', '1']\n")  # fmt: skip
    batches = tmp_path / "batches.log"
    process = child(SLOWED, ["benchmark", "-c", str(config)], batches)
    code, stderr = interrupt_when(process, batches, signal.SIGTERM)  # during the first cell's test loop
    assert code == 143, stderr[-3000:]
    assert len(batches.read_text().splitlines()) < 20  # the cell's 20 test batches did not all run
    assert stderr.strip().splitlines()[-1].startswith("interrupted by SIGTERM")
    assert not (tmp_path / "out/benchmark.csv").exists() and not (tmp_path / "out/failures.log").exists()


def test_sigterm_during_export_leaves_no_model_folder(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "model"
    args = ["export", "-c", DEMO, "--out", str(out), "--format", "onnx", "--thresholds", "none",
            "--run_root", str(tmp_path / "runs"),
            "--data.init_args.root", str(data)]  # fmt: skip
    process = child(SLOWED, args)
    started = tmp_path / "first_file"  # model.partial (or, before staging existed, model itself) gets its first file
    deadline = time.monotonic() + 240
    while not any(p.is_file() for folder in (out, out.with_name("model.partial")) for p in folder.rglob("*")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started.touch()
    code, stderr = interrupt_when(process, started, signal.SIGTERM)
    assert code == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted by SIGTERM")
    assert not out.exists() and not out.with_name("model.partial").exists()


def test_sigint_during_captions_generate_exits_130_and_writes_no_record(tmp_path: Path, shared_data: Path) -> None:
    from tests.integration.test_caption_generator import API_KEY, ScriptedEndpoint, answer

    images = sorted((shared_data / "hazelnut_toy/train/good").glob("*.jpg"))[:3]
    out = tmp_path / "hazelnut.json"
    with ScriptedEndpoint([("json", answer()), ("sleep", 60)]) as server:
        process = child(SLOWED, ["captions", "generate", "--images", *map(str, images), "--category", "hazelnut_toy",
                                 "--out", str(out), "--base-url", server.url, "--model", "vision-model",
                                 "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
        deadline = time.monotonic() + 240
        while len(server.requests) < 2:  # the first image is answered, the second one's request is in flight
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted by SIGINT") and API_KEY not in stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
