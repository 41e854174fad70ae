"""The built wheel installs everything under ``fsad.*`` and works beside a user's own ``callbacks.py``."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_only_the_fsad_namespace(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("fsad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {entry for entry in top_level if not entry.endswith(".dist-info")} == {"fsad"}
    for expected in (
        "fsad/callbacks/metrics.py",
        "fsad/datamodules/mvtec.py",
        "fsad/lightning_modules/finegrainedad/module.py",
        "fsad/lightning_modules/components/model_configs/fsad-tiny.json",
        "fsad/lightning_modules/finegrainedad/captions/mvtec/bottle.json",
    ):
        assert expected in names

    # A fresh venv holds only the wheel; its dependencies are borrowed from the development environment through a
    # plain path entry (no .pth of that environment runs, so its editable install of fsad stays invisible).
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (fresh_site / "borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    notebook = tmp_path / "notebook"
    notebook.mkdir()
    (notebook / "callbacks.py").write_text("USER_MODULE = True\n")
    (notebook / "datamodules.py").write_text("USER_MODULE = True\n")
    probe = (
        "import callbacks, datamodules, fsad\n"
        "from fsad.callbacks.metrics import AnomalyMetrics\n"
        "from fsad.datamodules.mvtec import MVTecDataModule\n"
        "from fsad.lightning_modules.components.clip import BackboneSpec, ClipBackbone\n"
        "assert callbacks.USER_MODULE and datamodules.USER_MODULE\n"
        "print(fsad.__file__)\n"
        "ClipBackbone(BackboneSpec(arch='fsad-tiny', pretrained=None, taps=[1, 2]))\n"
    )
    result = subprocess.run(
        [str(python), "-W", "ignore", "-c", probe], cwd=notebook, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(env_dir)
