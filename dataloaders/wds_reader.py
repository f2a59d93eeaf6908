"""Random access into the WebDataset shards of one split, and the torch Dataset built on it.

The epoch plan asks for sample i of a global permutation, so each process indexes a shard once with
`tarfile` (member offsets, no data read) and then reads members with `os.pread`. Local shards are read in
place and their sizes are checked against the manifest up front, so a truncated copy fails before training
starts. Shards behind a URL or `pipe:` command are fetched once into a node-local cache and verified
against the manifest's size and sha256. The shards stay plain WebDataset tars (`webdataset.WebDataset`
streams them as well).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from dataloaders.config import MAX_PIXELS
from dataloaders.decoders import decode_frames, decode_lossless, get_decoder
from dataloaders.manifest import fetch, is_remote, resolve
from dataloaders.transforms import seeded

log = logging.getLogger(__name__)
_OPEN_SHARDS = 32  # per process; reopening costs a syscall, the member index is kept


class ShardError(OSError):
    """A shard that does not match its manifest (missing, truncated, different content)."""


class ShardSet:
    def __init__(self, root: str, manifest: dict, cache_dir: str = ""):
        self.root, self.split, self.shards = root, manifest["split"], manifest["shards"]
        self.ends = np.cumsum([s["num_samples"] for s in self.shards])
        base = Path(cache_dir or Path.home() / ".cache" / "deepspike" / "shards")
        self.cache = base / hashlib.sha1(root.encode()).hexdigest()[:16] / self.split
        if is_remote(root) and any("sha256" not in s for s in self.shards):
            raise ShardError(f"{root}: the {self.split} manifest records no sha256 per shard (an old conversion), "
                             "so fetched shards cannot be verified; convert again, or copy the shards to local "
                             "storage (local shards are checked by size)")
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._members: dict[int, list[dict[str, tuple[int, int]]]] = {}
        if not is_remote(root):
            for s in self.shards:
                path = resolve(root, f"{self.split}/{s['name']}")
                size = os.path.getsize(path) if os.path.exists(path) else None
                if size != s["bytes"]:
                    found = "missing" if size is None else f"{size} bytes"
                    raise ShardError(f"{path}: {found}, the manifest records {s['bytes']} bytes; the shard "
                                     "is truncated or was replaced. Copy it again or re-run "
                                     "dataloaders.convert")

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self):  # descriptors do not survive pickling (spawned workers): reopen there
        return {**self.__dict__, "_fds": OrderedDict()}

    def _local(self, k: int) -> str:
        s, rel = self.shards[k], f"{self.split}/{self.shards[k]['name']}"
        if not is_remote(self.root):
            return resolve(self.root, rel)
        return str(fetch(resolve(self.root, rel), self.cache / s["name"], s["bytes"], s["sha256"]))

    def _open(self, k: int) -> tuple[int, list[dict[str, tuple[int, int]]]]:
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k], self._members[k]
        path = self._local(k)
        if k not in self._members:
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        if m.isfile():
                            # WebDataset convention: the key runs up to the first dot of the file name
                            dot = m.name.find(".", m.name.rfind("/") + 1)
                            samples.setdefault(m.name[:dot], {})[m.name[dot + 1 :]] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                raise ShardError(f"{path}: unreadable tar ({e})") from e
            if len(samples) != self.shards[k]["num_samples"]:
                raise ShardError(f"{path}: {len(samples)} samples, the manifest records "
                                 f"{self.shards[k]['num_samples']}")
            self._members[k] = list(samples.values())
        if len(self._fds) >= _OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[k] = os.open(path, os.O_RDONLY)
        return self._fds[k], self._members[k]

    def read(self, i: int) -> tuple[str, dict[str, bytes]]:
        """(shard name, {extension: bytes}) of sample i of the split."""
        k = int(np.searchsorted(self.ends, i, side="right"))
        fd, members = self._open(k)
        j = i - (int(self.ends[k - 1]) if k else 0)
        return self.shards[k]["name"], {ext: os.pread(fd, n, off) for ext, (off, n) in members[j].items()}


def decode(ext: str, data: bytes, jpeg_decoder: str, frames_shape: tuple[int, ...],
           max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """uint8 [3, H, W] image or uint16 [T, 2, 128, 128] event counts (of `frames_shape`)."""
    if ext == "npy.gz":
        return decode_frames(data, frames_shape)
    if ext == "jpg":
        return get_decoder(jpeg_decoder, max_pixels)(data)
    return decode_lossless(data, max_pixels)


class WdsDataset(torch.utils.data.Dataset):
    """Item (position, seed or None[, shard name, sample]) -> (augmented uint8 sample, label, undecodable?);
    the trainer normalises whole batches. Position PAD gives a padding row; an undecodable sample (a
    ValueError from the decoders, which turn their libraries' own error types into one, or a sample without
    its label or image member) is logged and returned as a blank with label -1, so one bad file never stops
    a run (the loader counts them). Any other exception is a bug and propagates.
    `crop`: a decoder that also crops (`decoders.DecoderCrop`), drawing from the sample's seed
    before `augment` does."""

    def __init__(self, shards: ShardSet, ext: str, augment, blank_shape, jpeg_decoder: str, num_classes: int,
                 crop=None, max_pixels: int = MAX_PIXELS):
        self.shards, self.ext, self.augment, self.jpeg_decoder, self.crop = shards, ext, augment, jpeg_decoder, crop
        self.num_classes, self.max_pixels = num_classes, max_pixels
        self.blank = torch.zeros(blank_shape, dtype=torch.uint16 if ext == "npy.gz" else torch.uint8)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item):
        index, seed, *streamed = item  # data.access=stream hands over (shard name, sample) read in order
        if index < 0:
            return self.blank, -1, False
        shard, sample = streamed or self.shards.read(index)
        try:
            missing = {"cls", self.ext} - sample.keys()
            if missing:
                raise ValueError(f"the sample has no {' or '.join(sorted(missing))} member (it has {sorted(sample)})")
            label = int(sample["cls"])
            if not 0 <= label < self.num_classes:  # would index past the head (a device-side assert on CUDA)
                raise ValueError(f"label {label} outside the manifest's {self.num_classes} classes")
            return seeded(self._decode_augment, sample[self.ext], seed), label, False
        except ValueError as e:
            log.warning("skipping undecodable sample %d of %s/%s: %s", index, self.shards.split, shard, e)
            return self.blank, -1, True

    def _decode_augment(self, data: bytes) -> torch.Tensor:
        x = self.crop(data) if self.crop is not None else decode(self.ext, data, self.jpeg_decoder,
                                                                 tuple(self.blank.shape), self.max_pixels)
        return x if self.augment is None else self.augment(x)
