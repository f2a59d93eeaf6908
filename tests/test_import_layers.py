"""The import rule, read from the source: `models` and `dataloaders` import nothing of ours, `trainer`
builds on those two, and `analysis`, `bench` and `launch` sit on top. An upward import fails here, and so
does a cycle of modules importing each other (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"models", "dataloaders"}
MAY_IMPORT = {
    "models": set(),
    "dataloaders": set(),
    "trainer": BASE,
    "analysis": BASE | {"trainer"},
    "bench": BASE | {"trainer", "analysis"},  # benchmarks measure the analysis tools too
    "launch": BASE | {"trainer"},
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def modules_imported(path: Path) -> set[str]:
    """Our plain modules that `path` imports (`from package import name` counts package.name when that is
    one). A package's `__init__` only gathers its modules' names for callers, so it is not a node."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {m for m in found if m.split(".")[0] in MAY_IMPORT and _is_module(m)}


def _is_module(name: str) -> bool:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py").is_file()


def test_no_import_cycles():
    graph = {module_name(f): modules_imported(f) for p in MAY_IMPORT for f in (ROOT / p).rglob("*.py")
             if f.name != "__init__.py"}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        for n in sorted(graph.get(m, ())):
            if n in path:
                cycles.append(path[path.index(n):] + [n])
            elif n not in done:
                visit(n, path + [n])
        done.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def ours_imported(path: Path) -> set[str]:
    """Our top-level packages that `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MAY_IMPORT.keys()


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_no_upward_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(ROOT)): sorted(bad) for f in files
             if (bad := ours_imported(f) - MAY_IMPORT[package] - {package})}
    assert not wrong, f"{package} may import only {sorted(MAY_IMPORT[package])}: {wrong}"


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nimport trainer.config\n\ndef f():\n    from analysis.spikes import x\n"
                   "    from . import sibling\n")
    assert ours_imported(src) == {"trainer", "analysis"}
