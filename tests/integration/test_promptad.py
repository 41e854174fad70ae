"""PromptAD end to end on fsad-tiny with random weights and the synthetic data, through the fsad CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fsad.cli import FsadCLI, main
from tests.integration.test_cli_and_membank import CollectOutputs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


@pytest.mark.parametrize("method", ["promptad", "finegrainedad"])
def test_fit_lowers_the_loss_and_checkpoint_reload_gives_identical_scores(tmp_path: Path, monkeypatch, method) -> None:
    """`fsad fit` then test: the loss falls, and scores after a checkpoint reload equal the trained model's."""
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    config = str(REPO / f"configs/{method}/synthetic_tiny.yaml")
    common = ["-c", config, "-c", str(REPO / "configs/logger/csv.yaml"), "--run_root", str(tmp_path / "runs")]
    assert main(["fit", *common, "--trainer.max_epochs", "6"]) == 0
    run_dir = tmp_path / f"runs/{method}/synthetic/disc/k2_s0"
    rows = list(csv.DictReader((run_dir / "logs/version_0/metrics.csv").open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]

    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert {"model.prompts.normal_context", "model.prompts.abnormal_context"} <= set(checkpoint["state_dict"])
    assert not any(key.startswith("backbone.") for key in checkpoint["state_dict"])
    assert_reload_scores_as_trained(common, run_dir / "checkpoints/last.ckpt")
    assert (run_dir / "results.csv").is_file()


def assert_reload_scores_as_trained(common: list[str], checkpoint: Path) -> FsadCLI:
    """Test a module given the checkpoint's weights in memory, then one restored by ``ckpt_path``: the scores and
    maps must be equal. Returns the restored run."""
    trained = FsadCLI(args=common, run=False)
    trained.model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"], strict=False)
    first = CollectOutputs()
    trained.trainer.callbacks.append(first)
    trained.trainer.test(trained.model, datamodule=trained.datamodule)
    reloaded = FsadCLI(args=common, run=False)
    second = CollectOutputs()
    reloaded.trainer.callbacks.append(second)
    reloaded.trainer.test(reloaded.model, datamodule=reloaded.datamodule, ckpt_path=checkpoint)
    assert torch.equal(torch.cat(first.scores), torch.cat(second.scores))
    assert torch.equal(torch.cat(first.maps), torch.cat(second.maps))
    return reloaded


def test_paper_mode_turns_on_the_quirks_and_bgr_matches_its_definition() -> None:
    from fsad.lightning_modules.components.clip import BackboneSpec
    from fsad.lightning_modules.promptad.module import PromptAD, swap_rgb_bgr

    tiny = BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4])
    tiny_code = BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[1, 3])
    code, paper = PromptAD(tiny_code, image_size=96, variant="code"), PromptAD(tiny, image_size=96)
    assert code.model.temperature_quirk and code.bgr_test_quirk and code.backbone.spec.authors_tap_hook
    assert code.model.cls_prompts is not None and code.model.cls_prompts.n_pro == 3
    assert not code.best_epoch_on_test and not code.max_fusion_quirk  # honest evaluation of the code variant
    assert not paper.model.temperature_quirk and not paper.bgr_test_quirk and paper.model.cls_prompts is None
    assert not PromptAD(tiny_code, image_size=96, variant="code", bgr_test_quirk=False).bgr_test_quirk
    protocol = PromptAD(tiny, image_size=96, protocol="paper")
    assert protocol.best_epoch_on_test and protocol.max_fusion_quirk and not protocol.bgr_test_quirk
    with pytest.raises(ValueError, match="model.variant"):
        PromptAD(tiny, image_size=96, variant="authors")
    # the authors' test loop: a cv2 (BGR) uint8 image normalised with the RGB mean/std, channel by position
    pixels = torch.randint(0, 256, (1, 3, 4, 4)).float() / 255
    mean, std = torch.tensor((0.5, 0.4, 0.3)).view(1, 3, 1, 1), torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    as_fed = (pixels[:, [2, 1, 0]] - mean) / std
    torch.testing.assert_close(swap_rgb_bgr((pixels - mean) / std, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), as_fed)


def test_paper_protocol_best_epoch_and_max_fusion(tmp_path: Path, monkeypatch) -> None:
    """protocol: paper records every epoch's test AUROCs and logs max(AUROC(harmonic), AUROC(mean)) like the authors."""
    import json

    import numpy as np
    from sklearn.metrics import roc_auc_score

    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    args = ["-c", str(REPO / "configs/promptad/synthetic_tiny.yaml"), "--run_root", str(tmp_path / "runs"),
            "--model.init_args.protocol", "paper", "--trainer.max_epochs", "3"]  # fmt: skip
    cli = FsadCLI(args=args, run=False)
    with pytest.warns(UserWarning, match="uses test labels"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    record = json.loads((tmp_path / "runs/promptad/synthetic/disc/k2_s0/paper_best_epoch.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2]
    assert record["best"] == max(record["epochs"], key=lambda e: e["image_AUROC"] + e["pixel_AUROC"])

    outputs = CollectOutputs()
    cli.trainer.callbacks.append(outputs)
    logged = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    visual, text = torch.cat(outputs.image_parts).double().numpy().T
    labels = torch.cat(outputs.labels).numpy()
    harmonic = 1 / (1 / visual + 1 / text)
    expected = max(roc_auc_score(labels, harmonic), roc_auc_score(labels, (visual + text) / 2))
    assert abs(logged["image_AUROC_paper_max_fusion"] - expected) < 1e-6
    assert np.isclose(logged["image_AUROC"], roc_auc_score(labels, harmonic), atol=1e-6)


def test_interrupted_fit_resumes_from_last(tmp_path: Path, monkeypatch) -> None:
    """`fsad fit ... --ckpt_path last` continues an interrupted run from its last checkpoint."""
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    common = ["-c", str(REPO / "configs/promptad/synthetic_tiny.yaml"), "--run_root", str(tmp_path / "runs")]
    assert main(["fit", *common, "--trainer.max_epochs", "2"]) == 0
    last = tmp_path / "runs/promptad/synthetic/disc/k2_s0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    resumed = FsadCLI(args=[*common, "--trainer.max_epochs", "4"], run=False)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert resumed.trainer.current_epoch == 4 and resumed.trainer.global_step == 4  # 2 restored + 2 new steps
    assert torch.load(last, weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("method", ["promptad", "finegrainedad"])
def test_variant_and_protocol_are_independent_config_keys(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--print_config` shows both axes, each settable on its own."""
    import yaml

    config = str(REPO / f"configs/{method}/mvtec.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, "--model.init_args.variant", "code", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["variant"] == "code" and printed["model"]["init_args"]["protocol"] == "honest"
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, "--model.init_args.protocol", "paper", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["variant"] == "paper" and printed["model"]["init_args"]["protocol"] == "paper"


@pytest.mark.parametrize("method", ["promptad", "finegrainedad"])
@pytest.mark.parametrize("dataset", ["mvtec", "visa", "realiad"])
def test_variant_and_protocol_overlays_compose_with_every_dataset_config(
    method: str, dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-c configs/variant/<method>_code.yaml` sets the code variant with its data chain and `-c
    configs/protocol/paper.yaml` the paper protocol, each alone or both, leaving every other key of the dataset config."""
    import yaml

    def printed(*overlays: str) -> dict:
        arguments = ["fit", "-c", str(REPO / f"configs/{method}/{dataset}.yaml")]
        for overlay in overlays:
            arguments += ["-c", str(REPO / f"configs/{overlay}.yaml")]
        with pytest.raises(SystemExit):
            main([*arguments, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    base = printed()
    variant, protocol, both = (
        printed(f"variant/{method}_code"),
        printed("protocol/paper"),
        printed(f"variant/{method}_code", "protocol/paper"),
    )
    axes = lambda c: (c["model"]["init_args"]["variant"], c["model"]["init_args"]["protocol"])  # noqa: E731
    chain = lambda c: (c["data"]["init_args"]["resize"], c["data"]["init_args"]["eval_size"])  # noqa: E731
    assert axes(base) == ("paper", "honest") and chain(base) == ("antialias", 256)
    assert axes(variant) == ("code", "honest") and chain(variant) == ("authors", 400)
    assert axes(protocol) == ("paper", "paper") and chain(protocol) == chain(base)
    assert axes(both) == ("code", "paper") and chain(both) == ("authors", 400)
    moved = {"model": ("variant", "protocol"), "data": ("resize", "eval_size")}

    def unmoved(config: dict) -> dict:
        kept = {section: dict(config[section]["init_args"]) for section in moved}
        for section, keys in moved.items():
            for key in keys:
                kept[section].pop(key)
        return {"trainer": config["trainer"], **kept}

    assert unmoved(both) == unmoved(base)  # every other key stays as the dataset config sets it


@pytest.mark.parametrize("method", ["promptad", "finegrainedad"])
def test_the_variant_overlay_builds_the_code_variant_without_the_data_mismatch_warning(
    method: str, tmp_path: Path, monkeypatch
) -> None:
    """Control first: the code variant on the default resize warns; through the overlay it does not."""
    import warnings

    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    taps = ["--model.init_args.backbone.taps", "[1, 3]"]  # the authors' tap hook needs a block after each tap
    config = ["-c", str(REPO / f"configs/{method}/synthetic_tiny.yaml"), "--run_root", str(tmp_path / "runs"), *taps]
    mismatched = FsadCLI(args=[*config, "--model.init_args.variant", "code"], run=False)
    mismatched.datamodule.setup("fit")
    with pytest.warns(UserWarning, match="data.resize is 'antialias'"):
        mismatched.model.warn_if_data_differs_from_variant(mismatched.datamodule)
    paired = FsadCLI(args=[*config, "-c", str(REPO / f"configs/variant/{method}_code.yaml")], run=False)
    assert paired.model.variant == "code" and paired.model.eval_size == 400
    assert paired.datamodule.resize == "authors" and paired.datamodule.eval_size == 400
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paired.model.warn_if_data_differs_from_variant(paired.datamodule)


@pytest.mark.parametrize(("method", "precision"), [("promptad", "fp16"), ("finegrainedad", "bf16")])
def test_low_precision_contexts_survive_the_checkpoint_round_trip(
    tmp_path: Path, monkeypatch, method: str, precision: str
) -> None:
    """The code variant at a low precision trains its contexts in that precision (``low_precision_prompts_quirk``):
    the checkpoint stores them so, and `fsad test --ckpt_path` restores them bit for bit and scores as the trained
    module does."""
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "cache"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    common = [
        "-c", str(REPO / f"configs/{method}/synthetic_tiny.yaml"), "-c", str(REPO / f"configs/variant/{method}_code.yaml"),
        "--model.init_args.backbone.taps", "[1, 3]", "--model.init_args.backbone.precision", precision,
        "--run_root", str(tmp_path / "runs"),
    ]  # fmt: skip
    assert main(["fit", *common, "--trainer.max_epochs", "2"]) == 0
    last = tmp_path / f"runs/{method}/synthetic/disc/k2_s0/checkpoints/last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state["model.prompts.normal_context"].dtype == dtype

    reloaded = assert_reload_scores_as_trained(common, last)
    restored = reloaded.model.model.prompts.normal_context
    assert restored.dtype == dtype and torch.equal(restored.detach().cpu(), state["model.prompts.normal_context"])
