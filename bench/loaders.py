"""Data-loading throughput: decode + RandomResizedCrop 224 + flip (+ normalise), side by side.

    python -m bench.loaders [--classes 10 --per-class 100 --workers 2 --epochs 5 --max-side 512]

First every JPEG decoder of `data.decoder`, and the decoders that crop (data.window_decode: decode only the
RandomResizedCrop's window, deepspike_jpeg; data.reduced_decode: decode at a reduced scale when the crop allows
it, libjpeg-turbo's scaled DCT through simplejpeg; as probes OpenCV's and PIL's draft mode), decodes the
stored JPEGs and crops them in one process on one core, against torchvision's decoder.

Writes an ImageNet-layout folder of real JPEGs with ImageNet-like sizes (long side 300-500 px), converts it
with `dataloaders.convert` (wds; ffcv jpg; ffcv raw at --max-side), and reads the same images through:
- torchvision ImageFolder + DataLoader (PIL decode, transforms v2): the baseline
- the WebDataset path: build_loader(format='wds') as configured by default (window decode), with the
  whole-image decode of the default decoder and of torchvision's, with data.reduced_decode, and with
  data.access=stream reading the shards from a local HTTP server on 127.0.0.1 (its thread is counted)
- the FFCV path: build_loader(format='ffcv') on the JPEG and on the raw .beton
Every path gets the same worker count (worker processes, or FFCV threads) and batch size, one untimed
warm-up pass (worker start-up, FFCV's JIT), then --epochs timed passes, interleaved across the paths; each
keeps its best. images/s/core divides the images by the CPU seconds all the loader's processes and threads
spent (what the targets mean, and far less sensitive to other load on the machine than wall-clock images/s,
printed beside it with the load average). The deepspike paths stop at uint8 batches (the trainer normalises
on its device); the cost of that normalisation on a CPU device is printed on its own. FFCV recompiles its
seeded crop at each new epoch; that one-off cost is printed separately (the timed passes replay one epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import io
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torchvision import datasets
from torchvision.transforms import v2

from dataloaders import DataConfig, build_loader
from dataloaders.config import DECODERS
from dataloaders.convert import convert
from dataloaders.datasets.imagenet import MEAN as IMAGENET_MEAN
from dataloaders.datasets.imagenet import STD as IMAGENET_STD
from dataloaders.decoders import DecoderCrop, get_decoder
from dataloaders.synthetic import imagenet

WDS_TARGET, FFCV_TARGET = 800, 1.5
"""The data issue's targets: images/s per core on the wds path; FFCV jpg per core as a multiple of wds."""
WDS, FFCV_JPG = "wds random, window decode (default)", "FFCV jpg (deepspike ffcv)"


def _cpu_seconds() -> tuple[float, float]:
    """User + system seconds of (this process with its threads, its worker processes)."""
    me, workers = psutil.Process(), 0.0
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            workers += sum(child.cpu_times()[:2])
    return sum(me.cpu_times()[:2]), workers


def _interleaved_best(runs: dict, rounds: int, score) -> dict:
    """name -> the best by `score` of `rounds` results of runs[name](). Rounds interleave the runs: load
    from other processes on a shared machine then slows all of them alike instead of whichever happened to
    run during it."""
    best: dict = {}
    for _ in range(rounds):
        for name, run in runs.items():
            result = run()
            if name not in best or score(result) > score(best[name]):
                best[name] = result
    return best


def _measure(paths: dict, rounds: int) -> dict[str, tuple[int, float, float, float]]:
    """name -> (images, wall seconds, CPU seconds in all, of them in the main process) of the best of
    `rounds` interleaved passes (by images per CPU second), after one warm-up pass each. Padding rows (label
    -1: stream mode fills its last batch with them) are not images."""
    def one_pass(passes) -> tuple[int, float, float, float]:
        (main, workers), t = _cpu_seconds(), time.perf_counter()
        n = sum(int((y >= 0).sum()) for _, y in passes())
        wall, (main_end, workers_end) = time.perf_counter() - t, _cpu_seconds()
        return n, wall, main_end - main + workers_end - workers, main_end - main

    for passes in paths.values():
        sum(len(y) for _, y in passes())
    return _interleaved_best({name: functools.partial(one_pass, passes) for name, passes in paths.items()},
                             rounds, lambda row: row[0] / row[2])


def _normalize_rate(batch: int, epochs: int) -> float:
    """images/s on one core of the loader's normalize on a CPU device: what `Loader.to_model` adds to the
    training process when there is no GPU (on one, it runs there)."""
    from dataloaders.transforms import Normalize

    torch.set_num_threads(1)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    x, y = torch.zeros(batch, 3, 224, 224, dtype=torch.uint8), torch.zeros(batch, dtype=torch.int64)
    t = time.process_time()
    for _ in range(10 * epochs):
        norm(x, y)
    return 10 * epochs * batch / (time.process_time() - t)


def _baseline(root: Path, batch: int, workers: int):
    tf = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / "train", tf), batch_size=batch,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=True)
    return lambda: loader


def _scaled(name: str):
    """decode(bytes, factor) at 1/factor of the stored size (factor 1, 2, 4 or 8) with OpenCV or PIL: probes
    beside `decoders.decode_reduced` (simplejpeg), which data.reduced_decode uses."""
    import cv2
    import numpy as np
    from PIL import Image

    if name == "opencv":
        flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}

        def decode(data, f):
            return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flags[f]), cv2.COLOR_BGR2RGB)
    else:
        def decode(data, f):
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (math.ceil(im.width / f), math.ceil(im.height / f)))
                return np.array(im.convert("RGB"))
    return lambda data, f: torch.from_numpy(decode(data, f)).permute(2, 0, 1)


def _then(decode, ops):
    return lambda data: ops(decode(data))


def _decoder_rows(files: list[bytes], epochs: int) -> list[tuple[str, float]]:
    """(name, images/s on one core) for decode + crop + flip of every file: the best of `epochs` rounds."""
    torch.set_num_threads(1)
    crop_flip = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    runs = []
    for name in DECODERS:
        try:
            runs.append((name, _then(get_decoder(name), crop_flip)))
        except ValueError as e:
            print(f"decoder {name} skipped: {e}")
    runs.append(("window (window_decode, the train default)", DecoderCrop(224, flip=True, reduce=False,
                                                                          window=True)))
    runs.append(("window + reduced (+ reduced_decode)", DecoderCrop(224, flip=True, window=True)))
    runs.append(("simplejpeg reduced (reduced_decode only)", DecoderCrop(224, flip=True)))
    for name in ("opencv", "pil"):
        with contextlib.suppress(ImportError):
            runs.append((f"{name}, reduced scale", DecoderCrop(224, flip=True, decode=_scaled(name))))
    for _, run in runs:  # warm-up
        for data in files:
            run(data)
    def rate(run) -> float:
        t = time.process_time()
        for data in files:
            run(data)
        return len(files) / (time.process_time() - t)

    return list(_interleaved_best({name: functools.partial(rate, run) for name, run in runs}, epochs,
                                  lambda r: r).items())


@contextlib.contextmanager
def _http(root: Path):
    """http://127.0.0.1:PORT serving `root`, for data.access=stream."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _ours(cfg: DataConfig):
    loader = build_loader(cfg, "train", 0, 1)

    def passes():
        loader.set_epoch(1)  # replay the same epoch: no FFCV recompilation inside the timed passes
        return loader

    return loader, passes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loaders", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-side", type=int, default=512)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loaders_"))
    load = [os.getloadavg()[0]]
    try:
        t = time.perf_counter()
        src = imagenet(tmp / "src", a.classes, a.per_class, min_side=300, max_side=500)
        convert("imagenet", tmp / "wds", "wds", src, max_side=a.max_side, workers=a.workers)
        for mode in ("jpg", "raw"):
            convert("imagenet", tmp / f"ffcv_{mode}", "ffcv", src, max_side=a.max_side, write_mode=mode,
                    workers=a.workers)
        print(f"prepared {a.classes * a.per_class} JPEGs and 3 conversions in "
              f"{time.perf_counter() - t:.0f} s")

        files = [f.read_bytes() for f in sorted((tmp / "src" / "train").glob("*/*"))]
        decoders = _decoder_rows(files, a.epochs)
        normalize = _normalize_rate(a.batch_size, a.epochs)
        base = DataConfig(dataset="imagenet", batch_size=a.batch_size, num_workers=a.workers, image_size=224,
                          auto_augment=False, hflip=True)
        paths, ffcv = {"torchvision ImageFolder + DataLoader": _baseline(src, a.batch_size, a.workers)}, []
        with _http(tmp / "wds") as url:
            for name, fmt, path, extra in (
                    (WDS, "wds", str(tmp / "wds"), {}),
                    (f"wds random, whole image, {base.decoder}", "wds", str(tmp / "wds"), {"window_decode": False}),
                    ("wds random, torchvision", "wds", str(tmp / "wds"),
                     {"window_decode": False, "decoder": "torchvision"}),
                    ("wds stream over HTTP, window decode", "wds", url, {"access": "stream"}),
                    ("wds random, + data.reduced_decode", "wds", str(tmp / "wds"), {"reduced_decode": True}),
                    (FFCV_JPG, "ffcv", str(tmp / "ffcv_jpg"), {}),
                    ("FFCV jpg, 1 thread", "ffcv", str(tmp / "ffcv_jpg"), {"num_workers": 1}),
                    ("FFCV raw (deepspike ffcv)", "ffcv", str(tmp / "ffcv_raw"), {})):
                loader, paths[name] = _ours(dataclasses.replace(base, format=fmt, path=path, **extra))
                if fmt == "ffcv":
                    ffcv.append(loader)
            rows = _measure(paths, a.epochs)
        recompile = 0.0
        for loader in ffcv:
            loader.set_epoch(2)
            t = time.perf_counter()
            next(iter(loader))
            recompile = max(recompile, time.perf_counter() - t)
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    old = dict(decoders)["torchvision"]
    print(f"\ndecode + RandomResizedCrop 224 + flip, one process on one core, {len(files)} JPEGs, best of "
          f"{a.epochs} interleaved rounds")
    print(f"{'decoder':38} {'images/s/core':>14} {'vs torchvision':>15}")
    for name, rate in decoders:
        print(f"{name:38} {rate:14.0f} {rate / old:14.2f}x")

    n, wall, cpu, _ = rows[WDS]
    wds_rate, wds_wall = n / cpu, n / wall
    print(f"\n{a.workers} workers, batch {a.batch_size}, the best of {a.epochs} interleaved passes over "
          f"{a.classes * a.per_class} images (long side 300-500 px, stored at <= {a.max_side} px); load average "
          f"{load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} CPUs")
    print("CPU s: all the path's processes and threads; main: of them the loading process (FFCV's threads run "
          "there). The ImageFolder baseline normalises in its workers; the deepspike paths hand over uint8, "
          "normalised on the training device")
    print(f"{'path':38} {'images':>7} {'wall s':>7} {'images/s':>9} {'vs wds':>7} {'CPU s':>7} {'main':>6} "
          f"{'images/s/core':>14} {'vs wds':>7}")
    for name, (n, wall, cpu, main) in rows.items():
        print(f"{name:38} {n:7d} {wall:7.2f} {n / wall:9.0f} {n / wall / wds_wall:6.2f}x {cpu:7.2f} {main:6.2f} "
              f"{n / cpu:14.0f} {n / cpu / wds_rate:6.2f}x")
    print(f"normalise a uint8 batch on a CPU device (Loader.to_model without a GPU): {normalize:.0f} images/s/core")
    n, _, cpu, _ = rows[FFCV_JPG]
    ffcv_ratio = n / cpu / wds_rate
    print(f"targets: wds >= {WDS_TARGET} images/s/core: {wds_rate:.0f} "
          f"({'met' if wds_rate >= WDS_TARGET else 'missed'}); FFCV jpg >= {FFCV_TARGET}x wds: {ffcv_ratio:.2f}x "
          f"({'met' if ffcv_ratio >= FFCV_TARGET else 'missed'})")
    print(f"FFCV first batch of a new epoch (pipeline recompiled for the epoch's seed): {recompile:.1f} s")


if __name__ == "__main__":
    main()
