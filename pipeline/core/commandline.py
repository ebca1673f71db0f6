"""The one command-line plumbing of every command (``salmm <command>``, ``python -m pipeline
<command>``, ``python -m salmm.<command>``).

A command is a module with

* ``SUMMARY`` - its one-line help;
* ``add_arguments(parser)`` - its options (the module imports nothing heavy at the top, so
  ``--help`` and usage errors come at once; the work's imports sit in ``run``);
* ``run(args) -> int | None`` - does the work;
* optionally ``check(parser, args)`` - usage checks across options (``parser.error``), and
  ``LOGGER`` - the logger its one-line errors go to (default its module's name).

:func:`module_main` and :func:`module_parse_args` make its ``main`` and ``parse_args`` for
``python -m``; :func:`dispatcher_parser` and :func:`dispatch` put commands under a dispatcher.

:func:`run_parsed` is the one policy: logging configured once (``-v`` debug, ``-q`` warnings
only; other libraries' messages below WARNING silenced unless ``-v``; each warning said once),
then exit codes 0 success, 1 an output that cannot be written or an unexpected failure, 2 bad
input or usage (one line naming the file and the problem), 130 interrupted.

Also here: the argument types the commands share, :func:`parse_size` the one size parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

from pipeline.core.configfile import CONFIG_OPTION, add_config_options, config_text, with_config
from pipeline.core.errors import BadInputError, run_reporting

OWN_LOGGERS = ("pipeline", "salmm", "flows", "bench")
"""The loggers whose INFO lines a command shows; every other library's show from WARNING on,
unless ``-v``."""

T = TypeVar("T")


class SizeError(argparse.ArgumentTypeError, ValueError):
    """A size that is not ``WIDTHxHEIGHT`` or ``N`` with positive numbers."""


def _spell_size(size: tuple[int, int] | None) -> str | None:
    return None if size is None else f"{size[1]}x{size[0]}"


def parse_size(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (as in ``1280x720``) or ``"N"`` (square) -> (height, width); a tuple
    is taken as (height, width). SizeError (an argparse type error and a ValueError) otherwise."""
    if isinstance(text, tuple):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise SizeError(f"size must look like 256x256 (width x height) or 256, got {text!r}")
    width = int(match.group(1))
    return int(match.group(2) or width), width


parse_size.spell = _spell_size  # (height, width) -> "WIDTHxHEIGHT", for configuration files


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (where it has one and its help does not already say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
        if "default" in text or unset or action.required or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def add_verbosity(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """-v/--verbose and -q/--quiet (``suppress``: leave them unset when not given, so the value
    of a parser above wins)."""
    group = parser.add_mutually_exclusive_group()
    default = argparse.SUPPRESS if suppress else False
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="log debug messages, and other libraries' info messages")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="log warnings and errors only")


class _Once(logging.Filter):
    """Lets each warning text through once (whichever module says it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """One stderr handler on the root logger, ``LEVEL name: message``: the project's loggers
    at INFO (``verbose``: DEBUG; ``quiet``: WARNING), every other library's at WARNING
    (``verbose``: INFO), each warning once. Leaves logging alone if the root logger already has
    handlers (an embedding program or pytest configured it)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    own = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)


def command_parser(command: ModuleType, prog: str,
                   parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The parser of ``command`` (a new one named ``prog``, or ``parser``, a sub-parser),
    with its options and -v/-q; its one-line errors are logged by the command's ``LOGGER``
    (default its module's name)."""
    if parser is None:
        parser = argparse.ArgumentParser(prog=prog, description=command.SUMMARY,
                                         formatter_class=HelpFormatter)
    command.add_arguments(parser)
    if getattr(command, "CONFIG_FILE", False):
        add_config_options(parser)
    add_verbosity(parser, suppress=True)
    # underscored: a command's own options (official's --check) cannot collide with them
    parser.set_defaults(_run=command.run, _logger=getattr(command, "LOGGER", command.__name__),
                        _parser=parser, _check=getattr(command, "check", None))
    return parser


def dispatcher_parser(prog: str, description: str, commands: Mapping[str, tuple[str, str]],
                      wanted: Collection[str]) -> argparse.ArgumentParser:
    """The parser of a dispatcher ``prog``: -v/-q, and one sub-command per entry of
    ``commands`` (name -> (module, one-line help)); only the ``wanted`` ones' modules are
    imported and give their options."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=HelpFormatter)
    add_verbosity(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in commands.items():
        if name not in wanted:
            subparsers.add_parser(name, help=summary, description=summary)
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=summary, description=module.SUMMARY,
                                    formatter_class=HelpFormatter)
        command_parser(module, f"{prog} {name}", sub)
    return parser


def dispatch(build: Callable[[Collection[str]], argparse.ArgumentParser],
             commands: Collection[str], argv: Sequence[str] | None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) of a dispatcher whose parser
    ``build`` makes for the commands it is given: only the command named is imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in argv if arg in commands), None)
    return run_parsed(parse_checked(build([chosen] if chosen else []), argv))


def parse_checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                  ) -> argparse.Namespace:
    """``argv`` (default ``sys.argv[1:]``) parsed, and the chosen command's usage checks made
    (argparse exits with a usage line and status 2 on a bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, start = _command_of(parser, argv)
    if any(word == CONFIG_OPTION or word.startswith(CONFIG_OPTION + "=") for word in argv):
        try:
            argv = with_config(command, argv, start)
        except BadInputError as err:
            parser.exit(2, f"{command.prog}: error: {err}\n")
    args = parser.parse_args(argv)
    if getattr(args, "_check", None) is not None:
        args._check(args._parser, args)
    return args


def _command_of(parser: argparse.ArgumentParser, argv: Sequence[str]
                ) -> tuple[argparse.ArgumentParser, int]:
    """The parser of the command ``argv`` runs (a dispatcher's sub-parser, or ``parser``) and
    where its options start in ``argv``."""
    for action in parser._actions:          # argparse keeps no public list
        if isinstance(action, argparse._SubParsersAction):
            for i, word in enumerate(argv):
                if word in action.choices:
                    return action.choices[word], i + 1
    return parser, 0


def run_parsed(args: argparse.Namespace) -> int:
    """Configure logging from ``args`` and run the command's ``run(args)`` under the exit-code
    policy (``--print-config``: write the resolved configuration instead)."""
    if getattr(args, "print_config", False):
        sys.stdout.write(config_text(args._parser, args, args._parser.prog))
        return 0
    configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    return run_reporting(lambda: args._run(args), logging.getLogger(args._logger))


def _python_m(module_name: str) -> tuple[ModuleType, str]:
    """The command module ``module_name`` (``__main__`` under ``python -m``) and its prog."""
    module = sys.modules[module_name]
    spec = getattr(module, "__spec__", None)
    return module, f"python -m {spec.name if spec is not None else module_name}"


def parse_command(module_name: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed and checked as the options of command module ``module_name``."""
    module, prog = _python_m(module_name)
    return parse_checked(command_parser(module, prog), argv)


def module_main(module_name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv=None) -> exit status`` of command module ``module_name`` (its
    ``python -m`` entry point)."""
    def main(argv: Sequence[str] | None = None) -> int:
        return run_parsed(parse_command(module_name, argv))
    return main


def module_parse_args(module_name: str, options: Callable[[argparse.Namespace], T]
                      ) -> Callable[[Sequence[str] | None], T]:
    """The ``parse_args(argv=None)`` of command module ``module_name``: its command line as the
    options dataclass ``options`` makes of it (for tests and scripts)."""
    def parse_args(argv: Sequence[str] | None = None) -> T:
        return options(parse_command(module_name, argv))
    return parse_args


def options_from(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """A command's options dataclass ``cls`` from the parsed ``args`` (the fields they have;
    ``values`` for the others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **values)
