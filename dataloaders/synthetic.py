"""Learnable stand-ins for data that cannot be downloaded here, written in the real on-disk formats.

    python -m dataloaders.synthetic imagenet --out DIR --classes 10 --per-class 50 [--val-per-class 10]
    python -m dataloaders.synthetic cifar10 --out DIR --per-class 100 [--test-per-class 20]
    python -m dataloaders.synthetic cifar10dvs --out DIR --per-class 20

ImageNet: `DIR/{train,val}/<real wnid>/*.JPEG` of varied sizes and aspect ratios. CIFAR-10: a
`DIR/cifar-10-batches-py` folder in the official pickle format (not the published files: convert it with
--no-verify-md5). CIFAR10-DVS:
`DIR/<class>/cifar10_<class>_<n>.aedat` AEDAT 2.0 recordings as distributed. In every case the content
depends on the class (stripe angle, frequency and colour; for events the direction of a moving bar and the
polarity balance) plus per-sample noise, so a model can learn it and the real readers are exercised on
the real formats.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dataloaders.aedat import SIZE, write_aedat
from dataloaders.cifar_format import CLASSES as CIFAR_CLASSES
from dataloaders.cifar_format import write_cifar10

# Real ImageNet-1k synset ids: the first 20 of the sorted list and the rest of Imagenette's 10.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
         "n01514668", "n01514859", "n01518878", "n01530575", "n01531178", "n01532829", "n01534433",
         "n01537544", "n01558993", "n01560419", "n01580077", "n01582220", "n01592084", "n02102040",
         "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413", "n03445777",
         "n03888257")


def class_image(label: int, num_classes: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: stripes whose angle, frequency and colour encode the class, with random phase,
    brightness and noise."""
    angle = np.pi * label / num_classes
    cycles = 2 + label % 4
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (label / num_classes + np.array([0.0, 1 / 3, 2 / 3])))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    wave = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    img = (0.5 + 0.4 * wave)[..., None] * colour * rng.uniform(0.7, 1.0) * 255
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def imagenet(out: str | Path, classes: int, per_class: int, val_per_class: int = 0, seed: int = 0,
             min_side: int = 64, max_side: int = 500) -> Path:
    if not 1 <= classes <= len(WNIDS):
        raise ValueError(f"--classes must be 1..{len(WNIDS)} (the real synset ids available here)")
    out, rng, val_no = Path(out), np.random.default_rng(seed), 0
    for label, wnid in enumerate(WNIDS[:classes]):
        for split, count in (("train", per_class), ("val", val_per_class)):
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                long_side = int(rng.integers(min_side, max_side + 1))
                short_side = max(8, int(long_side * rng.uniform(0.6, 1.0)))
                h, w = (long_side, short_side) if rng.random() < 0.3 else (short_side, long_side)
                if split == "train":
                    name = f"{wnid}_{k}.JPEG"
                else:
                    val_no += 1
                    name = f"ILSVRC2012_val_{val_no:08d}.JPEG"
                image = Image.fromarray(class_image(label, classes, h, w, rng))
                image.save(out / split / wnid / name, quality=90)
    return out


def cifar10(out: str | Path, per_class: int, test_per_class: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def make(n):
        labels = np.tile(np.arange(10), n)
        return np.stack([class_image(int(c), 10, 32, 32, rng) for c in labels]), labels

    return write_cifar10(out, make(per_class), make(test_per_class))


def dvs_recording(label: int, events: int, rng: np.random.Generator) -> bytes:
    """A bar sweeping across the 128x128 sensor in a class-dependent direction; leading-edge events are
    ON with a class-dependent probability."""
    t = np.sort(rng.integers(0, 1_000_000, events))
    angle = 2 * np.pi * label / 10
    along = (t / 1_000_000 - 0.5) * 80
    across = rng.uniform(-40, 40, events)
    x = SIZE / 2 + along * np.cos(angle) - across * np.sin(angle) + rng.normal(0, 1.5, events)
    y = SIZE / 2 + along * np.sin(angle) + across * np.cos(angle) + rng.normal(0, 1.5, events)
    p = rng.random(events) < 0.25 + 0.05 * label
    return write_aedat(t, _pixel(x), _pixel(y), p.astype(np.int64))


def _pixel(v: np.ndarray) -> np.ndarray:
    return np.clip(np.round(v), 0, SIZE - 1).astype(np.int64)


def cifar10_dvs(out: str | Path, per_class: int, events: int = 4000, seed: int = 0) -> Path:
    out, rng = Path(out), np.random.default_rng(seed)
    for label, cls in enumerate(CIFAR_CLASSES):
        (out / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (out / cls / f"cifar10_{cls}_{k}.aedat").write_bytes(dvs_recording(label, events, rng))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataloaders.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=["imagenet", "cifar10", "cifar10dvs"])
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=10, help="imagenet only")
    p.add_argument("--per-class", type=int, required=True)
    p.add_argument("--val-per-class", "--test-per-class", type=int, default=0, dest="held_out")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.dataset == "imagenet":
        path = imagenet(a.out, a.classes, a.per_class, a.held_out, a.seed)
    elif a.dataset == "cifar10":
        path = cifar10(a.out, a.per_class, a.held_out, a.seed)
    else:
        path = cifar10_dvs(a.out, a.per_class, seed=a.seed)
    print(path)


if __name__ == "__main__":
    main()
