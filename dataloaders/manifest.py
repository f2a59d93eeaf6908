"""Where a converted split lives and what its manifest says.

Layout under a converted root (the `--out` of `dataloaders.convert`):
    wds:  <root>/<split>/manifest.json, <root>/<split>/<split>-000000.tar, ...
    ffcv: <root>/<split>.beton, <root>/<split>.manifest.json
A root is a local folder, a URL that fsspec opens (`https://...`, `s3://...`), or `pipe:CMD` where `{}` in
CMD stands for the file's path below the root (`pipe:aws s3 cp s3://bucket/imnet/{} -`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

# Eval split names are interchangeable: CIFAR and digits ship 'test', ImageNet ships 'val'.
_ALIASES = {"val": "test", "test": "val"}


def is_remote(root: str) -> bool:
    return root.startswith("pipe:") or ("://" in root and not root.startswith("file://"))


def resolve(root: str, rel: str) -> str:
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise ValueError(f"pipe: root {root!r} needs '{{}}' where the file path goes")
        return root.replace("{}", rel)
    if is_remote(root):
        return root.rstrip("/") + "/" + rel
    return os.path.join(root.removeprefix("file://"), rel)


def open_remote(url: str):
    """A readable binary stream for a URL or `pipe:` command."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    # block_size 0: one plain GET read front to back, no size probe or range requests
    http = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, "rb", **http).open()


def manifest_rel(split: str, fmt: str) -> str:
    return f"{split}/manifest.json" if fmt == "wds" else f"{split}.manifest.json"


def read_manifest(root: str, split: str, fmt: str) -> dict:
    """The manifest of `split` ('val' and 'test' stand in for each other); clear error when missing."""
    tried = []
    for name in (split, _ALIASES.get(split)):
        if name is None:
            continue
        url = resolve(root, manifest_rel(name, fmt))
        try:
            if is_remote(root):
                with open_remote(url) as f:
                    manifest = json.load(f)
            else:
                manifest = json.loads(Path(url).read_text())
        except (OSError, ValueError) as e:  # a pipe: command reports a missing file only as bad output
            tried.append(f"{url} ({type(e).__name__}: {e})")
            continue
        if manifest.get("format") != fmt:
            raise ValueError(f"{url} describes a {manifest.get('format')!r} conversion, not {fmt!r}")
        return manifest
    raise FileNotFoundError(f"no converted {split!r} split for format {fmt!r}: tried {tried}. Run "
                            f"`python -m dataloaders.convert ... --format {fmt} --out {root}` (a split "
                            "without a manifest is an unfinished conversion; re-running it resumes)")


def write_json(path: str | Path, obj) -> None:
    """Write atomically, so an interrupted conversion never leaves half a manifest behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, size: int, sha256: str) -> Path:
    """Download `url` to `dest` once; verified against the manifest so a cut-off transfer is never used."""
    if dest.exists() and dest.stat().st_size == size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    with open_remote(url) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)
    got, got_size = sha256_file(tmp), tmp.stat().st_size
    if got_size != size or got != sha256:
        tmp.unlink()
        raise OSError(f"{url}: downloaded {got_size} bytes with sha256 {got}, "
                      f"manifest says {size} bytes, sha256 {sha256}; the remote copy is truncated or stale")
    os.replace(tmp, dest)  # concurrent downloaders on one node both write complete, identical files
    return dest
