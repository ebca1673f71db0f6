"""Split files: ``train.json``, ``valid.json``, ``test.json`` at a dataset root.

Despite the extension a split file is JSON *lines*: one JSON string per line naming a
frame relative to the frame folder, ``"VV/FFFFFF.jpg"`` (TrafficGaze, DrFixD-rainy) or
``"VVVV/FFFF.jpg"`` (BDDA). Blank lines are ignored and the last line may lack a newline,
as in the released files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import write_atomic

SPLITS = ("train", "valid", "test")


def split_path(root: str | os.PathLike[str], split: str) -> Path:
    """The split file of ``split`` (one of :data:`SPLITS`) under a dataset root."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(root) / f"{split}.json"


def read_split(path: str | os.PathLike[str]) -> list[str]:
    """The frame names listed in a split file, in file order (see :func:`split_entries`)."""
    return [name for _, name in split_entries(path)]


def split_entries(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(1-based line number, frame name) of every entry of a split file, in file order.

    Raises:
        BadInputError: the file is missing or unreadable, a line is not a JSON string, or an
            entry repeats an earlier one (the message names both line numbers).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(path, "missing split file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(path, f"cannot read split file ({err})") from None
    entries: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            name = json.loads(line)
        except json.JSONDecodeError:
            name = None
        if not isinstance(name, str):
            raise BadInputError(path, f"line {number}: expected a JSON string such as "
                                      f'"01/000006.jpg", got {line.strip()[:60]!r}')
        if name in seen:
            raise BadInputError(path, f"line {number}: {name!r} repeats line {seen[name]}; a"
                                " frame is listed once")
        seen[name] = number
        entries.append((number, name))
    return entries


def check_disjoint(entries: dict[str, list[tuple[int, str]]], root: str | os.PathLike[str]
                   ) -> None:
    """BadInputError (naming the later split file and both lines) when a frame is listed in
    two splits: ``entries`` maps each split to its :func:`split_entries`."""
    owner: dict[str, tuple[str, int]] = {}
    for split, lines in entries.items():
        for number, name in lines:
            if name in owner:
                first, line = owner[name]
                raise BadInputError(split_path(root, split), f"line {number}: {name!r} is also"
                                    f" in {first}.json (line {line}); a frame belongs to one"
                                    " split")
            owner[name] = (split, number)


def write_split(path: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Write a split file (one JSON string per line) atomically: temporary name, fsync, rename."""
    path = Path(path)
    write_atomic(path, "".join(json.dumps(name) + "\n" for name in names).encode("utf-8"))
