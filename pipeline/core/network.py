"""Whether a download host answers, found out in seconds: one TCP connection attempt to where
a URL's requests would go (its HTTPS proxy when one is configured), so a command without a
network says so in one line before any work, instead of after a client's minutes of retries."""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 3.0
"""Seconds one connection attempt may take."""


def host_of(url: str) -> tuple[str, int]:
    """(host, port) requests for ``url`` connect to: the configured HTTPS / HTTP proxy's, else
    the URL's own (port 443 / 80 by scheme when it names none)."""
    scheme = urllib.parse.urlsplit(url).scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    parsed = urllib.parse.urlsplit(proxy or url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def reachable(host: str, port: int) -> str | None:
    """None when a TCP connection to ``host:port`` opens within :data:`PROBE_TIMEOUT_S`, else
    why not (one attempt, no retries)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host}:{port} cannot be reached: {err.strerror or err}"


def unreachable(url: str) -> str | None:
    """None when ``url``'s host (or proxy) answers, else why not."""
    return reachable(*host_of(url))
