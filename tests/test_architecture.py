"""The layering rule of ARCHITECTURE.md, checked on every module of the three packages.

The layers and their modules are read from ARCHITECTURE.md's list, so the document and the check
cannot drift apart. A module may import from its own layer or a layer above it in the list; an
import inside a function must say why on its line (``# lazy: <why>``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "salmm", "flows")
LAZY = re.compile(r"#\s*lazy:\s*\S+")


def layers() -> dict[str, int]:
    """module -> layer rank (0 = core) from ARCHITECTURE.md's ```text block."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    block = text.split("```text", 1)[1].split("```", 1)[0]
    ranks = {}
    for rank, line in enumerate(line for line in block.splitlines() if line.strip()):
        for module in line.split()[1:]:
            ranks[module] = rank
    return ranks


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)


def layer_of(module: str, ranks: dict[str, int]) -> int | None:
    """The rank of ``module``, or of the closest listed package above it."""
    while module:
        if module in ranks:
            return ranks[module]
        module = module.rpartition(".")[0]
    return None


def project_imports(source: str, module: str, modules: set[str]) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) of each import in ``source``; ``from P import
    M`` counts as an import of the module ``P.M`` where ``modules`` has one, else of ``P``."""
    tree = ast.parse(source)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                               # relative: resolve against the module
                prefix = module.rsplit(".", node.level)[0]
                base = f"{prefix}.{base}" if base else prefix
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            found.append((node.lineno, name, id(node) in in_function))
    return found


def violations(source: str, module: str, ranks: dict[str, int],
               modules: set[str] | None = None) -> list[str]:
    """What breaks the rule in ``source`` (the text of ``module``): one line per import."""
    lines = source.splitlines()
    own = layer_of(module, ranks)
    if own is None:
        return [f"{module}: not in ARCHITECTURE.md's layer list"]
    problems: dict[int, str] = {}
    for lineno, name, lazy in project_imports(source, module, modules or set(ranks)):
        target = layer_of(name, ranks) if name.split(".")[0] in PACKAGES else None
        if target is not None and target > own:
            problems.setdefault(lineno, f"{module}:{lineno}: imports {name}, a layer above")
        elif lazy and not LAZY.search(lines[lineno - 1]):
            problems.setdefault(lineno, f"{module}:{lineno}: import inside a function without"
                                        " '# lazy: why'")
    return [problems[k] for k in sorted(problems)]


def sources() -> list[tuple[str, str]]:
    return [(module_name(path), path.read_text()) for package in PACKAGES
            for path in sorted((REPO / package).rglob("*.py"))]


def test_every_module_keeps_to_its_layer():
    ranks, found = layers(), sources()
    modules = {module for module, _ in found}
    problems = [p for module, source in found for p in violations(source, module, ranks, modules)]
    assert problems == []


def test_the_layer_list_names_only_modules_that_exist():
    modules = {module for module, _ in sources()}
    assert set(layers()) - modules == set()


@pytest.mark.parametrize("source, problem", [
    ("from salmm.train import train\n", "imports salmm.train, a layer above"),
    ("def f():\n    import pipeline.datasets.splits\n",
     "import inside a function without '# lazy: why'"),
    ("from salmm import model\n", "imports salmm.model, a layer above"),
    ("def f():\n    import numpy  # lazy: only here\n", None),
    ("from pipeline.core.fsio import Folder\n", None),
])
def test_the_check_fails_on_an_upward_import(source, problem):
    modules = {module for module, _ in sources()}
    got = violations(source, "pipeline.formats.manifest", layers(), modules)      # a formats module
    if problem is None:
        assert got == []
    else:
        assert len(got) == 1 and got[0].endswith(problem)


def test_packages_import_in_one_direction():
    """flows may use salmm and pipeline, salmm may use pipeline; pipeline uses neither."""
    found = sources()
    modules = {module for module, _ in found}
    allowed = {"pipeline": {"pipeline"}, "salmm": {"pipeline", "salmm"},
               "flows": {"pipeline", "salmm", "flows"}}
    wrong = [f"{module}:{line}: imports {name}" for module, source in found
             for line, name, _ in project_imports(source, module, modules)
             if name.split(".")[0] in PACKAGES
             and name.split(".")[0] not in allowed[module.split(".")[0]]]
    assert wrong == []


COMMAND_MODULES = {"pipeline.synth", "pipeline.check_layout", "pipeline.download", "pipeline.normalize.command", "pipeline.verify",
                   "pipeline.embed", "flows.command", "salmm.train", "salmm.evaluate",
                   "salmm.compare", "salmm.certify", "salmm.predict", "salmm.stream",
                   "salmm.export", "salmm.official", "salmm.versions"}


def test_the_command_list_is_the_dispatchers():
    from pipeline.cli import COMMANDS as PIPELINE
    from salmm.cli import COMMANDS as SALMM

    assert {module for module, _ in SALMM.values()} == COMMAND_MODULES
    assert {module for module, _ in PIPELINE.values()} < COMMAND_MODULES


def test_commands_never_import_commands_and_stay_small():
    found = dict(sources())
    modules = set(found)
    wrong = [f"{module}:{line}: imports {name}" for module in sorted(COMMAND_MODULES)
             for line, name, _ in project_imports(found[module], module, modules)
             if name in COMMAND_MODULES]
    assert wrong == []
    assert {m: len(found[m].splitlines()) for m in COMMAND_MODULES
            if len(found[m].splitlines()) > 250} == {}


def _typing_only_lines(source: str) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, sub.end_lineno + 1))
    return lines


def import_cycles(found: dict[str, str]) -> list[str]:
    """The cycles among the imports run when a module is imported (not inside functions, not
    for type checking) of ``found`` (module -> source), one ``a -> b -> a`` line each."""
    modules = set(found)
    graph = {module: sorted({name for line, name, lazy in project_imports(source, module, modules)
                             if not lazy and name in modules and name != module
                             and line not in _typing_only_lines(source)})
             for module, source in found.items()}
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return cycles


def test_no_import_cycle():
    assert import_cycles(dict(sources())) == []


def test_the_cycle_check_finds_a_cycle_and_ignores_typing_and_lazy_imports():
    assert import_cycles({"pipeline.a": "from pipeline.b import x\n",
                          "pipeline.b": "import pipeline.a\n"}) == [
        "pipeline.a -> pipeline.b -> pipeline.a"]
    assert import_cycles({
        "pipeline.a": "from pipeline.b import x\n",
        "pipeline.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    import pipeline.a\ndef f():\n    import pipeline.a  # lazy: x\n"}) == []
