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
    ("def f():\n    import pipeline.datasets.splits\n", "import inside a function without '# lazy: why'"),
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
