"""Loaders over real shard and .beton files: round trips, rank splits, exact resume, bad data at load time."""

from __future__ import annotations

import dataclasses
import http.server
import shutil
import tarfile
import threading
from functools import partial

import numpy as np
import pytest
import torch
from data_fixtures import ROUND_TRIP_SIDE, indices_of
from PIL import Image

from dataloaders import DataConfig, Loader, build_loader
from dataloaders.convert import main as convert_cli
from dataloaders.datasets.imagenet import MEAN as IMAGENET_MEAN
from dataloaders.datasets.imagenet import STD as IMAGENET_STD
from dataloaders.digits import digits_uint8
from dataloaders.wds_reader import ShardError

pytest_plugins = ["data_fixtures"]


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_digits_read_back_exactly(fmt, data_root):
    """Real data through the converter CLI and back: every test image and label, bit for bit ('val' is
    served by the 'test' split)."""
    out = data_root / f"digits16_{fmt}"
    if not (out / ("test/manifest.json" if fmt == "wds" else "test.manifest.json")).exists():
        convert_cli(["digits", "--out", str(out), "--format", fmt, "--size", "16", "--workers", "1"])
    cfg = DataConfig(dataset="digits", format=fmt, path=str(out), batch_size=100)
    loader = build_loader(cfg, "val", 0, 1)
    x, y = _collect(loader)
    images, labels = digits_uint8(16)["test"]
    n = len(labels)
    assert x.shape == (len(loader) * 100, 3, 16, 16) and (y[n:] == -1).all()
    assert torch.equal(y[:n], torch.from_numpy(labels))
    assert torch.equal(x[:n], torch.from_numpy(images).permute(0, 3, 1, 2))


def test_batches_stay_uint8_and_model_input_normalises_them_as_the_loader_did(imagenet_wds):
    """The loader hands over uint8 pixels; `model_input` with the loader's normalize gives what normalising
    on the host would (v2.ToDtype(scale=True) + v2.Normalize, padding rows zero) up to float rounding."""
    from torchvision.transforms import v2

    from dataloaders.loader import model_input

    cfg = DataConfig(dataset="imagenet", path=str(imagenet_wds), batch_size=8, num_workers=0, val_resize=48,
                     val_crop=40)
    loader = build_loader(cfg, "val", 0, 1)
    x, y = _collect(loader)
    assert x.dtype == torch.uint8 and (y < 0).sum() == 4 and (x[y < 0] == 0).all()
    expected = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(x))
    expected[y < 0] = 0
    got = model_input(x, torch.device("cpu"), torch.float32, False, loader.normalize, y)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 1e-5
    assert (got[y < 0] == 0).all() and x.dtype == torch.uint8  # the batch itself is left alone
    half = model_input(x, torch.device("cpu"), torch.float16, False, loader.normalize, y)
    assert half.dtype == torch.half and torch.equal(half, expected.half())


def _center_crops(src, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """The val images decoded by PIL and center-cropped to ROUND_TRIP_SIDE, in converter order."""
    images, labels, s = [], [], ROUND_TRIP_SIDE
    for label, wnid in enumerate(classes):
        for f in sorted((src / "val" / wnid).iterdir()):
            a = np.asarray(Image.open(f).convert("RGB"))
            top, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
            images.append(torch.from_numpy(a[top : top + s, left : left + s].copy()).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("fmt,write_mode", [("wds", None), ("ffcv", "raw"), ("ffcv", "jpg")])
def test_imagenet_read_back(fmt, write_mode, round_trip_src, tmp_path):
    """Exact for raw pixels; within JPEG tolerance where the file is JPEG (wds keeps the original bytes,
    FFCV 'jpg' re-encodes at quality 90)."""
    out = tmp_path / "rt"
    args = ["imagenet", "--src", str(round_trip_src), "--out", str(out), "--format", fmt, "--workers", "1"]
    convert_cli(args + (["--write-mode", write_mode] if write_mode else []))
    cfg = DataConfig(dataset="imagenet", format=fmt, path=str(out), batch_size=4, num_workers=1,
                     val_resize=ROUND_TRIP_SIDE, val_crop=ROUND_TRIP_SIDE)
    x, y = _collect(build_loader(cfg, "val", 0, 1))
    ref, labels = _center_crops(round_trip_src, ["n01440764", "n01443537"])
    n = len(labels)
    assert torch.equal(y[:n], labels) and (y[n:] == -1).all()
    err = (x[:n].int() - ref.int()).abs().float()
    if write_mode == "raw":
        assert err.max() == 0
    elif fmt == "wds":  # the file's own bytes: only two builds of libjpeg-turbo may round differently
        assert err.mean() < 0.1 and err.max() <= 2, (err.mean(), err.max())
    else:  # decoded, then JPEG-encoded again at quality 90 by FFCV
        assert 0 < err.mean() < 2.5 and err.max() <= 24, (err.mean(), err.max())


def _ranks(loader: Loader, world: int) -> list[Loader]:
    """The same loader for every rank of `world`, sharing one reader (FFCV compiles once per reader)."""
    return [Loader(dataclasses.replace(loader.plan, rank=r, world_size=world), loader.backend, loader.normalize,
                   loader.classes)
            for r in range(world)]


def _check_coverage(loaders: list[Loader], total: int, train: bool, epoch: int) -> list[int]:
    seen = []
    for loader in loaders:
        loader.set_epoch(epoch)
        x, y = _collect(loader)
        assert len(x) == len(loaders[0]) * loader.plan.batch_size  # equal batch counts, full batches
        idx = indices_of(x[y >= 0])
        assert [i % 10 for i in idx] == y[y >= 0].tolist()
        if train:
            assert (y >= 0).all()
        seen += idx
    if train and total % (len(loaders) * loaders[0].plan.batch_size):
        assert len(set(seen)) == len(seen) == len(loaders) * len(loaders[0]) * loaders[0].plan.batch_size
    else:
        assert sorted(seen) == list(range(total))
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_every_epoch_exactly(world, index_cifar):
    """wds, 2 workers per rank: train epochs cover all 60 samples once (batch 5 divides them), in a new
    order each epoch; eval covers 25 samples once with padding on the short ranks; with batch 7 the
    remainder is dropped and ranks still get equal, full batches."""
    def loaders(split, batch):
        cfg = DataConfig(dataset="cifar10", format="wds", path=str(index_cifar["wds"]), batch_size=batch,
                         num_workers=2, seed=3)
        return [build_loader(cfg, split, r, world) for r in range(world)]

    train = loaders("train", 5)
    assert _check_coverage(train, 60, True, 0) != _check_coverage(train, 60, True, 1)
    _check_coverage(loaders("test", 4), 25, False, 0)
    _check_coverage(loaders("train", 7), 60, True, 0)


def test_ffcv_ranks_split_every_epoch_exactly(index_cifar):
    cfg = DataConfig(dataset="cifar10", format="ffcv", path=str(index_cifar["ffcv"]), batch_size=5,
                     num_workers=2, seed=3)
    train = _ranks(build_loader(cfg, "train", 0, 1), 3)
    assert _check_coverage(train, 60, True, 0) != _check_coverage(train, 60, True, 1)
    test = _ranks(build_loader(dataclasses.replace(cfg, batch_size=4), "test", 0, 1), 2)
    _check_coverage(test, 25, False, 0)


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_resume_mid_epoch_is_bit_identical(fmt, imagenet_wds, imagenet_ffcv):
    """ImageNet train (RandomResizedCrop + flip + AutoAugment): a loader restored from a mid-epoch state
    yields exactly the batches the uninterrupted one yields next."""
    path = imagenet_wds if fmt == "wds" else imagenet_ffcv
    cfg = DataConfig(dataset="imagenet", format=fmt, path=str(path), batch_size=3, num_workers=2,
                     image_size=32, hflip=True, seed=11)
    whole = build_loader(cfg, "train", 1, 2)
    whole.set_epoch(1)
    ref = [(x.clone(), y.clone()) for x, y in whole]
    assert len(ref) == 4 and whole.state_dict()["epoch"] == 2 and whole.state_dict()["batches_yielded"] == 0

    cut = build_loader(cfg, "train", 1, 2)
    cut.set_epoch(1)
    first = []
    for x, y in cut:
        first.append((x.clone(), y.clone()))
        if len(first) == 2:
            break
    state = cut.state_dict()
    assert state["epoch"] == 1 and state["batches_yielded"] == 2

    restored = build_loader(cfg, "train", 1, 2)
    restored.load_state_dict(state)
    restored.set_epoch(1)  # what a trainer loop does after resuming: keeps the position
    rest = [(x.clone(), y.clone()) for x, y in restored]
    assert len(rest) == 2
    for (a, la), (b, lb) in zip(first + rest, ref):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # the same epoch again replays it; the next epoch draws a new order and new crops
    restored.set_epoch(1)
    assert restored.batches_yielded == 0
    again = [x for x, _ in restored]
    assert all(torch.equal(a, b) for a, (b, _) in zip(again, ref))
    restored.set_epoch(2)
    assert not any(torch.equal(a, b) for (a, _), (b, _) in zip(restored, ref))


def test_resume_needs_the_same_world_size(imagenet_wds):
    cfg = DataConfig(dataset="imagenet", format="wds", path=str(imagenet_wds), batch_size=3, num_workers=0)
    state = build_loader(cfg, "train", 0, 2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        build_loader(cfg, "train", 0, 1).load_state_dict(state)


def _corrupt_member(shard, ext: str) -> str:
    """Overwrite the start of the first `ext` member of a shard in place (same size); returns its key."""
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.endswith("." + ext))
    with open(shard, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\0" * 64)
    return m.name.split(".")[0]


def test_undecodable_sample_is_skipped_and_counted(imagenet_wds, tmp_path, caplog):
    root = shutil.copytree(imagenet_wds, tmp_path / "wds")
    key = _corrupt_member(root / "val" / "val-000001.tar", "jpg")
    cfg = DataConfig(dataset="imagenet", format="wds", path=str(root), batch_size=4, num_workers=0,
                     val_resize=40, val_crop=32)
    loader = build_loader(cfg, "val", 0, 1)
    x, y = _collect(loader)
    bad = int(key.split("-")[1])  # val-00000005: the sample's position in the split
    assert y[bad] == -1 and (x[bad] == 0).all() and (y >= 0).sum() == 11
    assert loader.metrics() == {"val/decode_errors": 1.0}  # an eval split: its latest pass
    assert "undecodable" in caplog.text and "val-000001.tar" in caplog.text


def test_truncated_shard_fails_before_training(imagenet_wds, tmp_path):
    root = shutil.copytree(imagenet_wds, tmp_path / "wds")
    shard = root / "train" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    cfg = DataConfig(dataset="imagenet", format="wds", path=str(root), batch_size=3)
    with pytest.raises(ShardError, match="train-000002.tar: 3000 bytes.*truncated"):
        build_loader(cfg, "train", 0, 1)


def test_bad_config_and_paths(imagenet_wds, tmp_path):
    with pytest.raises(ValueError, match="data.dataset='mnist'"):
        DataConfig(dataset="mnist")
    with pytest.raises(ValueError, match="holds 'imagenet'"):
        build_loader(DataConfig(dataset="cifar10", path=str(imagenet_wds)), "train", 0, 1)
    with pytest.raises(FileNotFoundError, match="no converted 'train' split"):
        build_loader(DataConfig(dataset="imagenet", path=str(tmp_path)), "train", 0, 1)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(DataConfig(dataset="imagenet", path=str(imagenet_wds), batch_size=20), "train", 0, 2)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_shards_over_http_and_pipe(imagenet_wds, tmp_path):
    """Shards behind a URL or a pipe: command are fetched once into the cache, verified, and give the same
    batches as the local files."""
    cfg = DataConfig(dataset="imagenet", format="wds", path=str(imagenet_wds), batch_size=4, num_workers=1,
                     val_resize=40, val_crop=32)
    local = _collect(build_loader(cfg, "val", 0, 1))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(imagenet_wds)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for path in (f"http://127.0.0.1:{server.server_port}", f"pipe:cat {imagenet_wds}/{{}}"):
            cache = tmp_path / path[:4]
            remote = dataclasses.replace(cfg, path=path, cache_dir=str(cache))
            got = _collect(build_loader(remote, "val", 0, 1))
            assert torch.equal(got[0], local[0]) and torch.equal(got[1], local[1])
            assert len(list(cache.rglob("val-*.tar"))) == 3
    finally:
        server.shutdown()


def test_shards_are_plain_webdataset(imagenet_wds):
    import webdataset as wds

    urls = sorted(str(p) for p in (imagenet_wds / "train").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 24 and {"jpg", "cls", "json"} <= samples[0].keys()
    assert isinstance(samples[0]["jpg"], Image.Image)  # decoded by WebDataset's own decoder


def test_seek_continues_where_another_world_size_stopped(imagenet_wds):
    """Two ranks x 3 samples and one rank x 6 samples share each global batch: seeking one rank to the
    second global batch yields exactly the samples the two ranks read there, with the same crops."""
    cfg = DataConfig(dataset="imagenet", format="wds", path=str(imagenet_wds), batch_size=3, num_workers=0,
                     image_size=32, hflip=True, seed=11)
    pair = []
    for rank in (0, 1):
        loader = build_loader(cfg, "train", rank, 2)
        loader.set_epoch(1)
        pair.append([(x.clone(), y.clone()) for x, y in loader][1])
    single = build_loader(dataclasses.replace(cfg, batch_size=6), "train", 0, 1)
    single.seek(1, 1)
    x, y = next(iter(single))
    assert single.state_dict()["epoch"] == 1 and single.state_dict()["batches_yielded"] == 2
    two = torch.cat([p[0] for p in pair])
    order = [min(range(6), key=lambda j: (x[i].int() - two[j].int()).abs().sum().item()) for i in range(6)]
    assert sorted(order) == list(range(6))
    assert torch.equal(x, two[order]) and torch.equal(y, torch.cat([p[1] for p in pair])[order])
    with pytest.raises(ValueError, match="cannot seek"):
        single.seek(1, len(single))
