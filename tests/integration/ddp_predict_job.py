"""A test job run as a script: memory-bank predict on a nested folder tree, on 1 process or 2 gloo DDP processes.

``python ddp_predict_job.py <devices> <out_dir> <tree> <normal_dir>``; Lightning's ``ddp`` strategy re-launches it
for rank 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from fsad.callbacks.predictions import PredictionWriter
from fsad.datamodules.predict import PredictFolderDataModule
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.membank.module import MemoryBankAD


def main(devices: int, out_dir: Path, tree: str, normal_dir: str) -> None:
    seed_everything(0)
    data = PredictFolderDataModule(
        path=tree, normal_dir=normal_dir, category="disc", k_shot=4, image_size=96, eval_size=64, batch_size=4
    )
    model = MemoryBankAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), 96, 64, gaussian_sigma=1.0)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, callbacks=[PredictionWriter(overlays=False)], default_root_dir=str(out_dir),
    )  # fmt: skip
    trainer.predict(model, datamodule=data, return_predictions=False)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
