"""A real local cluster (cluster/local.sh) for a test module, and what its processes listen on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def digits_wds(out: Path) -> Path:
    """The digits data set at 16 px as WebDataset shards, made with the real converter CLI."""
    subprocess.run([sys.executable, "-m", "dataloaders.convert", "digits", "--out", str(out), "--format", "wds",
                    "--size", "16", "--workers", "1"], cwd=ROOT, check=True, capture_output=True)
    return out


def local_sh(cluster_dir: Path) -> list[str]:
    return [str(ROOT / "cluster/local.sh"), "--dir", str(cluster_dir)]


@contextlib.contextmanager
def local_cluster(cluster_dir: Path, *args: str, workers: int = 2):
    """`cluster/local.sh --dir DIR up WORKERS ARGS...`; yields its state.json; `down` afterwards."""
    local = local_sh(cluster_dir)
    subprocess.run([*local, "up", str(workers), *args], check=True, timeout=300)
    state = json.loads((cluster_dir / "state.json").read_text())
    try:
        yield state
    finally:
        subprocess.run([*local, "down"], check=True, timeout=120)
        shutil.rmtree(state["ray_tmp"], ignore_errors=True)  # Ray's session files and logs


def node_address(state: dict, group: str) -> str:
    """The address a recorded process group belongs to: MLflow runs on the head's."""
    return state["ips"][int(group.removeprefix("worker"))] if group.startswith("worker") else state["ips"][0]


def listeners(state: dict) -> list[tuple[str, str, str, int]]:
    """(group, process name, address, port) of every listening TCP and bound UDP socket of every process
    in the cluster's recorded process groups, and of their descendants (job drivers start sessions of
    their own). IPv4-mapped IPv6 addresses are given as IPv4."""
    found = []
    for group, pgid in state["pgids"].items():
        procs = {}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == pgid:
                    procs[p.pid] = p
                    procs.update({c.pid: c for c in p.children(recursive=True)})
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                name = p.name()
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and c.laddr):
                        found.append((group, name, c.laddr.ip.removeprefix("::ffff:"), c.laddr.port))
    return found
