"""A dataset fetched from the SalM² authors' Hugging Face mirror into the layout the readers
expect (``salmm download``), or the steps to get one that has no mirror.

1. The mirror's commit at the asked revision (default ``main``) is resolved first, and every
   file is fetched at that commit into ``OUT/.download/`` (huggingface_hub: a cut download
   resumes on the next run; files already there are kept).
2. Archives there (zip, tar, tar.gz / tgz) are unpacked into ``OUT/.unpacked/``, once each,
   refusing any member that would land outside it (an absolute path, ``..``, a link).
3. The folder holding the dataset's layout folders (``trafficframe/`` and ``fixdata/``, ...) is
   moved to ``OUT/<release folder>`` and ``DOWNLOAD.json`` there records the repository, the
   revision asked for and the commit fetched.

The result is then checked against its split lists (:mod:`pipeline.datasets.layout`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core import network
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import write_atomic
from pipeline.datasets import get

log = logging.getLogger(__name__)

RECORD = "DOWNLOAD.json"
STAGING, UNPACKED = ".download", ".unpacked"
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
UNSUPPORTED = (".rar", ".7z", ".z01", ".001")


def _fetch(repo: str, revision: str, staging: Path) -> str:
    """Every file of dataset repository ``repo`` at ``revision`` into ``staging``; the commit."""
    from huggingface_hub import HfApi, snapshot_download  # lazy: only when downloading
    from huggingface_hub.errors import (  # lazy: as above
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = network.hub_endpoint()
    if (why := network.unreachable(endpoint)) is not None:
        raise BadInputError(repo, f"the Hub cannot be reached ({why}); download on a machine"
                            " with a network and copy the folder, then `salmm check-layout`")
    try:
        commit = HfApi(endpoint=endpoint).dataset_info(repo, revision=revision).sha
        snapshot_download(repo, repo_type="dataset", revision=commit, local_dir=staging,
                          endpoint=endpoint)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise BadInputError(f"{repo}@{revision}", "no such dataset repository or revision on"
                            " the Hub") from None
    except (HfHubHTTPError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(repo, f"download failed ({first}); run the command again to"
                            " resume") from None
    return str(commit)


def _inside(base: Path, name: str) -> Path:
    target = (base / name).resolve()
    if name.startswith(("/", "\\")) or not target.is_relative_to(base.resolve()):
        raise ValueError(f"member {name!r} would land outside the folder")
    return target


def unpack(archive: Path, into: Path) -> None:
    """Unpack ``archive`` into ``into``; BadInputError naming it for a member that would land
    outside (absolute, ``..``, a link) or an archive that does not read."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.infolist():
                    _inside(into, member.filename)
                zipped.extractall(into)
        else:
            with tarfile.open(archive) as tarred:
                for member in tarred.getmembers():
                    _inside(into, member.name)
                    if not (member.isfile() or member.isdir()):
                        raise ValueError(f"member {member.name!r} is a link or device")
                tarred.extractall(into, filter="data")
    except (ValueError, zipfile.BadZipFile, tarfile.TarError, OSError) as err:
        raise BadInputError(archive, f"cannot be unpacked safely ({err})") from None


def _layout_root(dataset: str, *bases: Path) -> Path | None:
    """The folder under ``bases`` holding all of ``dataset``'s layout folders."""
    folders = get(dataset).folders
    for base in bases:
        for here, dirs, _ in os.walk(base):
            dirs.sort()
            if all(name in dirs for name in folders):
                return Path(here)
    return None


def manual_steps(dataset: str) -> str:
    """How to get ``dataset`` where it has no mirror to download from."""
    entry = get(dataset)
    return entry.manual or f"see data/README.md for {entry.display}"


def download(dataset: str, out: str | os.PathLike[str], revision: str = "main"
             ) -> tuple[Path, dict[str, Any]]:
    """Fetch ``dataset`` from its mirror into ``out``; (its root, the download record).
    BadInputError (one line) without a mirror (saying what to do), a network, or a usable
    archive."""
    entry = get(dataset)
    if not entry.mirror:
        raise BadInputError(entry.display, f"no mirror to download from: {manual_steps(dataset)}")
    out = Path(out)
    root = out / entry.release_dir
    if (root / RECORD).exists():
        log.info("%s is already there (%s)", root, RECORD)
        return root, json.loads((root / RECORD).read_text())
    staging, unpacked = out / STAGING, out / UNPACKED
    staging.mkdir(parents=True, exist_ok=True)
    commit = _fetch(entry.mirror, revision, staging)
    files = sorted(p for p in staging.rglob("*") if p.is_file()
                   and ".cache" not in p.relative_to(staging).parts)
    for path in files:
        name = path.name.lower()
        if name.endswith(UNSUPPORTED):
            raise BadInputError(path, "an archive salmm cannot unpack (rar, 7z or a multi-part"
                                f" one): unpack it by hand into {root}, then `salmm check-layout`")
        if name.endswith(ARCHIVES):
            done = unpacked / f".{path.name}.unpacked"
            if not done.exists():
                log.info("unpacking %s", path.name)
                unpack(path, unpacked)
                done.write_text(str(path.stat().st_size))
    found = _layout_root(dataset, staging, unpacked)
    if found is None:
        raise BadInputError(entry.mirror, f"no folder with {' and '.join(entry.folders)} in the"
                            f" download (in {staging}): the mirror's layout changed; unpack it"
                            f" by hand into {root}")
    shutil.move(str(found), str(root))
    shutil.rmtree(root / ".cache", ignore_errors=True)     # the client's own bookkeeping
    record = {"repository": entry.mirror, "repo_type": "dataset", "revision": revision,
              "commit": commit, "endpoint": network.hub_endpoint(),
              "files": {str(p.relative_to(staging)): p.stat().st_size for p in files}}
    write_atomic(root / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    for leftover in (staging, unpacked):
        shutil.rmtree(leftover, ignore_errors=True)
    return root, record
