"""The converter on raw inputs in their real formats: determinism, resuming, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders import DataConfig, build_loader, synthetic
from dataloaders.aedat import EventFileError, events_to_frames, read_aedat, write_aedat
from dataloaders.cifar_format import CIFAR100_MD5, read_cifar10, read_cifar100, write_cifar10, write_cifar100
from dataloaders.config import ConvertConfig
from dataloaders.convert import ConversionError, build_parser, convert, main
from dataloaders.datasets import list_datasets

pytest_plugins = ["data_fixtures"]


def test_the_command_line_is_the_config(tmp_path):
    """The options are ConvertConfig's fields with its defaults, for the CLI and the library call alike; the
    data sets go by their registry names."""
    p = build_parser()
    args = vars(p.parse_args(["digits", "--out", "x", "--format", "wds"]))
    defaults = dataclasses.asdict(ConvertConfig())
    assert {k: args[k] for k in defaults} == defaults and defaults["workers"] > 0
    assert next(a for a in p._actions if a.dest == "dataset").choices == list_datasets()
    assert not vars(p.parse_args(["cifar10", "--out", "x", "--format", "wds", "--no-verify-md5"]))["verify_md5"]
    with pytest.raises(ValueError, match="on_error='never'"):
        convert("digits", tmp_path, "wds", on_error="never")
    with pytest.raises(ValueError, match="unknown dataset 'cifar10-dvs'"):
        convert("cifar10-dvs", tmp_path, "wds")


def test_cifar10_pickles_round_trip_and_missing_files(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 23)
    test = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 7)
    src = write_cifar10(tmp_path, train, test)
    classes, data = read_cifar10(src, verify_md5=False)  # home-made files
    assert classes[0] == "airplane" and len(classes) == 10
    for split, (x, y) in (("train", train), ("test", test)):
        assert np.array_equal(data[split][0], x) and np.array_equal(data[split][1], y)

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
    # the distributed archive too
    assert np.array_equal(read_cifar10(archive, verify_md5=False)[1]["train"][0], train[0])
    archive.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(SystemExit, match="truncated"):
        main(["cifar10", "--src", str(archive), "--out", str(tmp_path / "o1"), "--format", "wds"])

    (src / "data_batch_3").unlink()
    with pytest.raises(SystemExit, match="lacks data_batch_3"):
        main(["cifar10", "--src", str(src), "--out", str(tmp_path / "o2"), "--format", "wds"])


def test_cifar100_official_format_fine_labels_and_md5(tmp_path):
    """Pickles in the official cifar-100-python layout -> fine labels and images through the reader, the
    converter and the loader; files that are not the published ones are refused unless declared home-made."""
    rng = np.random.default_rng(0)
    fine = [f"class{i:03d}" for i in range(100)]
    train = rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), np.arange(120) % 100
    test = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), (np.arange(30) * 7) % 100
    src = write_cifar100(tmp_path, train, test, fine, [f"super{i}" for i in range(20)])
    with pytest.raises(ValueError, match=f"md5 .* published file has {CIFAR100_MD5['train']}.*--no-verify-md5"):
        read_cifar100(src)
    classes, data = read_cifar100(src, verify_md5=False)
    assert classes == fine
    for split, (x, y) in (("train", train), ("test", test)):
        assert np.array_equal(data[split][0], x) and np.array_equal(data[split][1], y)

    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="cifar-100-python")
    with pytest.raises(SystemExit, match="md5"):
        main(["cifar100", "--src", str(archive), "--out", str(tmp_path / "refused"), "--format", "wds"])
    main(["cifar100", "--src", str(archive), "--out", str(tmp_path / "wds"), "--format", "wds", "--no-verify-md5"])
    manifest = json.loads((tmp_path / "wds" / "test" / "manifest.json").read_text())
    assert manifest["dataset"] == "cifar100" and manifest["classes"] == fine and manifest["num_samples"] == 30
    cfg = DataConfig(dataset="cifar100", path=str(tmp_path / "wds"), batch_size=30, num_workers=0)
    images, labels = next(iter(build_loader(cfg, "test", 0, 1)))
    assert labels.tolist() == test[1].tolist()
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(test[0]))  # lossless: eval has no augmentation

    (src / "meta").unlink()
    with pytest.raises(FileNotFoundError, match="lacks meta"):
        read_cifar100(src, verify_md5=False)


def test_aedat_round_trip_and_frames(tmp_path):
    rng = np.random.default_rng(0)
    n = 1003
    ev = {"t": np.sort(rng.integers(0, 10**6, n)), "x": rng.integers(0, 128, n), "y": rng.integers(0, 128, n),
          "p": rng.integers(0, 2, n)}
    data = write_aedat(ev["t"], ev["x"], ev["y"], ev["p"])
    assert data.startswith(b"#!AER-DAT2.0\r\n")
    back = read_aedat(data)
    assert all(np.array_equal(back[k], ev[k]) for k in ev)
    frames = events_to_frames(back, 4)
    assert frames.shape == (4, 2, 128, 128) and frames.dtype == np.uint16
    assert frames.reshape(4, -1).sum(1).tolist() == [250, 250, 250, 253]  # equal counts, remainder last
    first = np.zeros((2, 128, 128), np.int64)
    np.add.at(first, (ev["p"][:250], ev["y"][:250], ev["x"][:250]), 1)
    assert np.array_equal(frames[0], first)
    with pytest.raises(EventFileError, match="truncated"):
        read_aedat(data[:-3])
    with pytest.raises(EventFileError, match="no events"):
        read_aedat(data[: data.index(b"us\r\n") + 4])


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_dvs_recordings_to_frames(fmt, tmp_path):
    """CIFAR10-DVS as distributed (class folders of .aedat) -> T frames -> loader [N, T, 2, 128, 128]; a
    truncated recording is skipped and listed."""
    src = synthetic.cifar10_dvs(tmp_path / "src", per_class=2, events=1500)
    bad = src / "ship" / "cifar10_ship_1.aedat"
    bad.write_bytes(bad.read_bytes()[:-5])
    manifests = convert("cifar10dvs", tmp_path / "out", fmt, src, frames=3, train_fraction=0.5)
    assert manifests["test"]["skipped"][0]["source"].endswith("cifar10_ship_1.aedat")
    assert manifests["train"]["num_samples"] == 10 and manifests["test"]["num_samples"] == 9
    cfg = DataConfig(dataset="cifar10dvs", format=fmt, path=str(tmp_path / "out"), batch_size=5,
                     num_workers=1)
    x, y = zip(*build_loader(cfg, "test", 0, 1))
    x, y = torch.cat(x), torch.cat(y)
    assert x.shape == (10, 3, 2, 128, 128) and y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, -1]
    classes = manifests["test"]["classes"]
    for k, label in enumerate(y[:9].tolist()):
        rec = src / classes[label] / f"cifar10_{classes[label]}_1.aedat"
        expect = events_to_frames(read_aedat(rec.read_bytes()), 3).astype(np.float32)
        assert torch.equal(x[k].float(), torch.from_numpy(expect))


def _shas(manifest) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def test_wds_stop_on_bad_file_then_resume(imagenet_src, tmp_path):
    """--on-error stop halts at a corrupt file with its name; after fixing it, re-running keeps the finished
    shards and writes the rest; the result is byte-identical to a clean conversion with more workers."""
    src = shutil.copytree(imagenet_src, tmp_path / "src")
    last = src / "train" / "n01484850"
    good = sorted(last.iterdir())[0].read_bytes()
    (last / "zz_corrupt.JPEG").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="zz_corrupt.JPEG: not a readable image"):
        convert("imagenet", out, "wds", src, shard_size=5, on_error="stop", workers=1)
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert len(finished) == 4 and not (out / "train" / "manifest.json").exists()  # the 5th holds the bad file

    (last / "zz_corrupt.JPEG").write_bytes(good)
    resumed = convert("imagenet", out, "wds", src, shard_size=5, on_error="stop", workers=1)
    assert all((out / "train" / name).stat().st_mtime_ns == t for name, t in finished.items())
    assert resumed["train"]["num_samples"] == 25 and len(resumed["train"]["shards"]) == 5

    clean = convert("imagenet", tmp_path / "clean", "wds", src, shard_size=5, on_error="stop", workers=2)
    assert _shas(clean["train"]) == _shas(resumed["train"]) and _shas(clean["val"]) == _shas(resumed["val"])
    (out / "val" / "manifest.json").unlink()
    (out / "val" / "progress.jsonl").write_text(json.dumps({"options": {"max_side": 1}}) + "\n")
    with pytest.raises(ConversionError, match="partial conversion made with options"):
        convert("imagenet", out, "wds", src, shard_size=5)


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_bad_files_are_skipped_counted_and_listed(fmt, imagenet_src, tmp_path):
    src = shutil.copytree(imagenet_src, tmp_path / "src")
    folder = src / "train" / "n01443537"
    data = next(folder.iterdir()).read_bytes()
    (folder / "broken.JPEG").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    m = convert("imagenet", tmp_path / "out", fmt, src, workers=2)["train"]
    assert sorted(s["source"].split("/")[-1] for s in m["skipped"]) == ["broken.JPEG", "notes.txt"]
    assert all("not a readable image" in s["reason"] for s in m["skipped"]) and m["num_samples"] == 24
    cfg = DataConfig(dataset="imagenet", format=fmt, path=str(tmp_path / "out"), batch_size=4, num_workers=1,
                     image_size=32, auto_augment=False)
    labels = torch.cat([y for _, y in build_loader(cfg, "train", 0, 1)])
    assert sorted(labels.tolist()) == [0] * 8 + [1] * 8 + [2] * 8  # the placeholders are never read

    if fmt == "ffcv":
        with pytest.raises(ConversionError, match="2 bad samples"):
            convert("imagenet", tmp_path / "stop", fmt, src, on_error="stop")
        assert not list((tmp_path / "stop").glob("*.beton*"))


def test_empty_class_folder(imagenet_src, tmp_path):
    src = shutil.copytree(imagenet_src, tmp_path / "src")
    for f in (src / "val" / "n01443537").iterdir():
        f.unlink()
    with pytest.raises(ConversionError, match="n01443537: empty class folder"):
        convert("imagenet", tmp_path / "stop", "wds", src, on_error="stop")
    m = convert("imagenet", tmp_path / "skip", "wds", src)["val"]
    assert m["issues"] and "empty class folder" in m["issues"][0] and m["num_samples"] == 8
    assert m["classes"] == list(synthetic.WNIDS[:3])  # labels keep their meaning


def test_wds_samples_keep_the_source(imagenet_src, imagenet_wds):
    """Small RGB JPEGs are stored byte for byte; each sample names its source file."""
    with tarfile.open(imagenet_wds / "val" / "val-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    info = json.loads(members["val-00000000.json"])
    assert members["val-00000000.jpg"] == (imagenet_src / info["source"]).read_bytes()
    assert members["val-00000000.cls"] == b"0"


def test_large_images_are_downscaled(tmp_path):
    src = synthetic.imagenet(tmp_path / "src", classes=1, per_class=1, min_side=300, max_side=300)
    out = convert("imagenet", tmp_path / "out", "wds", src, max_side=128, workers=1)
    with tarfile.open(tmp_path / "out" / "train" / out["train"]["shards"][0]["name"]) as tf:
        jpg = next(tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg"))
    assert max(Image.open(io.BytesIO(jpg)).size) == 128


def test_dvs_frames_are_stored_compressed_and_deterministic(tmp_path):
    src = synthetic.cifar10_dvs(tmp_path / "src", per_class=1, events=800)
    a = convert("cifar10dvs", tmp_path / "a", "wds", src, frames=2, train_fraction=1.0)
    b = convert("cifar10dvs", tmp_path / "b", "wds", src, frames=2, train_fraction=1.0)
    assert _shas(a["train"]) == _shas(b["train"])
    with tarfile.open(tmp_path / "a" / "train" / "train-000000.tar") as tf:
        blob = next(tf.extractfile(m).read() for m in tf if m.name.endswith(".npy.gz"))
    assert len(blob) < 2 * 2 * 128 * 128 and gzip.decompress(blob).startswith(b"\x93NUMPY")
