"""CIFAR10-DVS recordings: the jAER AEDAT 2.0 files as distributed, and their integration into frames.

A file is a few '#' header lines followed by big-endian (uint32 address, uint32 timestamp in us) pairs.
A DVS128 address holds polarity in bit 0, the sensor x in bits 1-7 and the sensor y in bits 8-14. The
image coordinates follow SpikingJelly's CIFAR10DVS reader, which PLIF (and so MS-ResNet, docs/model.md §7) used:
x = 127 - sensor_y, y = 127 - sensor_x, polarity = 1 - bit 0.
"""

from __future__ import annotations

import numpy as np

SIZE = 128
HEADER = (b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
          b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
          b"# Timestamps tick is 1 us\r\n")


class EventFileError(ValueError):
    """An event recording that cannot be read (truncated, empty)."""


def read_aedat(data: bytes) -> dict[str, np.ndarray]:
    """{'t', 'x', 'y', 'p'} arrays from the bytes of one .aedat file."""
    start = 0
    while data.startswith(b"#", start):
        end = data.find(b"\n", start)
        if end < 0:
            raise EventFileError("header never ends: not an AEDAT 2.0 file")
        start = end + 1
    body = data[start:]
    if len(body) % 8:
        raise EventFileError(f"{len(body)} bytes of events is not a whole number of 8-byte events: "
                             "truncated file")
    words = np.frombuffer(body, dtype=">u4")
    if words.size == 0:
        raise EventFileError("the recording holds no events")
    addr, t = words[0::2], words[1::2]
    sx, sy, sp = (addr & 0xFE) >> 1, (addr & 0x7F00) >> 8, addr & 1
    return {"t": t.astype(np.int64), "x": (SIZE - 1 - sy).astype(np.int64),
            "y": (SIZE - 1 - sx).astype(np.int64), "p": (1 - sp).astype(np.int64)}


def write_aedat(t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> bytes:
    """The exact inverse of `read_aedat` (used to produce test recordings in the distributed format)."""
    sx, sy, sp = SIZE - 1 - np.asarray(y), SIZE - 1 - np.asarray(x), 1 - np.asarray(p)
    addr = (sy.astype(np.uint32) << 8) | (sx.astype(np.uint32) << 1) | sp.astype(np.uint32)
    words = np.empty(2 * len(addr), dtype=">u4")
    words[0::2], words[1::2] = addr, np.asarray(t, dtype=np.uint32)
    return HEADER + words.tobytes()


def events_to_frames(events: dict[str, np.ndarray], frames: int) -> np.ndarray:
    """uint16 [frames, 2, 128, 128] event counts, each frame integrating an equal number of events
    (SpikingJelly's split_by='number': N // frames per frame, the last frame takes the remainder)."""
    n = len(events["t"])
    bounds = [i * (n // frames) for i in range(frames)] + [n]
    flat = (events["p"] * SIZE + events["y"]) * SIZE + events["x"]
    out = np.stack([np.bincount(flat[a:b], minlength=2 * SIZE * SIZE) for a, b in zip(bounds, bounds[1:])])
    if out.max() > np.iinfo(np.uint16).max:
        raise EventFileError("more than 65535 events on one pixel in one frame")
    return out.astype(np.uint16).reshape(frames, 2, SIZE, SIZE)
