"""Proxy-aware reachability (a real proxy on 127.0.0.1), fsad --help listing every subcommand, honest exit codes."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from fsad.errors import FsadError
from fsad.network import host_reachable, hub_reachable, wandb_reachable
from fsad.signals import SignalGuard, run_guarded


class TinyProxy(socketserver.ThreadingTCPServer):
    """Answers CONNECT with 200 for ``allowed`` targets and 403 otherwise, recording every request line."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, allowed: set[str]) -> None:
        self.allowed, self.requests = allowed, []

        class Handler(socketserver.StreamRequestHandler):
            def handle(handler) -> None:
                line = handler.rfile.readline().decode().strip()
                while handler.rfile.readline().strip():
                    pass  # the headers
                self.requests.append(line)
                method, target, _ = line.split(" ", 2)
                ok = method == "CONNECT" and target in self.allowed
                handler.wfile.write(
                    b"HTTP/1.1 200 Connection established\r\n\r\n" if ok else b"HTTP/1.1 403 No\r\n\r\n"
                )

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[TinyProxy]:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    server = TinyProxy({"huggingface.co:443", "api.wandb.ai:443"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_host_behind_the_proxy_is_reachable_and_a_refused_one_is_not(
    proxy: TinyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    assert host_reachable("https://huggingface.co", timeout=2)
    assert not host_reachable("https://elsewhere.example:443", timeout=2)
    assert proxy.requests == ["CONNECT huggingface.co:443 HTTP/1.1", "CONNECT elsewhere.example:443 HTTP/1.1"]


def test_no_proxy_hosts_are_probed_directly(proxy: TinyProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        assert host_reachable(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=2)
        assert proxy.requests == []
    finally:
        listener.close()


def test_hf_hub_offline_and_wandb_mode_win_without_any_probe(proxy: TinyProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not hub_reachable(timeout=2) and not wandb_reachable(timeout=2)
    assert proxy.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert hub_reachable(timeout=2) and wandb_reachable(timeout=2)  # only the proxy is reachable, and it is enough
    assert proxy.requests == ["CONNECT huggingface.co:443 HTTP/1.1", "CONNECT api.wandb.ai:443 HTTP/1.1"]


def test_help_lists_every_subcommand_and_validate_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    from fsad.cli import main

    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    assert shown.value.code == 0
    listed = capsys.readouterr().out
    flowing = " ".join(listed.split())  # argparse wraps the help column
    from fsad.cli import EXTENSION_COMMANDS, EXTENSION_HELP

    assert set(EXTENSION_COMMANDS) == set(EXTENSION_HELP)  # a new command comes with its line
    for name in ("fit", "test", "predict", "data", "captions", "benchmark", "export", "slurm", *EXTENSION_COMMANDS):
        assert f"    {name} " in listed, name
        assert f": fsad {name} " in flowing, name  # what it does, then its usage
    # each entry ends with its usage; none is a docstring cut mid-sentence (Lightning's "never run on your")
    assert "never run on your" not in flowing and "Useful to" not in flowing
    assert "fsad data check --dataset mvtec|visa|realiad|folder --root <dir>" in flowing  # the form data_check parses
    assert "fsad data check -c" not in flowing
    assert "0 done, 1 an error you can fix" in flowing and "2 a command-line usage error" in flowing
    assert "    validate " not in listed
    assert main(["validate", "-c", "configs/demo.yaml"]) == 2
    assert "invalid choice: 'validate'" in capsys.readouterr().err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_outside_the_trainer_ends_with_its_code_and_one_line(
    capsys: pytest.CaptureFixture[str], signum: int, code: int
) -> None:
    def command() -> int:
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the command")

    previous = signal.getsignal(signum)
    assert run_guarded(command, SignalGuard(resume_hint="rerun it")) == code
    assert signal.getsignal(signum) == previous  # handlers restored
    assert (
        capsys.readouterr().err.strip()
        == f"interrupted by {signal.Signals(signum).name}: nothing new saved; to resume, rerun it"
    )


def test_a_user_error_is_one_line_and_a_bug_still_raises(capsys: pytest.CaptureFixture[str]) -> None:
    def mistake() -> int:
        raise ValueError("wrapped") from FsadError("data.root: /nowhere does not exist")

    assert run_guarded(mistake) == 1
    assert capsys.readouterr().err == "error: data.root: /nowhere does not exist\n"
    with pytest.raises(ZeroDivisionError):
        run_guarded(lambda: 1 // 0)
