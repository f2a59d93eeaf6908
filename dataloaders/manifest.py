"""Where a converted split lives and what its manifest says.

Layout under a converted root (the `--out` of `dataloaders.convert`):
    wds:  <root>/<split>/manifest.json, <root>/<split>/<split>-000000.tar, ...
    ffcv: <root>/<split>.beton, <root>/<split>.manifest.json
A root is a local folder, a URL that fsspec opens (`https://...`, `s3://...`), or `pipe:CMD` where `{}` in
CMD stands for the file's path below the root (`pipe:aws s3 cp s3://bucket/imnet/{} -`), shell-quoted.

A manifest is input like any other: `read_manifest` checks every field the loaders use (names, splits,
counts, sizes, hashes) before any of it reaches a path or a shell, and names the first bad field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
from pathlib import Path

log = logging.getLogger(__name__)
# Eval split names are interchangeable: CIFAR and digits ship 'test', ImageNet ships 'val'.
_ALIASES = {"val": "test", "test": "val"}
SPLITS = ("train", "val", "test")
_EXTS = ("jpg", "png", "npy.gz")


def is_remote(root: str) -> bool:
    return root.startswith("pipe:") or ("://" in root and not root.startswith("file://"))


def resolve(root: str, rel: str) -> str:
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise ValueError(f"pipe: root {root!r} needs '{{}}' where the file path goes")
        # `rel` comes from a manifest: quoted, so a name can never become shell syntax
        return root.replace("{}", shlex.quote(rel))
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
        if not isinstance(manifest, dict) or manifest.get("format") != fmt:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise ValueError(f"{url} describes a {got!r} conversion, not {fmt!r}")
        validate_manifest(manifest, name, url)
        return manifest
    raise FileNotFoundError(f"no converted {split!r} split for format {fmt!r}: tried {tried}. Run "
                            f"`python -m dataloaders.convert ... --format {fmt} --out {root}` (a split "
                            "without a manifest is an unfinished conversion; re-running it resumes)")


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _real(v) -> bool:
    """A finite int or float (json.loads reads NaN and Infinity as floats)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_manifest(m: dict, split: str, url: str) -> None:
    """Raise ValueError naming the first field of manifest `m` (read as `split`) that is not what
    `dataloaders.convert` writes: file names become paths and `pipe:` arguments, counts become plans."""

    def bad(field: str, value, want: str):
        raise ValueError(f"{url}: manifest field {field}={value!r} is invalid ({want}); the manifest is corrupt "
                         "or was not written by dataloaders.convert; convert the data set again")

    if m.get("split") != split or split not in SPLITS:
        bad("split", m.get("split"), f"expected {split!r}, one of {SPLITS}")
    if not _nonneg_int(m.get("num_samples")):
        bad("num_samples", m.get("num_samples"), "a non-negative integer")
    classes = m.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        bad("classes", classes, "a non-empty list of names")
    if not isinstance(m.get("dataset"), str):
        bad("dataset", m.get("dataset"), "a data set name")
    sample = m.get("sample")
    if not isinstance(sample, dict) or sample.get("kind") not in ("image", "frames"):
        bad("sample", sample, "{'kind': 'image' or 'frames', ...}")
    shape = sample.get("shape")
    if shape is not None and not (isinstance(shape, list) and shape and
                                  all(_nonneg_int(d) and d > 0 for d in shape)):
        bad("sample.shape", shape, "null or a list of positive integers")
    if "stats" in m:  # measured at conversion; normalises every batch and picks the folder augmentation
        stats = m["stats"]
        if not isinstance(stats, dict):
            bad("stats", stats, "{'mean': ..., 'std': ..., 'median_short_side': ...}")
        for key, low in (("mean", 0.0), ("std", 1e-6)):  # pixels scaled to 0..1; a std of 0 divides by zero
            v = stats.get(key)
            if not (isinstance(v, list) and len(v) == 3 and all(_real(x) and low <= x <= 1 for x in v)):
                bad(f"stats.{key}", v, f"3 numbers in [{low:g}, 1], one per RGB channel")
        if not (_nonneg_int(stats.get("median_short_side")) and stats["median_short_side"] > 0):
            bad("stats.median_short_side", stats.get("median_short_side"), "a positive integer")
    if m["format"] == "ffcv":
        if m.get("file") != f"{split}.beton":
            bad("file", m.get("file"), f"'{split}.beton'")
        if not _nonneg_int(m.get("num_records")):
            bad("num_records", m.get("num_records"), "a non-negative integer")
        skipped = m.get("skipped")
        if not isinstance(skipped, list) or not all(isinstance(x, dict) for x in skipped):
            bad("skipped", skipped, "a list of {'index': ...}")
        indices = [x.get("index") for x in skipped]
        for k, i in enumerate(indices):
            if not _nonneg_int(i) or i >= m["num_records"]:
                bad(f"skipped[{k}].index", i, f"a record index below num_records={m['num_records']}")
        if len(set(indices)) + m["num_samples"] != m["num_records"]:
            bad("num_samples", m["num_samples"], f"num_records={m['num_records']} less the "
                f"{len(set(indices))} skipped records")
        return
    if sample.get("ext") not in _EXTS:
        bad("sample.ext", sample.get("ext"), f"one of {_EXTS}")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(s, dict) for s in shards):
        bad("shards", shards, "a non-empty list of shard records")
    # [0-9], not \d (which also takes other scripts' digits): no separators, no '..', nothing a shell reads
    name_re = re.compile(rf"{split}-[0-9]{{6}}\.tar")
    for k, s in enumerate(shards):
        if not isinstance(s.get("name"), str) or not name_re.fullmatch(s["name"]):
            bad(f"shards[{k}].name", s.get("name"), f"'{split}-NNNNNN.tar'")
        for key in ("num_samples", "bytes"):
            if not _nonneg_int(s.get(key)):
                bad(f"shards[{k}].{key}", s.get(key), "a non-negative integer")
        if "sha256" in s and not (isinstance(s["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])):
            bad(f"shards[{k}].sha256", s["sha256"], "64 lowercase hex digits")
    if len({s["name"] for s in shards}) != len(shards):
        bad("shards", [s["name"] for s in shards], "each shard once")
    total = sum(s["num_samples"] for s in shards)
    if total != m["num_samples"]:
        bad("num_samples", m["num_samples"], f"the shards' num_samples sum to {total}")


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


class ShardMismatch(OSError):
    """A shard's bytes that differ from its manifest record (more bytes, fewer, or another sha256): stale or
    tampered data, which reading again does not fix."""


class VerifiedReader:
    """Reads of a shard's stream that hash the bytes as they pass and never go more than one byte past the
    manifest's size (ShardMismatch there), so a remote that sends more cannot fill a disk or memory;
    `finish` reads what is left (tar padding) and checks the size and, where the manifest has one, the
    sha256."""

    def __init__(self, f, url: str, size: int, sha256: str | None):
        self.f, self.url, self.size, self.sha256 = f, url, size, sha256
        self.count, self.hash = 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        left = self.size + 1 - self.count
        data = self.f.read(left if n is None or n < 0 else min(n, left)) if left > 0 else b""
        self.count += len(data)
        self.hash.update(data)
        if self.count > self.size:
            raise ShardMismatch(f"{self.url}: more than the manifest's {self.size} bytes (reading stopped there); "
                                "the remote copy is not the shard the manifest describes")
        return data

    def finish(self) -> None:
        while self.read(1 << 22):
            pass
        got = self.hash.hexdigest()
        if self.count != self.size or (self.sha256 is not None and got != self.sha256):
            raise ShardMismatch(f"{self.url}: read {self.count} bytes with sha256 {got}, the manifest says "
                                f"{self.size} bytes, sha256 {self.sha256}; the remote copy is truncated or stale")


def fetch(url: str, dest: Path, size: int, sha256: str) -> Path:
    """Download `url` to `dest` once, hashing on the way and stopping one byte past the manifest's size, so
    a cut-off or oversized transfer is never used. A cached copy is used only when its sha256 matches; a
    stamp beside it spares re-hashing it while the file is unchanged (any write to it moves its ctime, which
    the stamp records). A copy that no longer matches is fetched again."""
    if dest.exists():
        if _cached_copy_matches(dest, size, sha256):
            return dest
        log.warning("%s: the cached copy does not match the manifest's size and sha256; fetching %s again",
                    dest, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    try:
        with open_remote(url) as src, open(tmp, "wb") as out:
            reader = VerifiedReader(src, url, size, sha256)
            while chunk := reader.read(1 << 22):
                out.write(chunk)
            reader.finish()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)  # concurrent downloaders on one node both write complete, identical files
    _stamp(dest, sha256)
    return dest


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _stamp(path: Path, sha256: str) -> None:
    write_json(path.with_name(path.name + ".verified"), {"sha256": sha256, "stat": _stat_key(path)})


def _cached_copy_matches(path: Path, size: int, sha256: str) -> bool:
    if path.stat().st_size != size:
        return False
    try:
        stamp = json.loads(path.with_name(path.name + ".verified").read_text())
        if stamp == {"sha256": sha256, "stat": _stat_key(path)}:
            return True
    except (OSError, ValueError):
        pass  # no stamp (or a cut-off one): hash the file
    if sha256_file(path) != sha256:
        return False
    _stamp(path, sha256)
    return True
