"""The thin slice end to end: CLI, run directory, synthetic data, memory-bank method, one pass per image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from sklearn.metrics import average_precision_score, roc_auc_score

from fsad.cli import FsadCLI, main
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.errors import UsageError
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.membank.module import MemoryBankAD

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")


class CollectOutputs(Callback):
    """Keeps every test batch's maps, masks, scores and labels for an independent sklearn check, and the image-score
    parts (max M_v, text score) of models that record them for the paper protocol."""

    def __init__(self) -> None:
        self.maps, self.masks, self.scores, self.labels, self.image_parts = [], [], [], [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.maps.append(outputs.anomaly_map.flatten())
        self.masks.append(outputs.gt_mask.flatten())
        self.scores.append(outputs.pred_score)
        self.labels.append(outputs.gt_label)
        parts = getattr(getattr(pl_module, "model", None), "last_image_parts", None)
        if parts is not None:
            self.image_parts.append(parts.clone())


def run_membank(tmp_path: Path, category: str = "disc", seed: int = 0) -> tuple[CollectOutputs, MemoryBankAD]:
    seed_everything(seed)  # as the CLI does: the random tiny backbone is then the same in every run
    data = SyntheticDataModule(
        root=str(tmp_path / "synthetic"), category=category, k_shot=4, seed=seed, image_size=96, eval_size=128
    )
    model = MemoryBankAD(
        backbone=BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]),
        image_size=96,
        eval_size=128,
        gaussian_sigma=2.0,
    )
    collector = CollectOutputs()
    trainer = Trainer(
        accelerator="cpu", logger=False, callbacks=[collector], enable_progress_bar=False,
        default_root_dir=str(tmp_path / "run"),
    )  # fmt: skip
    trainer.test(model, datamodule=data)
    return collector, model


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_membank_on_synthetic_data_reaches_pixel_auroc(tmp_path: Path) -> None:
    """The defects are obvious: a pixel AUROC below 0.9 would mean misaligned maps, even with random weights."""
    for category in ("disc", "tile"):
        out, _ = run_membank(tmp_path, category)
        pixel = roc_auc_score(torch.cat(out.masks).numpy(), torch.cat(out.maps).numpy())
        image = roc_auc_score(torch.cat(out.labels).numpy(), torch.cat(out.scores).numpy())
        assert pixel >= 0.9, (category, pixel)
        assert image >= 0.9, (category, image)
        maps = torch.cat(out.maps)
        assert maps.dtype == torch.float32 and 0.0 <= maps.min() and maps.max() <= 1.0


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_one_backbone_pass_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsad.lightning_modules.components.clip import ClipBackbone

    images_seen = []
    original = ClipBackbone.forward

    def counting_forward(self, images):
        images_seen.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(ClipBackbone, "forward", counting_forward)
    out, _ = run_membank(tmp_path)
    n_test = sum(len(s) for s in out.scores)
    assert sum(images_seen) == 4 + n_test  # the k=4 support images once, then each test image once


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_same_seed_same_numbers_and_support_file(tmp_path: Path) -> None:
    first, _ = run_membank(tmp_path / "a", seed=3)
    second, _ = run_membank(tmp_path / "b", seed=3)
    assert torch.equal(torch.cat(first.maps), torch.cat(second.maps))
    assert (tmp_path / "a" / "run" / "support.txt").read_text().splitlines() == [
        line.replace(str(tmp_path / "b"), str(tmp_path / "a"))
        for line in (tmp_path / "b" / "run" / "support.txt").read_text().splitlines()
    ]


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        FsadCLI(args=["test", "-c", DEMO, "--data.init_args.k_shot", "2", "--print_config"])
    first = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    with pytest.raises(SystemExit):
        FsadCLI(args=["test", "-c", str(printed), "--print_config"])
    second = capsys.readouterr().out
    assert "k_shot: 2" in first and "fsad-tiny" in first
    assert second == first


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_cli_writes_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    args = ["test", "-c", DEMO, "--run_root", str(tmp_path / "runs"), "--data.init_args.seed", "5"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "membank" / "synthetic" / "disc" / "k4_s5"
    config = (run_dir / "config.yaml").read_text()
    assert "seed_everything: 5" in config and "image_size: 96" in config
    support = (run_dir / "support.txt").read_text().splitlines()
    assert len(support) == 4 and all(Path(p).is_file() for p in support)


def test_linked_image_size_cannot_disagree(tmp_path: Path) -> None:
    """data.image_size drives the model; setting the model's copy by hand is refused by the parser."""
    with pytest.raises(UsageError):
        FsadCLI(args=["test", "-c", DEMO, "--model.init_args.image_size", "64"], run=False)


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_real_bottle_four_shot_end_to_end_matches_sklearn(tmp_path: Path, mvtec_root: Path) -> None:
    """Real MVTec bottle, 4-shot, fsad-tiny: support.txt written, AUROCs and APs equal sklearn's on the same maps."""
    from fsad.callbacks.metrics import AnomalyMetrics
    from fsad.callbacks.results import ResultsWriter
    from fsad.datamodules.mvtec import MVTecDataModule

    seed_everything(0)
    data = MVTecDataModule(root=str(mvtec_root), category="bottle", k_shot=4, seed=0, image_size=96, eval_size=128)
    model = MemoryBankAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), 96, 128, gaussian_sigma=2.0)
    collector, metrics = CollectOutputs(), AnomalyMetrics(aupro=False)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
        callbacks=[metrics, ResultsWriter(print_table=False), collector],
    )  # fmt: skip
    trainer.test(model, datamodule=data)
    labels = torch.cat(collector.labels).numpy()
    masks = torch.cat(collector.masks).numpy()
    assert len(labels) == 83 and labels.sum() == 63
    assert abs(metrics.results["image_AUROC"] - roc_auc_score(labels, torch.cat(collector.scores).numpy())) < 1e-9
    assert abs(metrics.results["pixel_AUROC"] - roc_auc_score(masks, torch.cat(collector.maps).numpy())) < 1e-9
    image_ap = average_precision_score(labels, torch.cat(collector.scores).numpy())
    assert abs(metrics.results["image_AP"] - image_ap) < 1e-9
    pixel_ap = average_precision_score(masks.ravel(), torch.cat(collector.maps).numpy().ravel())
    assert abs(metrics.results["pixel_AP"] - pixel_ap) < 1e-9
    support = (tmp_path / "support.txt").read_text().splitlines()
    assert len(support) == 4 and all("bottle/train/good/" in p for p in support)
    assert f"{metrics.results['pixel_AUROC']}"[:6] in (tmp_path / "results.csv").read_text()


def test_cli_reports_bad_data_as_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
    args = ["test", "-c", DEMO, "--model", "MemoryBankAD", "--data", "MVTecDataModule", "--data.init_args.root", str(tmp_path),
            "--data.init_args.category", "bottle", "--run_root", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: data.category: 'bottle' not found under {tmp_path}; categories found: ['widget']"
    assert not any("Traceback" in line for line in err)


def test_cli_reports_missing_weights_as_one_error_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """The backbone error raised inside jsonargparse's instantiation still reaches the user as one line."""
    import fsad.lightning_modules.components.clip as clip_module

    monkeypatch.setattr(clip_module, "hub_reachable", lambda timeout=3.0: False)
    config = str(REPO / "configs" / "membank" / "mvtec.yaml")
    args = ["test", "-c", config, "--data.init_args.root", str(tmp_path), "--model.init_args.backbone.cache_dir",
            str(tmp_path / "hub"), "--run_root", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: No weights available for backbone 'ViT-B-16-plus-240' / 'laion400m_e32'")
    assert "model.init_args.backbone.checkpoint" in err[-1] and not any("Traceback" in line for line in err)
