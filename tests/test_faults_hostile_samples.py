"""Hostile samples inside shards that match their manifest: headers declaring huge images or arrays are a
counted skip refused before anything is allocated, for every decoder; bugs in the pipeline are not
mistaken for bad samples (docs/reliability.md).

The hostile files run in a forked child whose address space is capped a few GiB above what it holds, so a
decoder that did allocate what a header declares fails there instead of taking the shared machine's memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import multiprocessing
import resource
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import replace_members, reseal
from PIL import Image

from dataloaders import DataConfig, build_loader, synthetic
from dataloaders.config import DECODERS
from dataloaders.decoders import DecoderCrop, get_decoder

pytest_plugins = ["data_fixtures"]
_CAP = 3 << 30  # address space the child may add: far below the 12.9 GB a 65,500 x 65,500 header asks for


def _capped(fn, *args):
    """fn(*args) in a forked child whose address space may grow by _CAP only: (result, the warnings logged
    by the loader's sample reader), or the child's exception re-raised here as a RuntimeError naming it."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child():
        records = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage())
        logging.getLogger("dataloaders").addHandler(handler)
        vm = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmSize:"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + _CAP, resource.RLIM_INFINITY))
        try:
            queue.put(("ok", fn(*args), records))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            queue.put(("raised", f"{type(e).__name__}: {e}", records))

    p = ctx.Process(target=child)
    p.start()
    status, result, records = queue.get(timeout=300)
    p.join()
    if status != "ok":
        raise RuntimeError(f"the capped child raised {result}")
    return result, "\n".join(records)


def _jpeg(side: int = 24, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic.class_image(1, 5, side, side, np.random.default_rng(0))).save(
        buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def huge_jpeg(progressive: bool, height: int = 65500, width: int = 65500) -> bytes:
    """A real small JPEG whose frame header (SOF0 or SOF2) declares height x width."""
    data = bytearray(_jpeg(progressive=progressive))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def huge_png(side: int) -> bytes:
    """A real small PNG whose IHDR declares side x side (CRC fixed, so decoders read on)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def huge_npy() -> bytes:
    """gzip'd .npy whose header declares 2**20 x 2**20 uint16 (2 TiB), followed by a few bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False, "shape": (1 << 20, 1 << 20)})
    return gzip.compress(buf.getvalue() + bytes(64))


def _installed(name: str) -> bool:
    try:
        get_decoder(name)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", [d for d in DECODERS if _installed(d)])
def test_every_decoder_refuses_a_huge_header_before_allocating(name):
    """A baseline and a progressive JPEG declaring 65,500 x 65,500 px, under the default data.max_pixels:
    a ValueError naming the limit, with the child's address space capped far below what decoding needs."""
    def run():
        out = []
        for progressive in (False, True):
            try:
                get_decoder(name)(huge_jpeg(progressive))
                out.append("decoded")
            except ValueError as e:
                out.append(str(e))
        return out

    (errors, _) = _capped(run)
    assert all("more than data.max_pixels=134,217,728" in e for e in errors), errors


def test_the_window_decoder_refuses_a_huge_header_before_allocating():
    def run():
        crop = DecoderCrop(32, flip=False, reduce=False, window=True)
        out = []
        for progressive in (False, True):
            try:
                crop(huge_jpeg(progressive))
            except ValueError as e:
                out.append(str(e))
        return out

    (errors, _) = _capped(run)
    assert len(errors) == 2 and all("4,290,250,000 px, more than data.max_pixels" in e for e in errors), errors


def _load(cfg: DataConfig, split: str):
    loader = build_loader(cfg, split, 0, 1)
    labels = torch.cat([y for _, y in loader])
    return labels.tolist(), loader.metrics()


def test_huge_jpegs_in_shards_are_counted_skips_on_train_and_val(imagenet_wds, tmp_path):
    """Train (window decode) and val (data.decoder) over shards holding a baseline and a progressive JPEG
    that declare 65,500 x 65,500 px: both rows blank with label -1 and counted; data.max_pixels set lower
    than an image's pixels skips it the same way."""
    root = shutil.copytree(imagenet_wds, tmp_path / "wds")
    for split in ("train", "val"):
        replace_members(root / split / f"{split}-000000.tar", ".jpg", {0: huge_jpeg(False), 1: huge_jpeg(True)})
        reseal(root, split)
    cfg = DataConfig(dataset="imagenet", path=str(root), batch_size=4, num_workers=0, image_size=32,
                     val_resize=36, val_crop=32, auto_augment=False)
    ((val, val_metrics), log) = _capped(_load, cfg, "val")
    assert val[:2] == [-1, -1] and -1 not in val[2:] and val_metrics == {"val/decode_errors": 2.0}
    assert log.count("more than data.max_pixels=134,217,728") == 2, log
    ((train, train_metrics), log) = _capped(_load, cfg, "train")
    assert train.count(-1) == 2 and train_metrics == {"data/decode_errors": 2.0}
    assert log.count("more than data.max_pixels") == 2, log
    # The synthetic images are 40-96 px a side: a cap of 40 x 40 px skips most of them, nothing else changes.
    small, metrics = _load(dataclasses.replace(cfg, path=str(imagenet_wds), max_pixels=1600), "val")
    assert small.count(-1) == metrics["val/decode_errors"] > 0 and len(small) == 12


def test_a_png_past_pillows_limit_and_past_max_pixels_are_counted_skips(index_cifar, tmp_path):
    """A PNG declaring 20,000 x 20,000 px (Pillow's DecompressionBombError, which derives from Exception
    only) and one declaring 10,000 x 10,000 px (under Pillow's limit, over data.max_pixels=50M)."""
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    replace_members(root / "test" / "test-000000.tar", ".png", {0: huge_png(20000), 3: huge_png(10000)})
    reseal(root, "test")
    cfg = DataConfig(dataset="cifar10", path=str(root), batch_size=5, num_workers=0, max_pixels=50_000_000)
    ((labels, metrics), log) = _capped(_load, cfg, "test")
    assert [i for i, y in enumerate(labels) if y == -1] == [0, 3] and metrics == {"val/decode_errors": 2.0}
    assert "DecompressionBombError" in log and "10000 x 10000 = 100,000,000 px, more than data.max_pixels" in log


def test_an_npy_header_declaring_a_huge_shape_is_a_counted_skip(tmp_path_factory, tmp_path):
    """A DVS sample whose .npy header declares 2 TiB: refused from the header (np.load would allocate it)."""
    from dataloaders.convert import convert

    base = tmp_path_factory.mktemp("dvs_hostile")
    src = synthetic.cifar10_dvs(base / "src", per_class=1, events=300)
    convert("cifar10dvs", base / "wds", "wds", src, frames=2, train_fraction=0.0, shard_size=4)
    root = base / "wds"
    replace_members(root / "test" / "test-000000.tar", ".npy.gz", {1: huge_npy()})
    reseal(root, "test")
    cfg = DataConfig(dataset="cifar10dvs", path=str(root), batch_size=5, num_workers=0)
    ((labels, metrics), log) = _capped(_load, cfg, "test")
    assert labels == [0, -1, 2, 3, 4, 5, 6, 7, 8, 9] and metrics == {"val/decode_errors": 1.0}
    assert "(1048576, 1048576), expected little-endian uint16 (2, 2, 128, 128)" in log


def test_a_bug_in_the_pipeline_raises_instead_of_becoming_a_blank_row(index_cifar):
    """Only the decoders' errors (ValueError) make a counted skip: a RuntimeError or KeyError from the
    augmentation, which is a bug, stops the loader with its own traceback."""
    cfg = DataConfig(dataset="cifar10", path=str(index_cifar["wds"]), batch_size=5, num_workers=0)
    for error in (RuntimeError("a shape bug"), KeyError("a missing key")):
        loader = build_loader(cfg, "test", 0, 1)
        dataset = loader.backend.loader.dataset

        def broken(x, error=error):
            raise error

        dataset.augment = broken
        with pytest.raises(type(error), match="a shape bug|a missing key"):
            next(iter(loader))
