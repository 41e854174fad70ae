"""WinCLIP's building blocks against hand-computed cases, and ``data.k_shot: 0`` (zero-shot) end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsad.cli import main
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.lightning_modules.winclip.model import (
    class_scores,
    covering_windows,
    harmonic_aggregation,
    prompt_ensemble,
    window_indices,
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "winclip" / "synthetic_tiny.yaml")


def test_windows_of_a_3x3_grid() -> None:
    assert window_indices((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_indices((15, 15), 2).shape == (196, 4) and window_indices((15, 15), 3).shape == (169, 9)
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((2, 2), 3)


def test_harmonic_aggregation_by_hand() -> None:
    """3×3 grid, four 2×2 windows scored 1, 3/4, 1/2, 1/4: patch 1 is covered by windows 0 and 1, so its score is
    2 / (1/1 + 4/3) = 6/7; the centre patch by all four: 4 / (1 + 4/3 + 2 + 4) = 12/25."""
    covering = covering_windows(window_indices((3, 3), 2), 9)
    maps = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), covering)
    expected = [1.0, 6 / 7, 0.75, 2 / 3, 12 / 25, 0.375, 0.5, 1 / 3, 0.25]
    assert torch.allclose(maps[0], torch.tensor(expected), atol=1e-6)


def test_a_zero_window_score_zeroes_only_the_patches_it_covers() -> None:
    covering = covering_windows(window_indices((3, 3), 2), 9)
    maps = harmonic_aggregation(torch.tensor([[0.0, 0.75, 0.5, 0.25]]), covering)
    assert maps[0, [0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(maps[0, [2, 8]], torch.tensor([0.75, 0.25])) and not maps.isnan().any()


def test_class_score_is_equation_1() -> None:
    """softmax(cos/τ)[anomalous]: an embedding at 60° from the normal and 0° from the anomalous text."""
    text = torch.tensor([[1.0, 0.0], [0.5, 3**0.5 / 2]])
    image = torch.tensor([[1.0, 3**0.5]])  # parallel to the anomalous text
    expected = 1 / (1 + torch.exp(torch.tensor((0.5 - 1.0) / 0.07)))
    assert torch.allclose(class_scores(image, text, 0.07), expected.reshape(1), atol=1e-6)


def test_prompt_ensemble_is_states_times_templates() -> None:
    normal, anomalous = prompt_ensemble("metal nut")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert (
        normal[0] == "a cropped photo of the metal nut."
        and anomalous[21] == "a cropped photo of the metal nut with flaw."
    )


def test_zero_shot_datamodule_has_no_support(tmp_path: Path) -> None:
    data = SyntheticDataModule(category="disc", k_shot=0, image_size=96, eval_size=64)
    data.setup()
    assert data.support_samples == [] and data.test_samples


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_winclip_zero_and_few_shot_through_the_cli(tmp_path: Path) -> None:
    """k = 0 runs with a support.txt that says so; k = 2 (WinCLIP+) finds the synthetic defects (pixel AUROC, sklearn)."""
    runs = tmp_path / "runs"
    assert main(["test", "-c", TINY, "--run_root", str(runs)]) == 0
    zero_run = runs / "winclip" / "synthetic" / "disc" / "k0_s0"
    assert (zero_run / "support.txt").read_text() == "# zero-shot (data.k_shot: 0): no support images\n"
    assert (zero_run / "results.csv").is_file()
    args = ["test", "-c", TINY, "--run_root", str(runs),
            "--data.init_args.k_shot", "2", "--model.init_args.gaussian_sigma", "0"]  # fmt: skip
    assert main(args) == 0
    few_run = runs / "winclip" / "synthetic" / "disc" / "k2_s0"
    assert len((few_run / "support.txt").read_text().splitlines()) == 2
    row = (few_run / "results.csv").read_text().splitlines()
    header, values = row[0].split(","), row[1].split(",")
    assert float(values[header.index("pixel_AUROC")]) > 0.9


@pytest.mark.filterwarnings("ignore:backbone.pretrained is null")
def test_methods_that_need_shots_refuse_k_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["test", "-c", str(REPO / "configs" / "promptad" / "synthetic_tiny.yaml"), "--run_root", str(tmp_path),
             "--data.init_args.k_shot", "0"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: data.k_shot: 0 (zero-shot) but promptad needs at least one support image; set data.k_shot >= 1, "
        "or use a zero-shot method (winclip)"
    )


def test_a_sweep_with_shots_zero_is_refused_for_a_method_that_needs_shots(tmp_path: Path, capsys) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(f"method_config: [{REPO / 'configs' / 'demo.yaml'}]\nshots: [0, 1]\noutput: {tmp_path / 'out'}\n")
    assert main(["benchmark", "-c", str(config), "--list-cells"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: shots: 0 (zero-shot) but membank needs at least one support image; drop 0 from `shots:`"
