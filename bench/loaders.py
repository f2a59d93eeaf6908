"""Data-loading throughput: decode + RandomResizedCrop 224 + flip + normalise, side by side.

    python -m bench.loaders [--classes 10 --per-class 40 --workers 2 --epochs 3 --max-side 512]

Writes an ImageNet-layout folder of real JPEGs with ImageNet-like sizes (long side 300-500 px), converts it
with `dataloaders.convert` (wds; ffcv jpg; ffcv raw at --max-side), and reads the same images through:
- torchvision ImageFolder + DataLoader (PIL decode, transforms v2): the baseline
- the WebDataset path: build_loader(format='wds')
- the FFCV path: build_loader(format='ffcv') on the JPEG and on the raw .beton
Every path gets the same worker count (worker processes, or FFCV threads) and batch size, one untimed
warm-up pass (worker start-up, FFCV's JIT), then --epochs timed passes. images/s/core divides the images
by the CPU seconds all the loader's processes and threads spent (so other load on the machine does not
distort it); images/s is plain wall-clock throughput. FFCV recompiles its seeded crop at each new epoch;
that one-off cost is printed separately (the timed passes replay one epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torchvision import datasets
from torchvision.transforms import v2

from dataloaders import DataConfig, build_loader
from dataloaders.convert import convert
from dataloaders.datasets.imagenet import MEAN as IMAGENET_MEAN
from dataloaders.datasets.imagenet import STD as IMAGENET_STD
from dataloaders.synthetic import imagenet


def _cpu_seconds() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            total += sum(child.cpu_times()[:2])
    return total


def _measure(passes, epochs: int) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) over `epochs` timed passes after one warm-up pass."""
    sum(len(y) for _, y in passes())
    cpu, t = _cpu_seconds(), time.perf_counter()
    n = sum(len(y) for _ in range(epochs) for _, y in passes())
    return n, time.perf_counter() - t, _cpu_seconds() - cpu


def _baseline(root: Path, batch: int, workers: int):
    tf = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / "train", tf), batch_size=batch,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=True)
    return lambda: loader


def _ours(cfg: DataConfig):
    loader = build_loader(cfg, "train", 0, 1)

    def passes():
        loader.set_epoch(1)  # replay the same epoch: no FFCV recompilation inside the timed passes
        return loader

    return loader, passes


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.loaders", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-side", type=int, default=512)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loaders_"))
    try:
        t = time.perf_counter()
        src = imagenet(tmp / "src", a.classes, a.per_class, min_side=300, max_side=500)
        convert("imagenet", tmp / "wds", "wds", src, max_side=a.max_side, workers=a.workers)
        for mode in ("jpg", "raw"):
            convert("imagenet", tmp / f"ffcv_{mode}", "ffcv", src, max_side=a.max_side, write_mode=mode,
                    workers=a.workers)
        print(f"prepared {a.classes * a.per_class} JPEGs and 3 conversions in "
              f"{time.perf_counter() - t:.0f} s")

        base = DataConfig(dataset="imagenet", batch_size=a.batch_size, num_workers=a.workers, image_size=224,
                          auto_augment=False, hflip=True)
        rows = [("torchvision ImageFolder + DataLoader", _measure(_baseline(src, a.batch_size, a.workers),
                                                                  a.epochs))]
        recompile = 0.0
        for name, fmt, path in (("WebDataset (deepspike wds)", "wds", "wds"),
                                ("FFCV jpg (deepspike ffcv)", "ffcv", "ffcv_jpg"),
                                ("FFCV raw (deepspike ffcv)", "ffcv", "ffcv_raw")):
            cfg = dataclasses.replace(base, format=fmt, path=str(tmp / path))
            loader, passes = _ours(cfg)
            rows.append((name, _measure(passes, a.epochs)))
            if fmt == "ffcv":
                loader.set_epoch(2)
                t = time.perf_counter()
                next(iter(loader))
                recompile = max(recompile, time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    wds_rate = rows[1][1][0] / rows[1][1][2]
    print(f"\n{a.workers} workers, batch {a.batch_size}, {a.epochs} timed passes over "
          f"{a.classes * a.per_class} images (long side 300-500 px, stored at <= {a.max_side} px)")
    print(f"{'path':38} {'images':>7} {'wall s':>7} {'images/s':>9} {'CPU s':>7} {'images/s/core':>14} "
          f"{'vs wds':>7}")
    for name, (n, wall, cpu) in rows:
        print(f"{name:38} {n:7d} {wall:7.2f} {n / wall:9.0f} {cpu:7.2f} {n / cpu:14.0f} "
              f"{n / cpu / wds_rate:6.2f}x")
    print(f"FFCV first batch of a new epoch (pipeline recompiled for the epoch's seed): {recompile:.1f} s")


if __name__ == "__main__":
    main()
