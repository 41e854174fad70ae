"""Run folders never mix two runs, and every everyday mistake ends as one ``error:`` line (issue #15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsad.cli import main
from fsad.run_folder import LOCK, RunFolder

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo.yaml")
TINY = str(REPO / "configs/promptad/synthetic_tiny.yaml")


def demo_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["test", "-c", DEMO, "--run_root", str(tmp_path / "runs"),
            "--data.init_args.root", str(tmp_path / "synthetic"), *extra]  # fmt: skip


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("error: "), err[-20:]
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_sequential_runs_of_two_configs_never_mix_and_a_failed_run_leaves_the_finished_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "runs/membank/synthetic/disc/k4_s0"
    assert main(demo_args(tmp_path)) == 0
    finished = snapshot(run_dir)
    assert {"run.json", "results.csv", "config.yaml", "support.txt"} <= set(finished)
    assert len([name for name in finished if name.startswith("heatmaps/") and name.endswith(".png")]) == 8
    capsys.readouterr()

    # another config into the same folder: refused, nothing touched
    assert main(demo_args(tmp_path, "--model.init_args.gaussian_sigma", "1.0")) == 1
    assert "holds a finished run of another config" in one_error_line(capsys)
    assert snapshot(run_dir) == finished

    # the same config failing half-way (a test image became unreadable): the finished run is untouched
    broken = sorted((tmp_path / "synthetic/disc/test").rglob("*.png"))[3]
    original = broken.read_bytes()
    broken.write_bytes(b"not a png")
    assert main(demo_args(tmp_path)) == 1
    assert str(broken) in one_error_line(capsys)
    after_failure = snapshot(run_dir)
    assert after_failure == finished
    broken.write_bytes(original)

    # --overwrite replaces the old run entirely: a stale heatmap of the old run does not survive
    (run_dir / "heatmaps" / "99999_stale.png").write_bytes(b"old")
    assert main(demo_args(tmp_path, "--model.init_args.gaussian_sigma", "1.0", "--overwrite", "true")) == 0
    replaced = snapshot(run_dir)
    assert "heatmaps/99999_stale.png" not in replaced
    assert len([name for name in replaced if name.startswith("heatmaps/") and name.endswith(".png")]) == 8
    assert json.loads(replaced["run.json"])["config_hash"] != json.loads(finished["run.json"])["config_hash"]
    assert "gaussian_sigma: 1.0" in replaced["config.yaml"].decode()


@pytest.mark.slow
def test_a_second_concurrent_run_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs/promptad/synthetic/disc/k2_s0"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    fit = [sys.executable, "-m", "fsad", "fit", "-c", TINY, "--run_root", str(tmp_path / "runs")]
    first = subprocess.Popen([*fit, "--trainer.max_epochs", "10000"], cwd=REPO, env=env, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (run_dir / LOCK).exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    second = subprocess.run([*fit, "--model.init_args.lr", "0.01"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: run folder {run_dir} is in use")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143, first.stderr.read()[-3000:]
    assert not (run_dir / LOCK).exists()  # released on the way out
    assert not (run_dir / "run.json").exists()  # an interrupted run is never recorded as finished


def test_a_lock_left_by_a_dead_process_is_taken_over_and_a_live_one_refuses(tmp_path: Path) -> None:
    from fsad.errors import RunFolderError

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp_path.joinpath(LOCK).write_text(f"{gone.stdout.strip()} {os.uname().nodename}")
    folder = RunFolder(tmp_path, "abc")
    folder.claim(overwrite=False)
    assert json.loads(tmp_path.joinpath(LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match="in use by another fsad process"):
        RunFolder(tmp_path, "abc").claim(overwrite=False)
    folder.release()
    assert not tmp_path.joinpath(LOCK).exists()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data.init_args.k_shot", "500"], "data.k_shot=500 exceeds the"),
        (["--data.init_args.k_shot", "0"], "data.k_shot: 0 (zero-shot) but membank needs at least one support image"),
        (["--data.init_args.k_shot", "-2"], "got k_shot=-2"),
        (["--model.init_args.backbone.pretrained", "laion400m_e32"], "no published weights"),
        (["--ckpt_path", "{tmp}/missing.ckpt"], "--ckpt_path: no such file: {tmp}/missing.ckpt"),
    ],
)
def test_everyday_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(demo_args(tmp_path, *extra)) == 1
    assert expected.replace("{tmp}", str(tmp_path)) in one_error_line(capsys)


@pytest.mark.parametrize("content", [b"\x00garbage", b"PK\x03\x04truncated zip"])
def test_a_corrupt_checkpoint_is_one_line_without_unsafe_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    checkpoint = tmp_path / "broken.ckpt"
    checkpoint.write_bytes(content)
    assert main(demo_args(tmp_path, "--ckpt_path", str(checkpoint))) == 1
    line = one_error_line(capsys)
    assert str(checkpoint) in line and "set to `False`" not in capsys.readouterr().err + line


def test_an_unsafe_checkpoint_is_refused_without_advising_weights_only_false(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    checkpoint = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "anything": Path("x")}, checkpoint)
    assert main(demo_args(tmp_path, "--ckpt_path", str(checkpoint))) == 1
    line = one_error_line(capsys)
    assert line.endswith("is not a readable fsad checkpoint (corrupt, truncated, or not created by fsad); fsad never "
                         "loads checkpoints with weights_only=False")  # fmt: skip
    assert "set to `False`" not in line


def test_benchmark_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"method_config: [{DEMO}]\ncategories: [disc]\nshots: [1000]\nseeds: [0]\noutput: {tmp_path / 'out'}\n"
        f"extra_args: ['--run_root', '{tmp_path / 'runs'}', '--data.init_args.root', '{tmp_path / 'synthetic'}']\n"
    )
    assert main(["benchmark", "-c", str(config)]) == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err and "failed cells: [0]" in printed.out
    (failure,) = (tmp_path / "out" / "failures.log").read_text().splitlines()
    assert "DataError" in failure and "k_shot" in failure


@pytest.mark.slow
def test_output_is_quiet_tips_off_and_each_warning_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-m", "fsad", "fit", "-c", TINY, "--run_root", str(tmp_path / "runs"),
         "--trainer.max_epochs", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Tip:" not in output and "litlogger" not in output and "LeafSpec" not in output
    assert output.count("RANDOM weights") == 1 and "No pretrained weights loaded" not in output
