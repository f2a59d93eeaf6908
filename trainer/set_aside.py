"""Starting over without deleting: an earlier run (or its checkpoints) is renamed, never removed."""

from __future__ import annotations

import time
from pathlib import Path


def set_aside(path: Path) -> Path | None:
    """Rename `path` to `<name>.replaced-<time>` if it exists; returns the new path."""
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside
