"""A stand-in for the Hugging Face Hub and for release-file hosts, on 127.0.0.1 (no network).

It speaks the part of the Hub's HTTP protocol ``huggingface_hub`` downloads with (checked against
its 2.x client): ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` (``/datasets/{repo}/...``
for datasets) answering ``X-Repo-Commit``, ``ETag`` and ``Content-Length``, byte ranges
(``Range: bytes=N-`` -> 206), and ``GET /api/{models|datasets}/{repo}/revision/{revision}``
and ``.../tree/{revision or commit}`` listing the files. Plain files are served at ``/files/{name}`` with ranges too. A file named in
``cut_once`` is cut halfway through the first time it is sent (the connection closes), the way a
flaky network cuts a download; every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass
class FakeHub:
    """repos: {(kind "models" | "datasets", repo_id): {revision: {file name: bytes}}};
    files: {name: bytes} served at /files/{name}."""

    repos: dict[tuple[str, str], dict[str, dict[str, bytes]]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def commit(self, kind: str, repo: str, revision: str) -> str:
        return hashlib.sha1(f"{kind}/{repo}@{revision}".encode()).hexdigest()

    def lookup(self, path: str) -> tuple[bytes | None, dict[str, str], str | None]:
        """(content, headers, listing JSON) for a request path; (None, ...) for a 404."""
        parts = path.split("?", 1)[0].strip("/").split("/")
        if parts[0] == "files" and len(parts) == 2 and parts[1] in self.files:
            return self.files[parts[1]], {"ETag": f'"{hashlib.sha256(self.files[parts[1]]).hexdigest()}"'}, None
        if parts[0] == "api" and len(parts) >= 6 and parts[4] == "tree":
            kind, repo, wanted = parts[1], "/".join(parts[2:4]), parts[5]
            for revision, files in self.repos.get((kind, repo), {}).items():
                if wanted in (revision, self.commit(kind, repo, revision)):
                    return None, {}, json.dumps(
                        [{"type": "file", "path": name, "size": len(data),
                          "oid": hashlib.sha1(data).hexdigest()}
                         for name, data in sorted(files.items())])
            return None, {}, None
        if parts[0] == "api" and len(parts) >= 6 and parts[4] == "revision":
            kind, repo, revision = parts[1], "/".join(parts[2:4]), "/".join(parts[5:])
            files = self.repos.get((kind, repo), {}).get(revision)
            if files is None:
                return None, {}, None
            listing = {"id": repo, "sha": self.commit(kind, repo, revision),
                       "siblings": [{"rfilename": name, "size": len(data)}
                                    for name, data in sorted(files.items())]}
            return None, {}, json.dumps(listing)
        kind = "datasets" if parts[0] == "datasets" else "models"
        if kind == "datasets":
            parts = parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return None, {}, None
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        revisions = self.repos.get((kind, repo), {})
        revision = next((r for r in revisions if self.commit(kind, repo, r) == revision),
                        revision)                       # a commit names its revision
        files = revisions.get(revision)
        if files is None or name not in files:
            return None, {"X-Error-Code": "EntryNotFound" if files is not None
                          else "RepoNotFound"}, None
        data = files[name]
        return data, {"X-Repo-Commit": self.commit(kind, repo, revision),
                      "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            data, headers, listing = hub.lookup(self.path)
            if listing is not None:
                payload = listing.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)
                return
            if data is None:
                self.send_response(404)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes=") and body:
                start = int(wanted[6:].split("-")[0] or 0)
            self.send_response(206 if start else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            name = self.path.rstrip("/").rsplit("/", 1)[-1]
            if name in hub.cut_once and not start:
                hub.cut_once.discard(name)
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data[start:])

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


class Served:
    """A :class:`FakeHub` listening on 127.0.0.1 (a context manager): ``url`` is its
    endpoint."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
