"""Reachability probes for the W&B fallback and the backbone's offline check, honouring the user's settings.

A raw TCP connect says nothing behind a factory proxy, where only the proxy is reachable: with ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``ALL_PROXY`` set (and the host not matched by ``NO_PROXY``) the probe asks the proxy to
``CONNECT`` to the host, as ``huggingface_hub`` and ``wandb`` would, and counts a 2xx answer as reachable.
``HF_HUB_OFFLINE`` makes the hub unreachable without a probe, and ``WANDB_MODE=offline|dryrun|disabled`` the same
for W&B.
"""

from __future__ import annotations

import base64
import os
import socket
import urllib.request
from urllib.parse import unquote, urlparse

TRUE_VALUES = ("1", "true", "yes", "on")


def proxy_for(url: str) -> str | None:
    """The proxy URL the environment names for ``url`` (``None`` for a direct connection)."""
    parsed = urlparse(url)
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass_environment(parsed.hostname or "", proxies):
        return None
    return proxies.get(parsed.scheme) or proxies.get("all")


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host can be reached within ``timeout`` seconds: directly, or through the proxy in the env."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = proxy_for(url)
    try:
        if proxy is None:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            return True
        return _connect_through_proxy(proxy, f"{parsed.hostname}:{port}", timeout)
    except OSError:
        return False


def _connect_through_proxy(proxy: str, target: str, timeout: float) -> bool:
    """Ask an HTTP proxy to open a tunnel to ``target`` (``host:port``); True on a 2xx status line."""
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if parsed.username:
        credentials = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()
        request += f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}\r\n"
    with socket.create_connection((parsed.hostname, parsed.port or 8080), timeout=timeout) as connection:
        connection.sendall((request + "\r\n").encode())
        status_line = connection.makefile("rb").readline().decode("latin-1").split()
    return len(status_line) >= 2 and status_line[1].startswith("2")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) can be reached; never probed under ``HF_HUB_OFFLINE``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES:
        return False
    return host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL``) can be reached; False without a probe when ``WANDB_MODE`` is
    offline, dryrun or disabled."""
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun", "disabled"):
        return False
    return host_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout)
