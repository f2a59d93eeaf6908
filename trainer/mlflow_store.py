"""Where runs are tracked without a tracking server."""

from __future__ import annotations

from pathlib import Path


def local_store_uri(folder: str | Path) -> str:
    """An sqlite store in `folder`: MLflow's file store is off by default (docs/stack.md §4)."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"
