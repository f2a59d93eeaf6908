"""JPEG decoders for the wds path: file bytes in, uint8 RGB [3, H, W] out (grey or CMYK files become RGB),
a ValueError or RuntimeError (which the loader counts as an undecodable sample) for bytes that are not
a decodable JPEG. `data.decoder` picks one; `python -m bench.loaders`
measures them all with the crop that follows. Other formats (the CIFAR and digits PNGs) go through
`decode_lossless` whatever the choice: Pillow, exact pixels and no call into torchvision's deprecated
image I/O; DVS event frames (gzip'd .npy) through `decode_frames`, bounded to the size they must have.

- simplejpeg: libjpeg-turbo's own API, the default: the fastest maintained one in bench.loaders (about
  1.1-1.25x torchvision per core for decode + crop on 300-500 px JPEGs).
- torchvision: torchvision.io.decode_image, the old default (deprecated from torchvision 0.29).
- opencv: libjpeg-turbo through cv2.imdecode, then a BGR->RGB swap.
- torchcodec: TorchCodec's decode_jpeg, torchvision's named successor.
- pil: Pillow (pillow-simd, if it is what is installed).
opencv and torchcodec come with the `ffcv` and `decoders` extras.
"""

from __future__ import annotations

import functools
import io
import zlib

import numpy as np
import torch

from dataloaders.config import DECODERS


@functools.cache
def get_decoder(name: str):
    """The decode function of `name` (one of DECODERS); a clear error when its package is missing."""
    if name not in DECODERS:
        raise ValueError(f"data.decoder={name!r}; expected one of {DECODERS}")
    try:
        return globals()[f"_{name}"]()
    except ImportError as e:
        raise ValueError(f"data.decoder={name!r} needs a package that is not installed ({e})") from e


def decode_lossless(data: bytes) -> torch.Tensor:
    """PNG (or any format Pillow reads) -> uint8 RGB [3, H, W]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return _from_hwc(np.array(im.convert("RGB")))


_NPY_HEADER_MAX = 4096  # an .npy header of a plain array is padded to 64 bytes; 4 KiB is ample


def decode_frames(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """gzip'd .npy uint16 event counts of exactly `shape`; a ValueError for anything else (corrupt gzip, a
    decompression bomb, which stops one byte past the size the sample must have, another shape or dtype)."""
    raw = gunzip(data, int(np.prod(shape)) * 2 + _NPY_HEADER_MAX)
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if array.dtype != np.uint16 or array.shape != tuple(shape):
        raise ValueError(f"event frames of {array.dtype} {array.shape}, expected uint16 {tuple(shape)}")
    return torch.from_numpy(array)


def gunzip(data: bytes, limit: int) -> bytes:
    """The decompressed gzip `data`, or a ValueError when it is corrupt, cut short or would exceed `limit`
    bytes (never more than limit + 1 bytes are produced)."""
    d = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ValueError(f"corrupt gzip data ({e})") from e
    if len(out) > limit:
        raise ValueError(f"gzip data decompresses past {limit} bytes (a decompression bomb, or not this sample)")
    if not d.eof:
        raise ValueError("gzip data ends before its stream does (truncated)")
    return out


def _from_hwc(array) -> torch.Tensor:
    if array is None or array.ndim != 3:
        raise ValueError("not a decodable JPEG")
    return torch.from_numpy(array).permute(2, 0, 1)


def _simplejpeg():
    import simplejpeg

    return lambda data: _from_hwc(simplejpeg.decode_jpeg(data, colorspace="RGB"))


def _opencv():
    import cv2

    cv2.setNumThreads(1)  # the loader's parallelism is its worker processes

    def decode(data: bytes) -> torch.Tensor:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return _from_hwc(None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    return decode


def _torchvision():
    from torchvision.io import ImageReadMode, decode_image

    def decode(data: bytes) -> torch.Tensor:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return decode


def _torchcodec():
    from torchcodec.decoders import decode_jpeg

    return functools.partial(decode_jpeg, mode="RGB")


def _pil():
    def decode(data: bytes) -> torch.Tensor:
        try:
            return decode_lossless(data)
        except OSError as e:
            raise ValueError(f"not a decodable JPEG ({e})") from e

    return decode
