"""The prepared GPU check: what a GPU node must show before fsad's GPU paths are trusted, one line per figure.

Run ``make gpu-check`` on one node with 1 or 2 CUDA GPUs (about 8 minutes at most). With the real MVTec-AD bottle
images (``--mvtec-root``, default the folder the tests read) and ViT-B-16-plus-240 with random weights, it prints:

* ``test_step``: each method's test step ÷ the bare ``encode_image`` at batch 32, in fp32 and in the precision of
  the method's ``variant: code`` (PromptAD fp16, FineGrainedAD bf16; KAG-prompt and the memory bank have no other
  precision), with images/s and the peak GPU memory. Steps are timed between the test-batch hooks with CUDA
  synchronised, the first batch (support and text features) left out; the median is reported;
* ``ddp_test``: ``fsad test`` of the memory bank with 2 NCCL processes against 1 process: every metric must be equal
  to the last digit (skipped with one line on one GPU);
* ``fit``: a few FineGrainedAD bf16 and PromptAD fp16 training steps of the code variant, with their losses all
  finite, and the peak memory.

On a machine without CUDA it prints one line and exits 0 (CI runs it that way), so ``make bench`` keeps working.

    python benchmarks/gpu_check.py [--mvtec-root DIR] [--steps 5]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad"
BATCH = 32
ACCELERATOR, DEVICE = "gpu", "cuda"
#: method -> the precision its ``variant: code`` runs in on a GPU, and the overlay that selects that variant.
CODE_PRECISION = {
    "membank": ("fp32", None),
    "promptad": ("fp16", "configs/variant/promptad_code.yaml"),
    "finegrainedad": ("bf16", "configs/variant/finegrainedad_code.yaml"),
    "kagprompt": ("fp32", None),
}
METRICS = ("image_AUROC", "pixel_AUROC", "image_AP", "pixel_AP", "image_F1max", "pixel_F1max")


class StepTimer(Callback):
    """Seconds of each test step of ``BATCH`` images, CUDA synchronised, the run's first batch left out."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0
        self._batches = 0

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        torch.cuda.synchronize()
        self._started = time.perf_counter()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._started
        batch = args[1] if len(args) > 1 else kwargs.get("batch")
        self._batches += 1
        if self._batches > 1 and batch is not None and len(batch.image) == BATCH:
            self.seconds.append(elapsed)


class LossRecorder(Callback):
    """Every training loss, as a float."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float("nan"))


def method_args(method: str, precision: str, mvtec_root: Path, run_root: Path) -> list[str]:
    """The ``fsad`` arguments of ``method`` on bottle with random ViT-B-16-plus-240 weights in ``precision``."""
    overlay = CODE_PRECISION[method][1] if precision != "fp32" else None
    args = ["-c", str(REPO / f"configs/{method}/mvtec.yaml")]
    args += ["-c", str(REPO / overlay)] if overlay else []
    return args + [
        "--data.init_args.root", str(mvtec_root), "--data.init_args.category", "bottle",
        "--data.init_args.batch_size", str(BATCH), "--model.init_args.backbone.pretrained", "null",
        "--model.init_args.backbone.precision", precision, "--trainer.accelerator", ACCELERATOR, "--trainer.devices", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--run_root", str(run_root),
    ]  # fmt: skip


def bare_encode_seconds(module: LightningModule, image_size: int, repeats: int = 10) -> float:
    """Median seconds of the bare OpenCLIP ``encode_image`` on ``BATCH`` images, in the backbone's precision."""
    backbone = module.backbone
    images = torch.randn(BATCH, 3, image_size, image_size, device=DEVICE).to(backbone.dtype)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            backbone.clip.encode_image(images)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def gib(count: int) -> str:
    return f"{count / 2**30:.2f}GiB"


def check_test_step(method: str, precision: str, mvtec_root: Path, run_root: Path) -> None:
    from fsad.cli import FsadCLI

    cli = FsadCLI(args=method_args(method, precision, mvtec_root, run_root), run=False)
    timer = StepTimer()
    cli.trainer.callbacks.insert(0, timer)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # two passes over the 83 bottle test images: three full batches after the first
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    peak = torch.cuda.max_memory_allocated()
    step = statistics.median(timer.seconds)
    bare = bare_encode_seconds(cli.model, cli.model.backbone.image_size[0])
    print(
        f"gpu_check test_step {method} {precision} batch={BATCH} ratio={step / bare:.3f} "
        f"images/s={BATCH / step:.1f} bare_encode_images/s={BATCH / bare:.1f} peak_mem={gib(peak)}",
        flush=True,
    )


def check_fit(method: str, precision: str, mvtec_root: Path, run_root: Path, steps: int) -> None:
    from fsad.cli import FsadCLI

    args = [*method_args(method, precision, mvtec_root, run_root), "--trainer.max_steps", str(steps)]
    cli = FsadCLI(args=[*args, "--trainer.max_epochs", "-1"], run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finite = bool(recorder.losses) and all(math.isfinite(loss) for loss in recorder.losses)
    shown = " ".join(f"{loss:.4f}" for loss in recorder.losses)
    print(
        f"gpu_check fit {method} {precision} steps={len(recorder.losses)} finite={'yes' if finite else 'NO'} "
        f"losses=[{shown}] peak_mem={gib(torch.cuda.max_memory_allocated())}",
        flush=True,
    )


def gpu_memory_in_use() -> int:
    """Bytes of GPU memory held by compute processes on every GPU, as ``nvidia-smi`` reports them (0 without it)."""
    try:
        answer = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(int(line) for line in answer.stdout.split() if line.isdigit()) * 2**20


def ddp_metrics(devices: int, mvtec_root: Path, run_root: Path) -> tuple[dict[str, str], int]:
    """``fsad test`` of the memory bank on ``devices`` GPUs (a subprocess: DDP launches its own ranks): its metrics
    and the peak GPU memory of all its processes together (polled, CUDA contexts included)."""
    args = method_args("membank", "fp32", mvtec_root, run_root)
    args += ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
    run_root.mkdir(parents=True, exist_ok=True)
    log = run_root / "fsad_test.log"  # a file, not a pipe: nobody reads a pipe while the memory is polled
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "fsad", "test", *args], cwd=REPO, stdout=output,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        peak = 0
        while process.poll() is None:
            peak = max(peak, gpu_memory_in_use())
            time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f"fsad test on {devices} GPU(s) failed: {log.read_text().strip().splitlines()[-1:]}")
    (results,) = run_root.rglob("results.csv")
    with results.open() as handle:
        return next(csv.DictReader(handle)), peak


def check_ddp(mvtec_root: Path, work: Path) -> None:
    if torch.cuda.device_count() < 2:
        print("gpu_check ddp_test skipped: one GPU (the 2-process NCCL comparison needs two)", flush=True)
        return
    single, single_peak = ddp_metrics(1, mvtec_root, work / "ddp1")
    double, double_peak = ddp_metrics(2, mvtec_root, work / "ddp2")
    differing = [name for name in METRICS if single.get(name) != double.get(name)]
    shown = " ".join(f"{name}={single.get(name)}" for name in METRICS)
    verdict = "equal" if not differing else f"DIFFERENT in {', '.join(differing)}"
    print(
        f"gpu_check ddp_test membank nccl 2 processes vs 1: {verdict} ({shown}) "
        f"peak_mem_1proc={gib(single_peak)} peak_mem_2proc={gib(double_peak)} (nvidia-smi, contexts included)",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="the prepared GPU check (one line per figure)")
    parser.add_argument("--mvtec-root", type=Path, default=DEFAULT_MVTEC, help="MVTec-AD root holding bottle/")
    parser.add_argument("--steps", type=int, default=5, help="training steps of each fit check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check skipped: no CUDA GPU on this machine (run `make gpu-check` on a GPU node)")
        return 0
    if not (args.mvtec_root / "bottle").is_dir():
        print(f"gpu_check skipped: no MVTec-AD bottle images under {args.mvtec_root} (give --mvtec-root)")
        return 0
    count = torch.cuda.device_count()
    print(f"gpu_check device {torch.cuda.get_device_name(0)} x{count} torch {torch.__version__}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fsad-gpu-check-") as folder:
        work = Path(folder)
        for method, (code_precision, _) in CODE_PRECISION.items():
            for precision in dict.fromkeys(("fp32", code_precision)):
                check_test_step(method, precision, args.mvtec_root, work / f"{method}_{precision}")
        check_ddp(args.mvtec_root, work)
        check_fit("finegrainedad", "bf16", args.mvtec_root, work / "fit_finegrainedad", args.steps)
        check_fit("promptad", "fp16", args.mvtec_root, work / "fit_promptad", args.steps)
    print(f"gpu_check done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
