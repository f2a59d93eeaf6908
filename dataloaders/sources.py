"""Raw data sets as indexable splits for `dataloaders.convert`: ImageNet-style folders, CIFAR-10/100 pickles,
CIFAR10-DVS recordings and scikit-learn digits.

A split lists its samples up front (sorted, so conversion is deterministic) and decodes one on request;
`load(i)` raises `BadSample` for a file that cannot be used, and the converter skips or stops on it.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dataloaders.aedat import EventFileError, events_to_frames, read_aedat

MAX_RECORDING_BYTES = 1 << 28
"""The biggest .aedat recording read (CIFAR10-DVS files are a few MB): a zip member declaring more is a
decompression bomb or not a recording, and is skipped as a bad sample instead of filling memory."""


class BadSample(ValueError):
    """One source sample that cannot be converted (corrupt or non-image file, unreadable recording)."""


@dataclass
class Sample:
    label: int
    image: Image.Image | np.ndarray | None = None
    """RGB PIL image (folders) or uint8 [H, W, 3] array (CIFAR, digits)."""
    encoded: bytes | None = None
    """The file's own bytes when they already are an RGB JPEG (kept as is in wds shards)."""
    frames: np.ndarray | None = None
    """uint16 [T, 2, 128, 128] event counts (CIFAR10-DVS)."""


@dataclass
class Split:
    """Samples of one split: `names[i]` (for messages and the manifest) and `labels[i]`."""

    kind: str  # 'image' or 'frames'
    names: list[str]
    labels: list[int]
    issues: list[str] = field(default_factory=list)
    """Problems found while listing (empty class folders); the converter's --on-error decides."""

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class FolderSplit(Split):
    paths: list[Path] = field(default_factory=list)

    def load(self, i: int) -> Sample:
        data = self.paths[i].read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decodes every pixel: truncated and corrupt files fail here, not in training
                is_rgb_jpeg = im.format == "JPEG" and im.mode == "RGB"
                image = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise BadSample(f"{self.names[i]}: not a readable image ({e})") from e
        return Sample(self.labels[i], image=image, encoded=data if is_rgb_jpeg else None)


@dataclass
class ArraySplit(Split):
    images: np.ndarray | None = None

    def load(self, i: int) -> Sample:
        return Sample(self.labels[i], image=self.images[i])


@dataclass
class EventSplit(Split):
    files: list[tuple[Path, str | None]] = field(default_factory=list)
    """(file, None) for an extracted .aedat, (zip, member) for one inside a distributed class zip."""
    frames: int = 20

    def load(self, i: int) -> Sample:
        path, member = self.files[i]
        try:
            if member is None:
                data = path.read_bytes()
            else:
                with zipfile.ZipFile(path) as z:
                    # zipfile stops at the declared size, so checking it bounds the decompression
                    size = z.getinfo(member).file_size
                    if size > MAX_RECORDING_BYTES:
                        raise EventFileError(f"declares {size} bytes uncompressed, more than the "
                                             f"{MAX_RECORDING_BYTES} a recording may have")
                    data = z.read(member)
            return Sample(self.labels[i], frames=events_to_frames(read_aedat(data), self.frames))
        except (EventFileError, zipfile.BadZipFile, zlib.error, OSError) as e:
            raise BadSample(f"{self.names[i]}: {e}") from e


def imagenet_splits(src: str | Path, splits: list[str]) -> tuple[list[str], dict[str, FolderSplit]]:
    """`src/<split>/<class>/<file>`; the classes are the sorted folder names of the first split."""
    src = Path(src)
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"{src} has none of the split folders {splits} "
                                f"(expected {src}/train/<wnid>/*.JPEG)")
    classes = _subdirs(src / present[0])
    if not classes:
        raise FileNotFoundError(f"{src / present[0]} holds no class folders")
    out = {}
    for split in present:
        unknown = sorted(set(_subdirs(src / split)) - set(classes))
        if unknown:
            raise ValueError(f"{src / split} has class folders {unknown[:5]} that {src / present[0]} lacks")
        s = FolderSplit("image", [], [])
        for label, cls in enumerate(classes):
            files = sorted(p for p in (src / split / cls).glob("*") if p.is_file() and p.name[0] != ".")
            if not files:
                s.issues.append(f"{src / split / cls}: empty class folder (class {label} gets no {split} "
                                "samples)")
            s.paths += files
            s.names += [str(p.relative_to(src)) for p in files]
            s.labels += [label] * len(files)
        out[split] = s
    return classes, out


def _subdirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def cifar10_splits(src: str | Path, verify_md5: bool) -> tuple[list[str], dict[str, ArraySplit]]:
    from dataloaders.cifar_format import read_cifar10

    classes, data = read_cifar10(src, verify_md5)
    return classes, {k: _array_split(k, x, y) for k, (x, y) in data.items()}


def cifar100_splits(src: str | Path, verify_md5: bool) -> tuple[list[str], dict[str, ArraySplit]]:
    from dataloaders.cifar_format import read_cifar100

    classes, data = read_cifar100(src, verify_md5)
    return classes, {k: _array_split(k, x, y) for k, (x, y) in data.items()}


def digits_splits(size: int) -> tuple[list[str], dict[str, ArraySplit]]:
    from dataloaders.digits import digits_uint8

    return [str(d) for d in range(10)], {k: _array_split(k, x, y) for k, (x, y) in digits_uint8(size).items()}


def _array_split(split, images, labels) -> ArraySplit:
    return ArraySplit("image", [f"{split}[{i}]" for i in range(len(labels))], [int(v) for v in labels],
                      images=images)


def _recording_number(name: str) -> int:
    m = re.search(r"(\d+)\.aedat$", name)
    return int(m.group(1)) if m else -1


def dvs_splits(src: str | Path, frames: int,
               train_fraction: float) -> tuple[list[str], dict[str, EventSplit]]:
    """`src/<class>/*.aedat` or the distributed `src/<class>.zip`; per class the first `train_fraction` of
    the recordings (by their number) train and the rest test, as PLIF's 9:1 split."""
    src = Path(src)
    per_class: dict[str, list[tuple[Path, str | None]]] = {}
    for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        per_class[d.name] = [(f, None) for f in d.glob("*.aedat")]
    for z in sorted(src.glob("*.zip")):
        if z.stem not in per_class:
            with zipfile.ZipFile(z) as zf:
                per_class[z.stem] = [(z, m) for m in zf.namelist() if m.endswith(".aedat")]
    if not per_class:
        raise FileNotFoundError(f"{src} holds no class folders or class zips with .aedat recordings")
    classes = sorted(per_class)
    out = {split: EventSplit("frames", [], [], frames=frames) for split in ("train", "test")}
    for label, cls in enumerate(classes):
        files = sorted(per_class[cls], key=lambda f: (_recording_number(f[1] or f[0].name), str(f)))
        if not files:
            for s in out.values():
                s.issues.append(f"{src / cls}: no .aedat recordings (class {label} gets no samples)")
        cut = int(len(files) * train_fraction)
        for split, part in (("train", files[:cut]), ("test", files[cut:])):
            out[split].files += part
            out[split].names += [f"{p.name}:{m}" if m else str(p.relative_to(src)) for p, m in part]
            out[split].labels += [label] * len(part)
    return classes, out
