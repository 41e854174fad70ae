"""One reachability probe shared by the W&B fallback and the backbone's offline check."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True
