"""A test job run as a script: memory-bank test on 19 synthetic images, on 1 process or 2 gloo DDP processes.

Lightning's ``ddp`` strategy re-launches this script for rank 1, so it must run standalone:
``python ddp_job.py <devices> <out_dir> <data_root>``. Each rank writes the dataset indices it was given; rank 0
writes the metrics that every rank logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch import Callback, Trainer, seed_everything

from fsad.callbacks.heatmaps import HeatmapLogger
from fsad.callbacks.metrics import AnomalyMetrics
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.membank.module import MemoryBankAD


class OddSizedSynthetic(SyntheticDataModule):
    """The synthetic test split minus one image: 19 images, so a 2-rank sampler must pad with a duplicate."""

    def collect_samples(self, split: str):
        samples = super().collect_samples(split)
        return samples[:-1] if split == "test" else samples


class RecordIndices(Callback):
    def __init__(self) -> None:
        self.indices: list[int] = []
        self.logged: dict[str, float] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.indices += batch.index.tolist()

    def on_test_end(self, trainer, pl_module) -> None:
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}


def main(devices: int, out_dir: Path, data_root: str) -> None:
    seed_everything(0)
    data = OddSizedSynthetic(root=data_root, category="disc", k_shot=4, image_size=96, eval_size=64, batch_size=4)
    model = MemoryBankAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), 96, 64, gaussian_sigma=1.0)
    metrics, recorder = AnomalyMetrics(aupro=True), RecordIndices()
    binned = AnomalyMetrics(pixel_mode="histogram", f1=False)  # histograms summed across ranks
    heatmaps = HeatmapLogger(num_images=6, seed=0)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, callbacks=[metrics, binned, heatmaps, recorder], default_root_dir=str(out_dir),
    )  # fmt: skip
    trainer.test(model, datamodule=data)
    rank = trainer.global_rank
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "indices": recorder.indices,
                "results": metrics.results,
                "binned": binned.results,
                "logged": recorder.logged,
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
