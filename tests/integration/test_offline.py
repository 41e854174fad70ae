"""Offline means offline: a demo run behind a recording proxy on 127.0.0.1 makes no outbound request (issue #29)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.unit.test_network_and_cli import TinyProxy

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_an_offline_demo_run_with_wandb_offline_makes_no_request_through_the_proxy(tmp_path: Path) -> None:
    """Every client library (albumentations' version check, huggingface_hub, wandb, urllib, requests) honours
    these proxy variables, so any phone-home would reach the proxy and be recorded there."""
    proxy = TinyProxy(allowed=set())
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        env = {name: value for name, value in os.environ.items()
               if name.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "no_albumentations_update")}  # fmt: skip
        env.update({"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "ALL_PROXY": proxy.url,
                    "http_proxy": proxy.url, "https_proxy": proxy.url, "all_proxy": proxy.url,
                    "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                    "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "OMP_NUM_THREADS": "1"})  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "fsad", "test", "-c", "configs/demo.yaml", "-c", "configs/logger/wandb.yaml",
             "--run_root", str(tmp_path / "runs"), "--data.init_args.root", str(tmp_path / "synthetic")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert any((tmp_path / "runs").rglob("wandb/offline-run-*")), "the W&B logger did not run offline"
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.requests == [], (proxy.requests, done.stderr[-2000:])
    assert "Error fetching version info" not in done.stderr
