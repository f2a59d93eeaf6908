"""Convert a raw data set once into WebDataset shards or FFCV files that every rank then streams.

    python -m dataloaders.convert imagenet --src /data/imagenet --out /data/imagenet-wds --format wds \\
        --workers 32
    python -m dataloaders.convert imagenet --src /data/imagenet --out /data/imagenet-ffcv --format ffcv \\
        --max-side 512 --write-mode smart
    python -m dataloaders.convert cifar10 --src /data/cifar-10-batches-py --out /data/cifar-wds --format wds
    python -m dataloaders.convert cifar100 --src /data/cifar-100-python.tar.gz --out /data/cifar100-wds \\
        --format wds
    python -m dataloaders.convert cifar10dvs --src /data/CIFAR10-DVS --out /data/dvs-ffcv --format ffcv \\
        --frames 20
    python -m dataloaders.convert folder --src /data/flowers --out /data/flowers-wds --format wds
    python -m dataloaders.convert digits --out runs/digits-wds --format wds --size 32

Inputs: ImageNet-style `src/{train,val}/<wnid>/*.JPEG`; for `folder` any tree `src/{train,val}/<class>/*`
(any number of classes, any format PIL reads; its mean/std and median image size are measured on train and
stored in the manifests); CIFAR-10's `cifar-10-batches-py` folder or its `.tar.gz` and CIFAR-100's
`cifar-100-python` folder or its `.tar.gz` (both md5-checked; --no-verify-md5 for pickles you made);
CIFAR10-DVS class folders of `.aedat` recordings or the distributed class zips; digits need no input.

Output layout under --out (see `dataloaders.manifest`):
    wds:  <split>/manifest.json and <split>/<split>-000000.tar, ...: sample `<split>-<index:08d>` holds `.jpg`
          (ImageNet: the original JPEG when it is RGB and fits --max-side, else re-encoded), `.png` (CIFAR,
          digits: lossless) or `.npy.gz` (DVS: uint16 [T, 2, 128, 128] event counts), plus `.cls` and
          `.json` ({"source": ...}). Shards are byte-identical for the same input and options.
    ffcv: <split>.beton (fields `image`: RGBImageField with --max-side and --write-mode raw|jpg|smart, or
          `frames`: NDArrayField; `label`: IntField) and <split>.manifest.json.
Manifests hold the class list, sample counts, per-shard sizes and sha256, the options, and the bad inputs.

Resuming: wds shards are written to a temporary name and renamed when complete, and each finished shard is
recorded in <split>/progress.jsonl; re-running the same command keeps those shards and writes the rest.
An FFCV split is one file, so it resumes per split. Finished splits (with a manifest) are skipped.

Bad input: an undecodable or non-image file, or an unreadable recording, is skipped, logged and listed in
the manifest under "skipped" with --on-error skip (default), or stops the conversion with --on-error stop.
An empty class folder is listed under "issues" (skip) or stops. A missing CIFAR batch file, a truncated
archive or a CIFAR file that is not the published one (md5) always stops with a message naming the
file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import logging
import multiprocessing
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataloaders import sources
from dataloaders.config import FORMATS, ConvertConfig
from dataloaders.datasets import get_dataset, list_datasets
from dataloaders.manifest import manifest_rel, sha256_file, write_json
from dataloaders.sources import BadSample

log = logging.getLogger("dataloaders.convert")


class ConversionError(RuntimeError):
    """Conversion stopped on bad input (--on-error stop) or inconsistent earlier output."""


def convert(dataset: str, out: str | Path, fmt: str, src: str | Path | None = None,
            **options) -> dict[str, dict]:
    """Convert every split of `dataset` (a registry name) with `ConvertConfig` options; returns the
    manifests."""
    try:
        spec = get_dataset(dataset)
    except KeyError:
        spec = None
    if spec is None or fmt not in FORMATS:
        raise ValueError(f"unknown dataset {dataset!r} or format {fmt!r}")
    dataset = spec.name
    opts = ConvertConfig(**options)
    if src is None and spec.needs_src:
        raise ValueError(f"{dataset} needs --src")
    classes, splits = spec.read(src, opts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"stats": _train_stats(splits["train"], out, fmt, opts)} if spec.measured_stats else {}
    manifests = {}
    for name, split in splits.items():
        if not len(split):
            log.warning("%s: no samples, not written", name)
            continue
        done = out / manifest_rel(name, fmt)
        if done.exists():
            log.info("%s: already converted (%s); delete it to convert again", name, done)
            manifests[name] = json.loads(done.read_text())
            continue
        for issue in split.issues:
            if opts.on_error == "stop":
                raise ConversionError(f"{issue}; pass --on-error skip to convert anyway")
            log.warning("%s", issue)
        head = {"dataset": dataset, "split": name, "classes": classes,
                "source": str(Path(src).resolve()) if src else None,
                "options": dataclasses.asdict(opts) | {"workers": None}, "issues": split.issues, **stats}
        write = _write_wds if fmt == "wds" else _write_ffcv
        manifests[name] = write(split, name, out, opts, head)
        write_json(done, manifests[name])
        log.info("%s: %d samples, %d skipped -> %s", name, manifests[name]["num_samples"],
                 len(manifests[name]["skipped"]), done)
    return manifests


def _train_stats(split: sources.Split, out: Path, fmt: str, opts: ConvertConfig) -> dict:
    """Per-channel mean/std of the train images' 0..1 pixels and their median short side as stored (after
    --max-side), for every split's manifest; one extra decoding pass, skipped when the train split is
    already converted."""
    done = out / manifest_rel("train", fmt)
    if done.exists():
        return json.loads(done.read_text())["stats"]
    chunks = [(c, opts.max_side) for c in np.array_split(np.arange(len(split)), min(len(split), 4 * opts.workers))]
    if opts.workers > 1:
        with multiprocessing.get_context("fork").Pool(opts.workers, _init_worker, (split,)) as pool:
            parts = pool.map(_chunk_stats, chunks)
    else:
        _init_worker(split)
        parts = [_chunk_stats(c) for c in chunks]
    total, squares = sum(p[0] for p in parts), sum(p[1] for p in parts)
    count, sides = sum(p[2] for p in parts), [s for p in parts for s in p[3]]
    if not count:
        raise ConversionError(f"none of the {len(split)} train images is readable")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0))
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
            "median_short_side": int(np.median(sides))}


def _chunk_stats(task) -> tuple[np.ndarray, np.ndarray, int, list[int]]:
    indices, max_side = task
    total, squares, count, sides = np.zeros(3), np.zeros(3), 0, []
    for i in indices:
        try:
            image = _WORKER_SPLIT.load(int(i)).image
        except BadSample:  # reported (and skipped or stopped on) when the split is written
            continue
        px = np.asarray(image, np.float64).reshape(-1, 3) / 255
        total += px.sum(0)
        squares += np.square(px).sum(0)
        count += len(px)
        sides.append(round(min(image.size) * min(1.0, max_side / max(image.size))))
    return total, squares, count, sides


# ---------------------------------------------------------------- WebDataset


def _payload(sample: sources.Sample, opts: ConvertConfig) -> tuple[str, bytes]:
    if sample.frames is not None:
        buf = io.BytesIO()
        np.save(buf, sample.frames)
        return "npy.gz", gzip.compress(buf.getvalue(), mtime=0)
    if isinstance(sample.image, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        return "png", buf.getvalue()
    image = sample.image
    if sample.encoded is not None and max(image.size) <= opts.max_side:
        return "jpg", sample.encoded
    if max(image.size) > opts.max_side:
        scale = opts.max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return "jpg", buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and mtime: same input, same bytes
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tf.addfile(info, io.BytesIO(data))


_WORKER_SPLIT: sources.Split | None = None


def _init_worker(split):
    global _WORKER_SPLIT
    _WORKER_SPLIT = split


def _write_shard(task) -> dict:
    split_name, shard, indices, folder, opts = task
    split = _WORKER_SPLIT
    name = f"{split_name}-{shard:06d}.tar"
    tmp = folder / f".{name}.tmp{os.getpid()}"
    skipped, count = [], 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in indices:
            try:
                sample = split.load(i)
            except BadSample as e:
                if opts.on_error == "stop":
                    raise ConversionError(f"{e}; pass --on-error skip to skip such files") from e
                log.warning("skipping %s", e)
                skipped.append({"source": split.names[i], "reason": str(e)})
                continue
            key = f"{split_name}-{i:08d}"
            ext, data = _payload(sample, opts)
            _add(tf, f"{key}.{ext}", data)
            _add(tf, f"{key}.cls", str(sample.label).encode())
            _add(tf, f"{key}.json", json.dumps({"source": split.names[i]}).encode())
            count += 1
    os.replace(tmp, folder / name)
    return {"shard": shard, "name": name, "num_samples": count, "bytes": (folder / name).stat().st_size,
            "sha256": sha256_file(folder / name), "skipped": skipped, "samples": len(indices)}


def _finished_shards(folder: Path, head: dict) -> dict[int, dict]:
    """Shards recorded by an interrupted run with the same options, whose files are still complete."""
    progress = folder / "progress.jsonl"
    if not progress.exists():
        return {}
    lines = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    if lines[0] != {"options": head["options"]}:
        raise ConversionError(f"{folder} holds a partial conversion made with options {lines[0]}; re-run "
                              "with those options or convert into a fresh --out")
    done = {}
    for rec in lines[1:]:
        f = folder / rec["name"]
        if f.exists() and f.stat().st_size == rec["bytes"]:
            done[rec["shard"]] = rec
        else:
            log.warning("%s is missing or truncated; writing it again", f)
    return done


def _write_wds(split: sources.Split, name: str, out: Path, opts: ConvertConfig, head: dict) -> dict:
    folder = out / name
    folder.mkdir(exist_ok=True)
    for stale in folder.glob(".*.tmp*"):
        stale.unlink()
    done = _finished_shards(folder, head)
    progress = folder / "progress.jsonl"
    if not done:
        progress.write_text(json.dumps({"options": head["options"]}) + "\n")
    bounds = range(0, len(split), opts.shard_size)
    todo = [(name, k, range(a, min(a + opts.shard_size, len(split))), folder, opts)
            for k, a in enumerate(bounds) if k not in done]
    bar = tqdm(total=len(split), initial=sum(r["samples"] for r in done.values()), unit="sample", desc=name,
               disable=None)

    def record(rec):
        done[rec["shard"]] = rec
        with open(progress, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(rec["samples"])

    if opts.workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(opts.workers, _init_worker, (split,)) as pool:
            for rec in pool.imap_unordered(_write_shard, todo):
                record(rec)
    else:
        _init_worker(split)
        for task in todo:
            record(_write_shard(task))
    bar.close()
    shards = [done[k] for k in sorted(done)]
    kind = {"kind": split.kind, "ext": "npy.gz" if split.kind == "frames" else
            ("png" if isinstance(split, sources.ArraySplit) else "jpg")}
    manifest = {"format": "wds", **head, "sample": kind | _shape(split),
                "num_samples": sum(s["num_samples"] for s in shards),
                "shards": [{k: s[k] for k in ("name", "num_samples", "bytes", "sha256")} for s in shards],
                "skipped": [x for s in shards for x in s["skipped"]]}
    progress.unlink()
    return manifest


def _shape(split: sources.Split) -> dict:
    """The stored shape of every sample, where the data set has one (not for ImageNet)."""
    if split.kind == "frames":
        return {"shape": [split.frames, 2, 128, 128]}
    if isinstance(split, sources.ArraySplit):
        return {"shape": list(split.images.shape[1:])}
    return {"shape": None}


# ---------------------------------------------------------------- FFCV


class _FfcvView:
    """What FFCV's DatasetWriter indexes. Its worker processes cannot report failures, so a bad sample is
    written as a placeholder with label -1 and left out through the manifest."""

    def __init__(self, split: sources.Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            s = self.split.load(i)
        except BadSample as e:
            log.warning("skipping %s", e)
            if self.split.kind == "frames":
                return np.zeros((self.split.frames, 2, 128, 128), np.uint16), -1
            return np.zeros((1, 1, 3), np.uint8), -1
        return (s.frames if s.frames is not None else np.asarray(s.image)), s.label


def _write_ffcv(split: sources.Split, name: str, out: Path, opts: ConvertConfig, head: dict) -> dict:
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    if split.kind == "frames":
        field = NDArrayField(np.dtype(np.uint16), (split.frames, 2, 128, 128))
        biggest = split.frames * 2 * 128 * 128 * 2
    elif isinstance(split, sources.ArraySplit):  # small fixed-size images: raw pixels, read back exactly
        field = RGBImageField(write_mode="raw")
        biggest = split.images[0].nbytes
    else:
        field = RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_side,
                              smart_threshold=opts.smart_threshold, jpeg_quality=opts.jpeg_quality)
        biggest = opts.max_side**2 * 3
    page = 1 << max(21, int(2 * biggest).bit_length())  # a page must hold the biggest sample
    target = out / f"{name}.beton"
    tmp = out / f".{name}.beton.tmp"
    fields = {"frames" if split.kind == "frames" else "image": field, "label": IntField()}
    writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=opts.workers)
    writer.from_indexed_dataset(_FfcvView(split))
    bad = np.flatnonzero(Reader(str(tmp)).metadata["f1"] == -1)
    skipped = []
    for i in bad:
        try:
            split.load(int(i))
            reason = "failed while writing"
        except BadSample as e:
            reason = str(e)
        skipped.append({"source": split.names[i], "reason": reason, "index": int(i)})
    if skipped and opts.on_error == "stop":
        tmp.unlink()
        raise ConversionError(f"{len(skipped)} bad samples, first: {skipped[0]['reason']}; pass "
                              "--on-error skip to skip such files")
    os.replace(tmp, target)
    return {"format": "ffcv", **head, "sample": {"kind": split.kind} | _shape(split), "file": target.name,
            "num_samples": len(split) - len(skipped), "num_records": len(split),
            "bytes": target.stat().st_size, "sha256": sha256_file(target), "skipped": skipped,
            "options": head["options"] | {"page_size": page}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataloaders.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=list_datasets())
    p.add_argument("--src", help="raw data (not needed for digits)")
    p.add_argument("--out", required=True)
    p.add_argument("--format", required=True, choices=FORMATS)
    defaults = ConvertConfig()
    for f in dataclasses.fields(ConvertConfig):
        default, flag = getattr(defaults, f.name), f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(f"--{'no-' if default else ''}{flag}", dest=f.name, default=default,
                           action="store_false" if default else "store_true", help=f.metadata["help"])
        else:
            p.add_argument(f"--{flag}", type=type(default), default=default, choices=f.metadata.get("choices"),
                           help=f.metadata["help"])
    return p


def main(argv=None):
    a = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(a.pop("dataset"), a.pop("out"), a.pop("format"), a.pop("src"), **a)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
