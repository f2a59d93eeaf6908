"""The `folder` data set: any ImageNet-layout tree converted with measured statistics, loaded with the
augmentation its image size calls for, and trained end to end with the head sized from the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders import DataConfig, build_loader, synthetic
from dataloaders.convert import convert, main
from dataloaders.datasets.folder import mode
from launch.common import build_config, parse_args


def make_folder(root, classes: int, train: int, val: int, side: int, seed: int = 0):
    """`root/{train,val}/<class>/...` in four file formats and three PIL modes; returns the train pixels
    of each readable image (uint8 [H, W, 3] as PIL's RGB conversion gives them)."""
    rng, pixels = np.random.default_rng(seed), []
    formats = [("png", "RGB"), ("jpg", "RGB"), ("bmp", "L"), ("webp", "RGBA")]
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class_{chr(ord('a') + label)}"
            folder.mkdir(parents=True)
            for k in range(count):
                ext, pil_mode = formats[k % len(formats)]
                h, w = side + int(rng.integers(0, side // 4 + 1)), side
                image = Image.fromarray(synthetic.class_image(label, classes, h, w, rng)).convert(pil_mode)
                path = folder / f"{k}.{ext}"
                image.save(path, lossless=True) if ext == "webp" else image.save(path)
                if split == "train":
                    with Image.open(path) as im:
                        pixels.append(np.asarray(im.convert("RGB")))
    return pixels


def test_folder_round_trip_stats_and_augmentation_by_size(tmp_path):
    pixels = make_folder(tmp_path / "src", classes=3, train=4, val=2, side=24)
    (tmp_path / "src" / "train" / "class_b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "wds"), "--format", "wds",
          "--workers", "2", "--shard-size", "5"])
    train = json.loads((tmp_path / "wds" / "train" / "manifest.json").read_text())
    val = json.loads((tmp_path / "wds" / "val" / "manifest.json").read_text())
    assert train["dataset"] == "folder" and train["classes"] == ["class_a", "class_b", "class_c"]
    assert train["num_samples"] == 12 and [s["source"] for s in train["skipped"]] == ["train/class_b/broken.png"]
    flat = np.concatenate([p.reshape(-1, 3) for p in pixels]) / 255
    assert np.allclose(train["stats"]["mean"], flat.mean(0), atol=1e-5)
    assert np.allclose(train["stats"]["std"], flat.std(0), atol=1e-5)
    assert val["stats"] == train["stats"]  # evaluation normalises with the train statistics
    assert train["stats"]["median_short_side"] == 24

    cfg = DataConfig(dataset="folder", path=str(tmp_path / "wds"), batch_size=6, num_workers=0, image_size=24,
                     val_crop=24)
    assert mode(cfg, 24) == "pad_crop" and mode(cfg, 65) == "resized_crop"
    loader = build_loader(cfg, "val", 0, 1)
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    mean, std = torch.tensor(train["stats"]["mean"]), torch.tensor(train["stats"]["std"])
    back = (loader.normalize(images).permute(0, 2, 3, 1) * std + mean) * 255
    assert abs(float(back.mean()) - 255 * float(flat.mean())) < 6  # the stored statistics fit the pixels

    assert train["sample"]["ext"] == "jpg"
    for augment, side in (("pad_crop", 24), ("resized_crop", 16)):
        cfg.folder_augment, cfg.image_size, cfg.window_decode = augment, side, True
        images, labels = next(iter(build_loader(cfg, "train", 0, 1)))
        assert images.shape == (6, 3, side, side) and set(labels.tolist()) <= {0, 1, 2}
        cfg.window_decode = False  # the window decoder crops only for resized_crop, with the same pixels
        assert torch.equal(images, next(iter(build_loader(cfg, "train", 0, 1)))[0])
    convert("folder", tmp_path / "ffcv", "ffcv", tmp_path / "src", write_mode="jpg")
    ffcv = DataConfig(dataset="folder", format="ffcv", path=str(tmp_path / "ffcv"), batch_size=6)
    with pytest.raises(ValueError, match="pad_crop .* FFCV"):  # 'auto' picks pad_crop for these 24 px images
        build_loader(ffcv, "train", 0, 1)
    with pytest.raises(ValueError, match="folder_augment"):
        DataConfig(dataset="folder", folder_augment="big")


@pytest.mark.slow
@pytest.mark.parametrize("classes", [3, 7])
def test_folder_trains_end_to_end_with_the_head_from_the_manifest(classes, tmp_path):
    make_folder(tmp_path / "src", classes=classes, train=8, val=2, side=16, seed=classes)
    convert("folder", tmp_path / "data", "wds", tmp_path / "src")
    overrides = ["model.name=ms_resnet20", "model.T=2", "model.kwargs.widths=[8, 16, 32]",
                 "data.image_size=16", "data.val_crop=16", "data.batch_size=8", "data.num_workers=0",
                 "optim.global_batch=8", "optim.max_steps=6", "optim.schedule=constant", "optim.lr=0.2",
                 "engine.precision=fp32", "engine.sync_bn=false", "checkpoint.every_steps=0",
                 f"data.path={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "mlflow.enabled=false"]
    # The launcher accepts the recipe for this data set and leaves the head to the manifest.
    cfg = build_config(parse_args(["--recipe", "ms_resnet18_folder", "--data", str(tmp_path / "data")], "x"),
                       ("imagenet", "folder"))
    assert cfg.data.dataset == "folder" and cfg.model.num_classes == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--recipe", "ms_resnet18_folder", "--set",
                           *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("result "))[7:])
    assert result["step"] == 6 and result["val/samples"] == 2 * classes
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"num_classes: {classes}" in saved
