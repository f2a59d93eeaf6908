"""Small raw data sets in their real formats, and conversions of them, built once per test session.

The tests/test_data_*.py files load this module with `pytest_plugins = ["data_fixtures"]`, which registers
it once, so the session fixtures are shared; builders also mark finished output in the session's temp
folder.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders import synthetic
from dataloaders.cifar_format import write_cifar10
from dataloaders.convert import convert
from dataloaders.manifest import sha256_file

ROUND_TRIP_SIDE = 64


def resumed_rest(cfg, rank: int = 1, world: int = 2, after: int = 2) -> dict:
    """A loader of `cfg` stopped after `after` train batches and one restored from its state yield exactly
    the uninterrupted epoch's batches; returns that state."""
    from dataloaders import build_loader

    whole = list(build_loader(cfg, "train", rank, world))
    first = build_loader(cfg, "train", rank, world)
    batches = iter(first)
    for _ in range(after):
        next(batches)
    state = first.state_dict()
    resumed = build_loader(cfg, "train", rank, world)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(whole) - after
    for (x, y), (x2, y2) in zip(whole[after:], rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert resumed.state_dict()["epoch"] == 1
    return state


def _once(base: Path, name: str, build) -> Path:
    out = base / name
    if not (out / ".done").exists():
        build(out)
        (out / ".done").touch()
    return out


def index_images(n: int) -> np.ndarray:
    """uint8 [n, 32, 32, 3]; image i is one colour with red = i % 256 and green = i // 256, so a sample can
    be identified after any crop, flip or padding that keeps the centre pixel."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    return images


def indices_of(images: torch.Tensor) -> list[int]:
    """Inverse of `index_images` on loaded (uint8) CIFAR batches."""
    px = images[:, :, 16, 16].long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def edit_manifest(root: Path, split: str, edit) -> None:
    path = root / split / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def replace_members(shard: Path, suffix: str, payloads: dict[int, bytes]) -> None:
    """Rewrite `shard` with its k-th member ending in `suffix` holding payloads[k]."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    names = {m.name: payloads[k] for k, m in enumerate(m for m, _ in members if m.name.endswith(suffix))
             if k in payloads}
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            data = names.get(m.name, data)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def reseal(root: Path, split: str) -> None:
    """Record the shards' current sizes and hashes in the manifest, as a hostile converter would."""
    def edit(m):
        for s in m["shards"]:
            f = root / split / s["name"]
            s.update(bytes=f.stat().st_size, sha256=sha256_file(f))
    edit_manifest(root, split, edit)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "data_fixtures"


@pytest.fixture(scope="session")
def imagenet_src(data_root) -> Path:
    """3 real wnids x 8 train and 4 val JPEGs, 40-96 px, varied aspect ratios."""
    return _once(data_root, "imagenet_src",
                 lambda out: synthetic.imagenet(out, classes=3, per_class=8, val_per_class=4, min_side=40,
                                                max_side=96))


@pytest.fixture(scope="session")
def imagenet_wds(data_root, imagenet_src) -> Path:
    return _once(data_root, "imagenet_wds",
                 lambda out: convert("imagenet", out, "wds", imagenet_src, shard_size=5, workers=2))


@pytest.fixture(scope="session")
def imagenet_ffcv(data_root, imagenet_src) -> Path:
    return _once(data_root, "imagenet_ffcv",
                 lambda out: convert("imagenet", out, "ffcv", imagenet_src, write_mode="jpg", workers=1))


@pytest.fixture(scope="session")
def round_trip_src(data_root) -> Path:
    """ImageNet layout whose val images have a short side of exactly ROUND_TRIP_SIDE, so evaluation with
    val_resize = val_crop = ROUND_TRIP_SIDE is a pure center crop: no resampling between file and batch."""

    def build(out):
        rng = np.random.default_rng(1)
        for split in ("train", "val"):
            for label, wnid in enumerate(synthetic.WNIDS[:2]):
                (out / split / wnid).mkdir(parents=True)
                for k, (h, w) in enumerate([(64, 80), (96, 64), (64, 64)]):
                    image = synthetic.class_image(label, 2, h, w, rng)
                    Image.fromarray(image).save(out / split / wnid / f"{wnid}_{k}.JPEG", quality=90)

    return _once(data_root, "round_trip_src", build)


@pytest.fixture(scope="session")
def index_cifar(data_root) -> dict[str, Path]:
    """CIFAR-10 pickles of 60 train and 25 test images, each identifiable by `indices_of`, converted to
    both formats: {'wds': root, 'ffcv': root}."""

    def build(out):
        train, test = index_images(60), index_images(25)
        write_cifar10(out, (train, np.arange(60) % 10), (test, np.arange(25) % 10))

    src = _once(data_root, "index_cifar_src", build) / "cifar-10-batches-py"
    return {fmt: _once(data_root, f"index_cifar_{fmt}",
                       lambda out, fmt=fmt: convert("cifar10", out, fmt, src, shard_size=7, verify_md5=False))
            for fmt in ("wds", "ffcv")}
