"""Every CLI error is one ``error:`` line (exit 2 for usage, 1 for the rest), and no error path ever shows torch's
advice to load a checkpoint with ``weights_only=False`` (issues #25 point 4 and #29 point 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsad.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo.yaml")
KAG_TINY = str(REPO / "configs/kagprompt/synthetic_tiny.yaml")
OUR_SENTENCE = "fsad never loads checkpoints with weights_only=False"

pytestmark = pytest.mark.filterwarnings("ignore")


def demo(tmp_path: Path, *extra: str, subcommand: str = "test") -> list[str]:
    return [subcommand, "-c", DEMO, "--run_root", str(tmp_path / "runs"),
            "--data.init_args.root", str(tmp_path / "synthetic"), *extra]  # fmt: skip


def the_error_line(stderr: str) -> str:
    """The one ``error:`` line of ``stderr``; no usage text, no traceback, no second error."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr[-3000:]
    return errors[0]


def assert_no_unsafe_advice(output: str) -> None:
    """Neither torch's advice ("Re-running `torch.load` with `weights_only` set to `False`") nor any other
    suggestion of ``weights_only=False`` than our own refusal."""
    rest = output.replace(OUR_SENTENCE, "")
    assert "weights_only=False" not in rest and "set to `False`" not in rest and "weights_only` set" not in rest, rest


def fsad_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fsad", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


# ----------------------------------------------------------------------------------------------- #25 point 4
def test_a_wrong_type_is_one_line_naming_the_field_with_exit_2_in_a_real_process(tmp_path: Path) -> None:
    done = fsad_subprocess(*demo(tmp_path, "--data.init_args.k_shot", "four"))
    assert done.returncode == 2
    line = the_error_line(done.stderr)
    assert line.startswith("error: data.init_args.k_shot:") and "four" in line, line


def test_batch_size_0_is_one_line_with_exit_1_in_a_real_process(tmp_path: Path) -> None:
    done = fsad_subprocess(*demo(tmp_path, "--data.init_args.batch_size", "0"))
    assert done.returncode == 1
    assert the_error_line(done.stderr) == "error: data.batch_size must be a positive number of images per batch, got 0"


@pytest.mark.parametrize(
    ("case", "expected_code", "expected"),
    [
        ("corrupt_yaml", 2, "-c {tmp}/broken.yaml: not valid YAML at line 2"),
        ("unknown_key", 2, "--trainer.max_epochz"),
        (
            "unknown_key_in_second_file",
            2,
            "error: -c {tmp}/second.yaml: Subcommand 'test' does not accept option 'trainer.max_epochz'",
        ),
        (
            "unknown_model_key_in_third_file",
            2,
            "error: -c {tmp}/third.yaml: model.init_args: Option 'gaussian_sigmaz' is not accepted",
        ),
        ("missing_config_file", 2, "-c {tmp}/missing.yaml: no such config file"),
        ("missing_root", 1, "data.root is required for MVTecDataModule"),
    ],
)
def test_config_and_command_line_mistakes_are_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str, expected_code: int, expected: str
) -> None:
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n  foo: : bar\n")
    (tmp_path / "second.yaml").write_text("trainer:\n  max_epochz: 3\n")
    (tmp_path / "valid.yaml").write_text("model:\n  init_args:\n    gaussian_sigma: 3\n")
    (tmp_path / "third.yaml").write_text("model:\n  gaussian_sigmaz: 3\n")  # init_args left out, as jsonargparse allows
    args = {
        "corrupt_yaml": demo(tmp_path, "-c", str(tmp_path / "broken.yaml")),
        "unknown_key": demo(tmp_path, "--trainer.max_epochz", "3"),
        "unknown_key_in_second_file": demo(tmp_path, "-c", str(tmp_path / "second.yaml")),
        "unknown_model_key_in_third_file": demo(tmp_path, "-c", str(tmp_path / "valid.yaml"),
                                                "-c", str(tmp_path / "third.yaml")),
        "missing_config_file": demo(tmp_path, "-c", str(tmp_path / "missing.yaml")),
        "missing_root": ["test", "-c", str(REPO / "configs/membank/mvtec.yaml"), "--run_root", str(tmp_path / "runs"),
                         "--model.init_args.backbone.arch", "fsad-tiny", "--model.init_args.backbone.pretrained", "null",
                         "--model.init_args.backbone.taps", "[2, 4]"],
    }[case]  # fmt: skip
    assert main(args) == expected_code
    line = the_error_line(capfd.readouterr().err)
    assert expected.replace("{tmp}", str(tmp_path)) in line, line


def test_extension_commands_usage_errors_are_one_line_with_exit_2(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["captions", "frobnicate"]) == 2
    assert "fsad captions: argument action: invalid choice: 'frobnicate'" in the_error_line(capfd.readouterr().err)
    assert main(["export", "-c", DEMO]) == 2  # --out is required
    assert "the following arguments are required: --out" in the_error_line(capfd.readouterr().err)


# ----------------------------------------------------------------------------------------------- #29 point 4
CORRUPT = {
    "truncated zip": b"PK\x03\x04truncated",
    "garbage": b"\x80\x02garbage that is no pickle",
}


def malicious_checkpoint(path: Path) -> Path:
    """A pickle holding an object outside torch's safe list, which only weights_only=False would unpickle."""
    import torch

    torch.save({"state_dict": {}, "payload": Path("anything")}, path)
    return path


@pytest.fixture
def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, content in CORRUPT.items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.ckpt"
        files[name].write_bytes(content)
    files["foreign pickle"] = malicious_checkpoint(tmp_path / "foreign.ckpt")
    return files


def test_ckpt_path_last_resolved_by_lightning_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bad_checkpoints: dict[str, Path]
) -> None:
    last = tmp_path / "runs/membank/synthetic/disc/k4_s0/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    for bad in bad_checkpoints.values():
        last.write_bytes(bad.read_bytes())
        assert main(demo(tmp_path, "--ckpt_path", "last")) == 1
        output = capfd.readouterr()
        line = the_error_line(output.err)
        assert line == f"error: --ckpt_path: {last} is not a readable fsad checkpoint (corrupt, truncated, or not " \
                       f"created by fsad); {OUR_SENTENCE}"  # fmt: skip
        assert_no_unsafe_advice(output.out + output.err)


def test_export_inferencer_and_ckpt_path_refuse_bad_files_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bad_checkpoints: dict[str, Path]
) -> None:
    from fsad import Inferencer
    from fsad.errors import FsadError

    for bad in bad_checkpoints.values():
        for command in (demo(tmp_path, "--ckpt_path", str(bad)),
                        ["export", "-c", DEMO, "--ckpt_path", str(bad), "--out", str(tmp_path / "model")]):  # fmt: skip
            assert main(command) == 1
            output = capfd.readouterr()
            assert str(bad) in the_error_line(output.err) and OUR_SENTENCE in output.err
            assert_no_unsafe_advice(output.out + output.err)
        with pytest.raises(FsadError) as raised:
            Inferencer.from_checkpoint(bad, support=str(tmp_path))
        assert str(bad) in str(raised.value) and OUR_SENTENCE in str(raised.value)
        assert_no_unsafe_advice(str(raised.value))
    assert not (tmp_path / "model").exists()


def test_the_inferencers_own_refusals_are_the_one_checkpoint_error(tmp_path: Path) -> None:
    """A checkpoint that reads but lacks what the Inferencer needs raises the same class as an unreadable one, so one
    ``except CheckpointError`` catches both."""
    import torch

    from fsad import Inferencer
    from fsad.errors import CheckpointError

    no_model_class, other_resize = tmp_path / "no_model_class.ckpt", tmp_path / "other_resize.ckpt"
    torch.save({"state_dict": {}}, no_model_class)
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {"resize": "authors"}}, other_resize)
    with pytest.raises(CheckpointError, match=r"names no model class \(model_class\)"):
        Inferencer.from_checkpoint(no_model_class, support=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"data.resize: 'authors' is not supported by the inferencer"):
        Inferencer.from_checkpoint(other_resize, support=str(tmp_path))


def test_a_kag_sweeps_bad_pretrained_checkpoint_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bad_checkpoints: dict[str, Path]
) -> None:
    bad = bad_checkpoints["foreign pickle"]
    config = tmp_path / "sweep.yaml"
    config.write_text(f"method_config: [{KAG_TINY}]\ncategories: [disc]\nshots: [1]\nseeds: [0]\n"
                      f"output: {tmp_path / 'out'}\npretrained_checkpoint: {bad}\n")  # fmt: skip
    assert main(["benchmark", "-c", str(config)]) == 1
    output = capfd.readouterr()
    assert the_error_line(output.err).startswith(f"error: pretrained_checkpoint: {bad} is not a readable fsad")
    assert_no_unsafe_advice(output.out + output.err)


def test_a_backbone_checkpoint_that_is_an_html_page_says_the_download_failed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "open_clip_pytorch_model.bin"
    page.write_text("<!DOCTYPE html>\n<html><body>Access denied</body></html>\n")
    assert main(demo(tmp_path, "--model.init_args.backbone.checkpoint", str(page))) == 1
    output = capfd.readouterr()
    line = the_error_line(output.err)
    assert line.startswith(f"error: backbone.checkpoint: {page} is not a PyTorch checkpoint (did a download fail?)")
    assert_no_unsafe_advice(output.out + output.err)


# ----------------------------------------------------------------------------------------------- #29 point 5
RECORD_WITH_LEVEL = """fine_grained_normal_prompts_v3 = [
    {{"Level_1": {level_1}, "Level_2": {level_2}, "caption": "A disc."}},
]
total_classes2id = {{"disc": 0}}
"""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(256)) * 4, "not Python source (a binary file"),
        (b"records = 1\x00\n", "not Python source (a binary file"),
        (RECORD_WITH_LEVEL.format(level_1='"a grey disc"', level_2="[]").encode(),
         "fine_grained_normal_prompts_v3[0] (disc): Level_1: expected a list holding one dict, got str"),
        (RECORD_WITH_LEVEL.format(level_1='[{"foreground": "disc"}]', level_2='[{"entity": "disc"}]').encode(),
         "fine_grained_normal_prompts_v3[0] (disc): Level_2.entity: expected a list, got str"),
    ],
)  # fmt: skip
def test_captions_import_of_a_bad_file_is_one_line_naming_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    source = tmp_path / "fine_grained_prompts.py"
    source.write_bytes(content)
    assert main(["captions", "import", "--from", str(source), "--out", str(tmp_path / "out")]) == 1
    output = capfd.readouterr()
    printed = [line for line in (output.out + output.err).splitlines() if line.strip()]
    assert printed == [printed[0]] and printed[0].startswith(f"error: {source}: ") and expected in printed[0], printed
    assert not (tmp_path / "out").exists()


def test_a_benchmark_over_all_categories_of_a_missing_root_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sweep.yaml"
    mvtec = REPO / "configs/membank/mvtec.yaml"
    config.write_text(f"method_config: [{mvtec}]\nroot: {tmp_path / 'missing'}\ncategories: all\nshots: [1]\n"
                      f"seeds: [0]\noutput: {tmp_path / 'out'}\n")  # fmt: skip
    assert main(["benchmark", "-c", str(config)]) == 1
    line = the_error_line(capfd.readouterr().err)
    assert (
        line
        == f"error: root: dataset root {tmp_path / 'missing'} does not exist (categories: all lists the ones there)"
    )


def test_a_realiad_entry_without_image_path_names_the_file_and_entry(tmp_path: Path) -> None:
    import json

    from fsad.datamodules.realiad import RealIADDataModule
    from fsad.datamodules.transforms import DataError
    from tests.fixtures.trees import make_realiad

    root = make_realiad(tmp_path / "realiad")
    split_file = next(root.rglob("realiad_jsons/audiojack.json"))
    content = json.loads(split_file.read_text())
    del content["test"][3]["image_path"]
    split_file.write_text(json.dumps(content))
    data = RealIADDataModule(root=str(root), category="audiojack", k_shot=2, resolution=256, image_size=32)
    with pytest.raises(DataError) as raised:
        data.setup()
    assert str(raised.value) == f"{split_file}: test[3] has no image_path (a text field)"
