"""Data faults and hostile input on real shard files, .beton files, pickles and loaders (docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import shutil
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import edit_manifest, indices_of, replace_members, reseal
from trainer_fixtures import digits_shards, spawn, tiny_config

from dataloaders import DataConfig, build_loader, synthetic
from dataloaders.cifar_format import CIFAR10_MD5, read_cifar10, write_cifar10
from dataloaders.convert import convert
from dataloaders.decoders import decode_frames
from dataloaders.manifest import resolve
from dataloaders.sources import dvs_splits

pytest_plugins = ["data_fixtures"]


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def _cifar_cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="cifar10", format="wds", path=str(root), batch_size=5, num_workers=0, **kw)


def test_injection_through_a_manifest_shard_name_runs_nothing(index_cifar, tmp_path, monkeypatch):
    """Issue 12 #5: a shard name carrying shell syntax, read through `pipe:cat DIR/{}`."""
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    edit_manifest(root, "test", lambda m: m["shards"][0].update(name="test-000000.tar; touch INJECTED #"))
    monkeypatch.chdir(tmp_path)
    cfg = _cifar_cfg(f"pipe:cat {root}/{{}}", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"manifest field shards\[0\]\.name='test-000000.tar; touch INJECTED #'"):
        _collect(build_loader(cfg, "val", 0, 1))
    assert not (tmp_path / "INJECTED").exists() and not list(tmp_path.rglob("INJECTED"))
    # Whatever reaches the shell is one quoted word.
    assert resolve("pipe:cat /d/{}", "val/a b;touch X") == "pipe:cat /d/'val/a b;touch X'"
    assert resolve("pipe:cat /d/{}", "val/val-000000.tar") == "pipe:cat /d/val/val-000000.tar"


@pytest.mark.parametrize("field, value, message", [
    ("name", "../train/train-000000.tar", r"shards\[1\]\.name='\.\./train/train-000000\.tar'"),
    ("name", "/etc/passwd", r"shards\[1\]\.name='/etc/passwd'"),
    ("name", "train-000001.tar", r"shards\[1\]\.name='train-000001\.tar'"),  # another split's shard
    ("num_samples", -7, r"shards\[1\]\.num_samples=-7"),
    ("num_samples", 6, r"num_samples=25 .*sum to 24"),
    ("bytes", "10240", r"shards\[1\]\.bytes='10240'"),
    ("sha256", "../x", r"shards\[1\]\.sha256='\.\./x'"),
])
def test_manifest_fields_are_validated(index_cifar, tmp_path, field, value, message):
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    edit_manifest(root, "test", lambda m: m["shards"][1].update({field: value}))
    with pytest.raises(ValueError, match=message):
        build_loader(_cifar_cfg(root), "test", 0, 1)


_STATS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "median_short_side": 32}


@pytest.mark.parametrize("edit, message", [
    ({"mean": [0.5, float("nan"), 0.3]}, r"stats\.mean=\[0\.5, nan, 0\.3\]"),
    ({"mean": [0.5, 0.4]}, r"stats\.mean=\[0\.5, 0\.4\] is invalid \(3 numbers in \[0, 1\]"),
    ({"std": [0.2, 0.0, 0.2]}, r"stats\.std=\[0\.2, 0\.0, 0\.2\]"),
    ({"std": "0.2"}, r"stats\.std='0\.2'"),
    ({"median_short_side": -32}, r"stats\.median_short_side=-32"),
    ({"median_short_side": 3.5}, r"stats\.median_short_side=3\.5"),
])
def test_manifest_stats_are_validated(index_cifar, tmp_path, edit, message):
    """The statistics measured at conversion normalise every batch (a std of 0 divides by zero, a NaN
    poisons every input) and choose the folder augmentation: each is checked when the manifest is read."""
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    edit_manifest(root, "test", lambda m: m.update(stats=_STATS))
    build_loader(_cifar_cfg(root), "test", 0, 1)
    edit_manifest(root, "test", lambda m: m.update(stats={**_STATS, **edit}))
    with pytest.raises(ValueError, match=message):
        build_loader(_cifar_cfg(root), "test", 0, 1)


def test_shard_names_take_ascii_digits_only(index_cifar, tmp_path):
    """'test-\u0660\u0660\u0660\u0660\u0660\u0661.tar' (Arabic-Indic digits) matched the old `\\d{6}`."""
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    name = "test-" + "\u0660" * 5 + "\u0661" + ".tar"
    edit_manifest(root, "test", lambda m: m["shards"][1].update(name=name))
    with pytest.raises(ValueError, match=r"shards\[1\]\.name="):
        build_loader(_cifar_cfg(root), "test", 0, 1)


def test_manifest_split_and_ffcv_file_are_validated(index_cifar, tmp_path):
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    edit_manifest(root, "test", lambda m: m.update(split="../../etc"))
    with pytest.raises(ValueError, match=r"manifest field split='\.\./\.\./etc'"):
        build_loader(_cifar_cfg(root), "test", 0, 1)
    ffcv = shutil.copytree(index_cifar["ffcv"], tmp_path / "ffcv")
    path = ffcv / "test.manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"file": "../wds/test.beton"}))
    with pytest.raises(ValueError, match=r"manifest field file='\.\./wds/test\.beton'"):
        build_loader(DataConfig(dataset="cifar10", format="ffcv", path=str(ffcv), batch_size=5), "test", 0, 1)


def test_cifar10_pickles_are_checked_against_the_published_md5(tmp_path):
    images = np.zeros((10, 32, 32, 3), np.uint8)
    src = write_cifar10(tmp_path, (images, np.arange(10)), (images[:5], np.arange(5)))
    with pytest.raises(ValueError, match=f"md5 .* published file has {CIFAR10_MD5['data_batch_1']}.*--no-verify-md5"):
        read_cifar10(src)
    assert read_cifar10(src, verify_md5=False)[1]["test"][0].shape == (5, 32, 32, 3)
    # A home-made file is unpickled with numpy arrays only: a pickle that would run a command is refused.
    marker = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    (src / "data_batch_2").write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 pickle .*refusing to load (posix|os)"):
        read_cifar10(src, verify_md5=False)
    assert not marker.exists()


def _gzip_bomb(mib: int) -> bytes:
    """`mib` MiB of zeros at deflate level 9: 16 MiB is over a hundred times the largest DVS sample, which
    proves the limit at a fraction of a second per run."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return z.compress(bytes(mib << 20)) + z.flush()


@pytest.fixture(scope="module")
def dvs_wds(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("dvs")
    src = synthetic.cifar10_dvs(base / "src", per_class=1, events=600)
    convert("cifar10dvs", base / "wds", "wds", src, frames=2, train_fraction=0.0, shard_size=4)
    return base / "wds"


def test_corrupt_and_bomb_dvs_samples_are_skipped_and_counted(dvs_wds, tmp_path):
    """A corrupt deflate stream (an uncaught zlib.error kills the worker) and a 16 MiB gzip bomb in a DVS shard
    that matches its manifest: both rows come back blank with label -1, counted; the rest are intact."""
    root = shutil.copytree(dvs_wds, tmp_path / "wds")
    shard = root / "test" / "test-000000.tar"
    with tarfile.open(shard) as tf:
        good = tf.extractfile(next(m for m in tf if m.name.endswith(".npy.gz"))).read()
    corrupt = good[:10] + bytes(b ^ 0x5A for b in good[10:-8]) + good[-8:]
    with pytest.raises(zlib.error):
        gzip.decompress(corrupt)
    bomb = _gzip_bomb(16)
    replace_members(shard, ".npy.gz", {0: corrupt, 2: bomb})
    reseal(root, "test")
    cfg = DataConfig(dataset="cifar10dvs", format="wds", path=str(root), batch_size=5, num_workers=1)
    t0 = time.perf_counter()
    loader = build_loader(cfg, "test", 0, 1)
    x, y = _collect(loader)
    seconds = time.perf_counter() - t0
    assert y.tolist() == [-1, 1, -1, 3, 4, 5, 6, 7, 8, 9]
    assert (x[[0, 2]] == 0).all() and (x[1].int() > 0).any()  # uint16 event counts
    assert loader.metrics() == {"val/decode_errors": 2.0}
    # The reasons the worker logged:
    with pytest.raises(ValueError, match="corrupt gzip data"):
        decode_frames(corrupt, (2, 2, 128, 128))
    with pytest.raises(ValueError, match="decompresses past 135168 bytes"):
        decode_frames(bomb, (2, 2, 128, 128))
    print(f"corrupt + 16 MiB bomb ({len(bomb)} bytes) read in {seconds:.2f} s")


def test_zip_bomb_recording_is_skipped_at_conversion(tmp_path, monkeypatch):
    """An .aedat member of a class zip declaring more than MAX_RECORDING_BYTES is skipped, not inflated."""
    import dataloaders.sources as sources

    src = synthetic.cifar10_dvs(tmp_path / "src", per_class=1, events=300)
    for d in sorted(p for p in src.iterdir() if p.is_dir()):  # as distributed: one zip per class
        with zipfile.ZipFile(src / f"{d.name}.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for f in d.glob("*.aedat"):
                z.write(f, f.name)
        if d.name == "cat":
            with zipfile.ZipFile(src / "cat.zip", "a", zipfile.ZIP_DEFLATED) as z:
                z.writestr("cifar10_cat_9.aedat", bytes(4 << 20))
        shutil.rmtree(d)
    monkeypatch.setattr(sources, "MAX_RECORDING_BYTES", 1 << 20)
    _, splits = dvs_splits(src, 2, 0.0)
    test = splits["test"]
    bomb = test.names.index("cat.zip:cifar10_cat_9.aedat")
    with pytest.raises(sources.BadSample, match="declares 4194304 bytes uncompressed, more than the 1048576"):
        test.load(bomb)
    assert test.load(bomb - 1).frames.sum() == 300


@pytest.fixture
def http_root(index_cifar):
    import http.server
    import threading
    from functools import partial

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(index_cifar["wds"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _tamper_png(shard: Path) -> None:
    """Same size, other bytes: zero part of the first PNG's payload in place."""
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    assert any(data[m.offset_data + 60 : m.offset_data + 90])
    data[m.offset_data + 60 : m.offset_data + 90] = bytes(30)
    shard.write_bytes(bytes(data))


def test_tampered_cached_shard_is_fetched_again(index_cifar, http_root, tmp_path, caplog):
    """A cached shard with the right size but other bytes is not used: it is fetched again and verified."""
    cfg = _cifar_cfg(http_root, cache_dir=str(tmp_path / "cache"))
    x0, y0 = _collect(build_loader(cfg, "test", 0, 1))
    assert indices_of(x0[y0 >= 0]) == list(range(25))
    cached = next((tmp_path / "cache").rglob("test-000001.tar"))
    original = cached.read_bytes()
    _tamper_png(cached)
    assert cached.stat().st_size == len(original)
    x1, y1 = _collect(build_loader(cfg, "test", 0, 1))
    assert torch.equal(x1, x0) and torch.equal(y1, y0)
    assert cached.read_bytes() == original and "does not match the manifest" in caplog.text


def test_tampered_remote_shard_is_refused(index_cifar, tmp_path):
    """Remote bytes that do not match the manifest's sha256 (same size) are never used."""
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    shard = root / "test" / "test-000002.tar"
    _tamper_png(shard)
    cfg = _cifar_cfg(f"pipe:cat {root}/{{}}", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(OSError, match=r"test-000002.tar: read \d+ bytes with sha256 .*stale"):
        _collect(build_loader(cfg, "test", 0, 1))
    assert not list((tmp_path / "cache").rglob("test-000002.tar"))


def _corrupt_jpeg_in_beton(beton: Path, k: int) -> None:
    data = bytearray(beton.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    data[starts[k] : starts[k] + 40] = b"\x13" * 40
    beton.write_bytes(bytes(data))


def test_ffcv_corrupt_jpeg_is_counted_not_passed_on(imagenet_ffcv, tmp_path, caplog):
    """FFCV's own decoder yields the previous image's pixels for a JPEG libjpeg-turbo rejects; here that row is
    blank, label -1 and counted, on the eval (center crop) and the train (seeded random crop) decoder."""
    root = shutil.copytree(imagenet_ffcv, tmp_path / "ffcv")
    cfg = DataConfig(dataset="imagenet", format="ffcv", path=str(imagenet_ffcv), batch_size=4, num_workers=1,
                     val_resize=40, val_crop=32, image_size=32, auto_augment=False)
    x0, y0 = _collect(build_loader(cfg, "val", 0, 1))
    _corrupt_jpeg_in_beton(root / "val.beton", 5)
    bad_cfg = dataclasses.replace(cfg, path=str(root))
    loader = build_loader(bad_cfg, "val", 0, 1)
    x1, y1 = _collect(loader)
    assert y1[5] == -1 and (x1[5] == 0).all() and loader.metrics() == {"val/decode_errors": 1.0}
    keep = torch.arange(len(y0)) != 5
    assert torch.equal(x1[keep], x0[keep]) and torch.equal(y1[keep], y0[keep])
    assert "undecodable record 5" in caplog.text

    _corrupt_jpeg_in_beton(root / "train.beton", 3)
    train = build_loader(bad_cfg, "train", 0, 1)
    _, y = _collect(train)
    assert (y == -1).sum() == 1 and train.metrics() == {"data/decode_errors": 1.0}


def _decode_errors_run(rank: int, data: str, run_dir: str) -> None:
    from trainer.trainer import Trainer

    Trainer(tiny_config(Path(data), Path(run_dir), "optim.max_steps=2", "log_every=1")).fit()


@pytest.mark.slow
def test_decode_errors_are_summed_over_ranks_and_logged_for_val(tmp_path_factory, tmp_path):
    """2 real gloo ranks (the digits_tiny trainer, 2 steps of 16 per rank, then one evaluation) over shards
    with undecodable PNGs: rank 0's log holds the sums over both ranks, for train and for val."""
    data = shutil.copytree(digits_shards(tmp_path_factory), tmp_path / "digits")
    corrupt = {"train": set(range(0, 1000, 5)), "test": {0, 1, 2}}  # positions in shard 0 of each split
    for split, positions in corrupt.items():
        replace_members(data / split / f"{split}-000000.tar", ".png", dict.fromkeys(positions, b"not a png"))
        reseal(data, split)
    cfg = tiny_config(data, tmp_path / "unused")
    seen = {split: [np.isin(build_loader(cfg.data, split, r, 2).plan.rows(0), list(bad)).sum(axis=1)
                    for r in range(2)] for split, bad in corrupt.items()}  # per rank, per batch
    per_step = [int(sum(b[:s].sum() for b in seen["train"])) for s in (1, 2)]  # log_every=1: steps 1, 2
    val = int(sum(b.sum() for b in seen["test"]))
    assert all(b[:2].sum() for b in seen["train"]) and all(b.sum() for b in seen["test"])  # both ranks meet some

    spawn(_decode_errors_run, 2, str(data), str(tmp_path / "run"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["data/decode_errors"] for m in lines if "data/decode_errors" in m] == per_step
    assert [m["val/decode_errors"] for m in lines if "val/decode_errors" in m] == [val]
    print(f"decode errors: train per step {per_step} (rank 0 alone {seen['train'][0][:2].cumsum().tolist()}), "
          f"val {val} (rank 0 alone {int(seen['test'][0].sum())})")
