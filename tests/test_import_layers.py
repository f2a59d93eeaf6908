"""The import rule, read from the source: `models` and `dataloaders` import nothing of ours, `trainer`
builds on those two, and `analysis`, `bench` and `launch` sit on top. An upward import fails here."""

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
