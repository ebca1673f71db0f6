"""Small fsspec helpers: open a folder given as a local path or any fsspec URL, write a file
atomically, hash a file.

Atomic write: the bytes go to a temporary name next to the target, then one rename makes them
visible; any failure to write (a full disk, no permission) is one
:class:`~pipeline.core.errors.OutputError` line naming the file, and leaves no temporary file. On the local file system the temporary file is fsync'ed before the rename and the
folder after it, so after a crash a target either holds its complete new content or does not
exist (or keeps its old content). Other fsspec file systems get write-to-temporary then ``mv``,
which is as atomic as that store's move.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import OutputError

TMP_MARK = ".tmp-"
"""Temporary names are ``<name>.tmp-<random>``; anything carrying the mark is an unfinished write."""

HASH_BLOCK = 1 << 20
LOCK = ".lock"
"""The lock file a writer holds inside its output folder (see :meth:`Folder.lock`)."""


class Folder:
    """A folder on any fsspec file system, addressed by a local path or URL.

    ``Folder("out/prepared")``, ``Folder("file:///data/p")`` and ``Folder("memory://p")`` all
    work; ``url(name)`` gives the address of a file inside it in the same form as ``root``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root).rstrip("/") or "/"
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.path = self.path.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Folder({self.root!r})"

    def _full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def url(self, name: str) -> str:
        """Address of ``name`` inside the folder, as a local path or URL like ``root``."""
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._full(name))

    def makedirs(self, name: str = "") -> None:
        """Create the folder (or ``name`` inside it) with its parents; OutputError (one line)
        when it cannot be (no permission, a read-only or full file system)."""
        try:
            self.fs.makedirs(self._full(name) if name else self.path, exist_ok=True)
        except OSError as err:
            raise OutputError(self.url(name) if name else self.root, f"cannot be written"
                              f" ({err.strerror or type(err).__name__})") from None

    def listdir(self, name: str = "") -> list[str]:
        """Names (not paths) of the entries directly inside ``name``; [] if it does not exist."""
        full = self._full(name) if name else self.path
        if not self.fs.exists(full):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(full, detail=False))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._full(name))

    def open(self, name: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self._full(name), mode)

    def remove(self, name: str) -> None:
        """Delete a file or a whole sub-folder; nothing if it does not exist."""
        full = self._full(name)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=self.fs.isdir(full))

    def sha256(self, name: str) -> str:
        """sha256 hex of a file's bytes, read in 1 MiB blocks."""
        with self.open(name) as f:
            return sha256_stream(f)

    def size(self, name: str) -> int:
        return int(self.fs.size(self._full(name)))

    @contextmanager
    def atomic_writer(self, name: str) -> Iterator[IO[bytes]]:
        """Open ``name`` for writing such that it appears complete or not at all.

        The body writes to a temporary file; on normal exit it is flushed, fsync'ed (local) and
        renamed over ``name``; on an exception the temporary file is removed and ``name`` is
        untouched.
        """
        tmp = f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        full_tmp, full = self._full(tmp), self._full(name)
        parent = full.rsplit("/", 1)[0]
        try:
            self.fs.makedirs(parent, exist_ok=True)
            if self.local:
                with open(full_tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(full_tmp, full)
                fsync_dir(parent)
            else:
                with self.fs.open(full_tmp, "wb") as f:
                    yield f
                self.fs.mv(full_tmp, full)
        except BaseException as err:
            with contextlib.suppress(OSError):
                if self.fs.exists(full_tmp):
                    self.fs.rm(full_tmp)
            if isinstance(err, OSError):
                raise OutputError(self.url(name), f"cannot be written"
                                  f" ({err.strerror or type(err).__name__})") from None
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically replace ``name`` with ``data``."""
        with self.atomic_writer(name) as f:
            f.write(data)

    @contextmanager
    def lock(self, name: str = LOCK, subject: str | None = None) -> Iterator[None]:
        """Hold an exclusive lock on the folder (the file ``name`` inside it) for the block.

        A second holder - another process, on any machine sharing a local or network file
        system with working ``flock`` - is refused at once with an OutputError naming
        ``subject`` (default: the folder) and the holder (pid, host, start time, command).
        fsspec stores other than the local file system have no locks: there the block runs
        unlocked.
        """
        if not self.local:
            yield
            return
        self.makedirs()
        path = Path(self.path) / name
        fd = self._acquire(path, subject or self.root)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on {platform.node()} since"
                           f" {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}"
                           ).encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()           # while still held: the folder is left as it was
            os.close(fd)                # closing releases the lock

    @staticmethod
    def _acquire(path: Path, subject: str) -> int:
        """An open, exclusively flock'ed descriptor of the lock file ``path`` (created if need
        be); OutputError naming ``subject`` when another process holds it. A lock file its
        holder removed while we waited on it is not the lock any more: take the new one."""
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(subject, f"cannot be written ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(subject, f"another run is writing here ({holder}); wait"
                                  " for it to finish or choose another output") from None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                return fd
            os.close(fd)                # the previous holder removed it on release: retry
        raise OutputError(subject, "cannot be locked (its lock file keeps changing)")

    def remove_unfinished(self, name: str = "") -> list[str]:
        """Delete leftover temporary files (``*.tmp-*``) directly inside ``name``; their names."""
        stale = [n for n in self.listdir(name) if TMP_MARK in n]
        for n in stale:
            self.remove(f"{name}/{n}" if name else n)
        return stale


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace the file ``path`` (local path or fsspec URL) with ``data``,
    creating its folder if needed."""
    parent, _, name = str(path).rstrip("/").rpartition("/")
    Folder(parent or ".").write_bytes(name, data)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file inside the local folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_stream(f: IO[bytes]) -> str:
    """sha256 hex of everything left in ``f``."""
    digest = hashlib.sha256()
    while block := f.read(HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return size, sha256_stream(f)


def relative_to(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` with forward slashes (how the manifest names raw files)."""
    return Path(path).relative_to(Path(root)).as_posix()
