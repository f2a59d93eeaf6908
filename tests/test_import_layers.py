"""The import rule, read from the source: `models`, `dataloaders` and `cluster` import nothing of ours,
`trainer` builds on the first two, and `analysis`, `bench` and `launch` sit on top (the last two also use
`cluster`). An upward import fails here; so does a package a non-editable install would leave out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"models", "dataloaders"}
MAY_IMPORT = {
    "models": set(),
    "dataloaders": set(),
    "cluster": set(),
    "trainer": BASE,
    "analysis": BASE | {"trainer"},
    "bench": BASE | {"trainer", "analysis", "cluster"},  # benchmarks measure the analysis tools too
    "launch": BASE | {"trainer", "cluster"},
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


def test_a_wheel_of_the_project_holds_every_layer_and_the_files_cluster_runs(tmp_path):
    """A non-editable install gets what the wheel holds: each package above with its __init__, and the files
    `cluster.local` and the GPU check start at run time."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy of the checkout: setuptools writes build/ and egg-info into the source
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=600,
                   env=dict(os.environ, PIP_NO_CACHE_DIR="1"))
    (wheel,) = tmp_path.glob("deepspike-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"{p}/__init__.py" for p in MAY_IMPORT} <= names
    assert {"cluster/local.py", "cluster/bind_node_addr.c", "cluster/local.sh", "cluster/mlflow/server.sh",
            "bench/gpu_check.sh", "bench/gpu_check/__init__.py", "bench/gpu_check/run.py"} <= names
