"""Runs written as a file: ``--config FILE`` (TOML or JSON) gives a command's options, flags on
the command line override them, and ``--print-config`` writes the full resolved configuration as
TOML (itself a valid ``--config``).

The schema of a command's file is its argument parser (one source of truth): a key is an
option's name (``batch_size`` or ``batch-size`` for ``--batch-size``), a value what the option
takes on a command line (``size = "256x256"``), a JSON/TOML list for a repeatable option, true or
false for a switch. A training run's ``config.json`` is also a valid file (its ``"config"`` is
read). A value is turned back into a command-line word by its type's ``spell`` attribute where
it has one (``parse_size.spell((256, 320)) == "320x256"``), else by ``str``.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import BadInputError

CONFIG_OPTION = "--config"
PRINT_OPTION = "--print-config"
SKIPPED = {"config", "print_config", "verbose", "quiet", "help"}
"""Destinations that are not part of a run's configuration."""


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--config and --print-config."""
    group = parser.add_argument_group("configuration file")
    group.add_argument(CONFIG_OPTION, metavar="FILE", help="options from a TOML or JSON file"
                       " (keys are option names; flags given here override them; a run's"
                       " config.json works too)")
    group.add_argument(PRINT_OPTION, action="store_true", help="write the full resolved"
                       " configuration as TOML to stdout and stop (a valid --config)")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every option a file may set."""
    return {a.dest: a for a in parser._actions  # argparse keeps no public list
            if a.option_strings and a.dest not in SKIPPED and not a.dest.startswith("_")
            and not isinstance(a, argparse._HelpAction | argparse._VersionAction)}


def load_config(path: str) -> dict[str, Any]:
    """The option values in ``path`` (TOML, or JSON: a run's config.json gives its "config")."""
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise BadInputError(path, f"cannot be read ({err.strerror or err})") from None
    try:
        values = json.loads(text) if path.endswith(".json") else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as err:
        kind = "JSON" if path.endswith(".json") else "TOML"
        raise BadInputError(path, f"not valid {kind} ({err})") from None
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        values = values["config"]                   # a run's config.json
    if not isinstance(values, dict):
        raise BadInputError(path, "must hold option = value pairs")
    return values


def _spell(action: argparse.Action, value: Any) -> str | None:
    """``value`` (as a file or a parsed namespace holds it) as the option's command-line word
    (None: leave the option out). A string is a command-line word already."""
    if isinstance(value, str):
        return value
    spell = getattr(action.type, "spell", None)
    if spell is not None:
        if isinstance(value, list):
            value = tuple(value)
        return spell(value)
    if value is None:
        return None
    if isinstance(value, bool | dict | list):
        raise TypeError(f"{value!r} is not a single value")
    return str(value)


def _check_word(action: argparse.Action, word: str) -> None:
    """ValueError (or the type's error) when ``action`` would refuse ``word``."""
    value = action.type(word) if action.type is not None else word
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{word!r} is not one of {', '.join(map(str, action.choices))}")


def _valid(action: argparse.Action, word: str) -> bool:
    try:
        _check_word(action, word)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True


def config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line words that give ``parser``'s options the values in file ``path``.
    BadInputError (one line naming the file) for an unknown key or a value its option
    refuses."""
    options = _options(parser)
    words: list[str] = []
    values = load_config(path)
    unknown = sorted(k for k in values if k.replace("-", "_") not in options)
    if unknown:
        raise BadInputError(path, f"unknown setting(s) {', '.join(unknown)} (the options here:"
                            f" {', '.join(sorted(options))})")
    for key, value in values.items():
        action = options[key.replace("-", "_")]
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") \
            else action.option_strings[0]
        try:
            if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
                if not isinstance(value, bool):
                    raise TypeError("must be true or false")
                if value != action.default:
                    words.append(flag)
                continue
            items = value if isinstance(action, argparse._AppendAction) else [value]
            if not isinstance(items, list):
                raise TypeError("must be a list (the option repeats)")
            for item in items:
                word = _spell(action, item)
                if word is None:
                    continue
                _check_word(action, word)            # refused here, naming the file
                words += [flag, word]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise BadInputError(path, f"{key}: {err}") from None
    return words


def with_config(parser: argparse.ArgumentParser, argv: Sequence[str], start: int = 0
                ) -> list[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's options, placed at ``start``
    (after a dispatcher's command word), before the command line's own options so that these
    override them (a repeatable option given on the command line replaces the file's list)."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if word == CONFIG_OPTION and i + 1 < len(argv):
            path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if word.startswith(CONFIG_OPTION + "="):
            path, rest = word.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    else:
        return argv
    words = config_argv(parser, path)
    by_flag = {flag: a for a in _options(parser).values() for flag in a.option_strings}
    given = {by_flag[w].dest for w in rest
             if w in by_flag and isinstance(by_flag[w], argparse._AppendAction)}
    kept, skip = [], False
    for j, word in enumerate(words):        # drop the file's entries of lists the line gives
        if skip:
            skip = False
            continue
        action = by_flag.get(word)
        if action is not None and action.dest in given and j + 1 < len(words):
            skip = True
            continue
        kept.append(word)
    return [*rest[:start], *kept, *rest[start:]]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))                   # a TOML basic string


def config_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """The resolved options of ``args`` as a TOML ``--config`` file for ``command``."""
    lines = [f"# {command} --config FILE: the full configuration"]
    for dest, action in sorted(_options(parser).items()):
        value = getattr(args, dest, None)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            lines.append(f"{dest} = {_toml_value(bool(value))}")
            continue
        items = value if isinstance(action, argparse._AppendAction) else None
        if items is not None:
            lines.append(f"{dest} = {_toml_value([_spell(action, v) for v in items])}")
            continue
        word = _spell(action, value)
        if word is None:
            lines.append(f"# {dest}: not set")
        elif value == action.default and not _valid(action, word):
            lines.append(f"# {dest}: {word}")      # a default no value spells (a marker)
        elif isinstance(value, int | float) and not isinstance(value, bool) \
                and getattr(action.type, "spell", None) is None:
            lines.append(f"{dest} = {_toml_value(value)}")
        else:
            lines.append(f"{dest} = {_toml_value(word)}")
    return "\n".join(lines) + "\n"
