"""The offline wheel bundle for a GPU machine without network access, and the rehearsal venv that stands in
for that machine here (bench/gpu_check.sh --bundle DIR / --rehearse).

    python -m bench.gpu_check.bundle build DIR [--python-version 3.12]
    python -m bench.gpu_check.bundle machine-venv DIR
    python -m bench.gpu_check.bundle pins            # the install's constraints: what this Python came with

`build` writes into DIR the wheels of what the check's stages import that the GPU machine lacks, for that
machine's Python, binary wheels only: DeepSpeed built here without its compiled ops (a pure-Python wheel: the
ops it would JIT are not used), its dependencies, webdataset and wids, simplejpeg, SpikingJelly (without its
dependencies, as the Makefile installs it) and mlflow-skinny, with what pip resolves for them, less what
the GPU machine has preinstalled (`PREINSTALLED`: never torch, triton or a second numpy). The versions are
the ones this checkout's venv runs. DIR/requirements.txt names what to install; the machine runs
`pip install --no-index --find-links DIR -r DIR/requirements.txt` and then SpikingJelly with --no-deps.
At most `MAX_MIB`; prints the size and each wheel.

`machine-venv` makes a venv of this machine's Python that holds, of what is installed here, only the GPU
machine's preinstalled packages and their dependencies (torch and torchvision among them): a folder of
symlinks to them (DIR/preinstalled), named by a .pth file. A 5.5 GB reinstall of torch would take minutes;
the symlinks make the same set of importable packages in seconds, and pip sees their metadata there, so it
installs the bundle against them as it would on the GPU machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

# The GPU machine's image (issue 20): these are there, so the bundle must not hold them.
PREINSTALLED = ("torch", "triton", "torchvision", "numpy", "numba", "cupy-cuda13x", "opencv-python-headless",
                "pillow", "psutil", "pytest", "pyyaml", "tqdm", "requests", "fsspec", "pyarrow", "msgpack",
                "grpcio", "protobuf", "timm")
# What the stages import beyond that: DeepSpeed's dependencies (DeepSpeed itself is built here), the data
# path's, SpikingJelly's LIF (bench.lif, tests) and MLflow's client.
RESOLVED = ("hjson", "pydantic", "einops", "py-cpuinfo", "ninja", "packaging", "webdataset", "wids",
            "simplejpeg", "loguru", "mlflow-skinny")
# SpikingJelly requires torchaudio, tensorboard, scipy, h5py...; its LIF needs only loguru (above).
NO_DEPS = ("spikingjelly",)
MAX_MIB = 60
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64", "linux_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(name: str) -> str:
    """`name==version` as installed here; mlflow-skinny follows the mlflow this venv has."""
    for dist in (name, "mlflow") if name == "mlflow-skinny" else (name,):
        try:
            return f"{name}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    raise SystemExit(f"bundle: {name} is not installed here, so there is no version to pin it to")


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True,
                   env=env)


def build(out: Path, python_version: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
              *(f"--platform={p}" for p in PLATFORMS)]
    _pip("download", "-d", str(out), *target, *(pinned(n) for n in RESOLVED))
    _pip("download", "-d", str(out), "--no-deps", *target, *(pinned(n) for n in NO_DEPS))
    # No wheel cache: the cached DeepSpeed wheel is the one built with its shm op for this Python (Makefile).
    env = dict(os.environ, DS_BUILD_OPS="0", DS_BUILD_SHM_COMM="0", PIP_NO_CACHE_DIR="1")
    _pip("wheel", "-w", str(out), "--no-deps", "--no-build-isolation", pinned("deepspeed"), env=env)
    skip = {canonical(n) for n in PREINSTALLED}
    wheels = []
    for whl in sorted(out.glob("*.whl")):
        if canonical(whl.name.split("-")[0]) in skip:
            whl.unlink()
        else:
            wheels.append(whl)
    (out / "requirements.txt").write_text("\n".join([pinned("deepspeed"), *(pinned(n) for n in RESOLVED)]) + "\n")
    (out / "no-deps.txt").write_text("\n".join(pinned(n) for n in NO_DEPS) + "\n")
    size = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"bundle {out}: {len(wheels)} wheels, {size / 2**20:.1f} MiB for Python {python_version} "
          f"(at most {MAX_MIB} MiB)", flush=True)
    if size > MAX_MIB * 2**20:
        raise SystemExit(f"bundle: {size / 2**20:.1f} MiB is over {MAX_MIB} MiB")
    return wheels


def closure(names: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions `names` need, with their dependencies and the extras those ask for (torch
    asks for cuda-toolkit[cublas,...]); names not installed here are reported and left out."""
    from packaging.requirements import Requirement  # not at import time: `pins` runs before any install

    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(n, "") for n in names]
    while todo:
        name, extra = todo.pop()
        name = canonical(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in {canonical(n) for n in names}:
                print(f"machine-venv: {name} is not installed here; the rehearsal goes without it", file=sys.stderr)
            continue
        seen[name] = dist
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return list(seen.values())


def pins() -> list[str]:
    """`name==version` of each preinstalled package this Python has: the install's constraints, so that pip
    fails rather than replace the machine's torch (or anything else it came with) to fit the bundle."""
    out = []
    for name in PREINSTALLED:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_venv(venv: Path) -> Path:
    """The venv's python; see the module's doc."""
    if venv.exists():
        shutil.rmtree(venv)
    # Without its own pip and setuptools: those of this venv come through the symlinks (torch requires a
    # setuptools newer than the one ensurepip gives), as the GPU machine's come with its Python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib"))
    folder = venv / "preinstalled"
    folder.mkdir()
    for dist in closure((*PREINSTALLED, "pip")):
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = site / top
            if (src.exists() or src.is_symlink()) and not (folder / top).exists() and top != "__pycache__":
                (folder / top).symlink_to(src)
    py = venv / "bin/python"
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    (Path(venv_site) / "gpu_machine_preinstalled.pth").write_text(f"{folder}\n")
    return py


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the wheel bundle")
    b.add_argument("dir", type=Path)
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    v = sub.add_parser("machine-venv", help="a venv holding only the GPU machine's preinstalled packages")
    v.add_argument("dir", type=Path)
    sub.add_parser("pins", help="print name==version of the preinstalled packages this Python has")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.cmd == "build":
        build(a.dir.resolve(), a.python_version)
    elif a.cmd == "machine-venv":
        print(machine_venv(a.dir.resolve()))
    else:
        print("\n".join(pins()))


if __name__ == "__main__":
    main()
