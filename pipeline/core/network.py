"""Downloads that fail in seconds, resume, and are verified.

* :func:`unreachable` - whether a download host answers: one TCP connection attempt to where a
  URL's requests would go (its proxy when one is configured), so a command without a network
  says so in one line before any work, instead of after a client's minutes of retries;
* :func:`fetch_file` - one file over HTTP(S), resumed with range requests, its sha256 checked
  before it is put in place."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.core.progress import progress

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
"""Seconds one connection attempt may take."""
HUB_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """The Hugging Face Hub a download goes to: ``HF_ENDPOINT`` (read at each call), else
    :data:`HUB_ENDPOINT`."""
    return os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT


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


CHUNK = 1 << 20
RETRIES = 3


def fetch_file(url: str, dest: str | os.PathLike[str], *, sha256: str | None = None,
               progress_bar: bool = True) -> str:
    """Download ``url`` to ``dest``, resumably, and return its sha256.

    Bytes go to ``dest.part`` first; a run cut short (a dropped connection: retried up to
    :data:`RETRIES` times at once; a killed process: on the next call) continues from what
    is there with an HTTP range request. The whole file is hashed before it is renamed to
    ``dest``: with ``sha256`` given, a mismatch leaves nothing at ``dest``, removes the part
    file and raises BadInputError naming the URL. An unreachable host is BadInputError in
    seconds (:func:`unreachable`).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if (why := unreachable(url)) is not None:
        raise BadInputError(url, f"cannot be downloaded here ({why})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if have and response.status != 206:      # the server ignored the range
                    have = 0
                total = response.headers.get("Content-Length")
                total = int(total) + have if total is not None else None
                with open(part, "ab" if have else "wb") as out, \
                        progress(total, dest.name, "B", disable=not progress_bar,
                                 unit_scale=True, initial=have) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size < total:
                    raise ConnectionError(f"cut after {part.stat().st_size} of {total} bytes")
            break
        except urllib.error.HTTPError as err:
            raise BadInputError(url, f"the server answered {err.code} {err.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException
                ) as err:
            if attempt == RETRIES:
                raise BadInputError(url, f"download cut ({err}); run again to resume") from None
            log.warning("%s: download cut (%s); resuming", url, err)
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    got = digest.hexdigest()
    if sha256 is not None and got != sha256.lower():
        part.unlink()
        raise BadInputError(url, f"sha256 {got[:16]}… is not the pinned {sha256[:16]}…: the"
                            " file is not the release (removed; nothing kept)")
    os.replace(part, dest)
    return got
