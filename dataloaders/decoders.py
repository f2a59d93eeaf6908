"""JPEG decoders for the wds path: file bytes in, uint8 RGB [3, H, W] out (grey or CMYK files become RGB),
a ValueError (`UndecodableSample` where a library raises its own type; the loader counts it as an
undecodable sample) for bytes that are not a decodable image. `data.decoder` picks one; `python -m
bench.loaders` measures them all with the crop that follows. Other formats (the CIFAR and digits PNGs) go
through `decode_lossless` whatever the choice: Pillow, exact pixels and no call into torchvision's deprecated
image I/O; DVS event frames (gzip'd .npy) through `decode_frames`, bounded to the size they must have.

Every image decoder first reads the pixel count its file's header declares and refuses one above
`max_pixels` (data.max_pixels) before anything is allocated: a few hundred bytes of JPEG can declare
65,500 x 65,500 px, which libjpeg would try to hold (12.9 GB of pixels; a progressive file's coefficients
are buffered whole before any bounds check).

- simplejpeg: libjpeg-turbo's own API, the default: the fastest maintained one in bench.loaders (about
  1.1-1.25x torchvision per core for decode + crop on 300-500 px JPEGs).
- torchvision: torchvision.io.decode_image, the old default (deprecated from torchvision 0.29).
- opencv: libjpeg-turbo through cv2.imdecode, then a BGR->RGB swap.
- torchcodec: TorchCodec's decode_jpeg, torchvision's named successor.
- pil: Pillow (pillow-simd, if it is what is installed).
opencv and torchcodec come with the `ffcv` and `decoders` extras.

The train crops of data sets whose FFCV decoder crops (ImageNet, folder) skip the whole-image decode by
default (data.window_decode): `DecoderCrop` draws the RandomResizedCrop window from the JPEG's header and
decodes only that window with libjpeg-turbo (deepspike_jpeg, built with the LIF op): the same pixels, about
1.3x faster than the whole-image decode it replaces (bench.loaders); data.decoder then serves evaluation.
"""

from __future__ import annotations

import functools
import io
import logging
import zlib

import numpy as np
import torch

from dataloaders.config import DECODERS, MAX_PIXELS

log = logging.getLogger(__name__)


class UndecodableSample(ValueError):
    """A sample's bytes that a decoder refuses (its library's own error type, or a header declaring more
    pixels than data.max_pixels); the loader counts the sample and goes on."""


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise UndecodableSample(f"the header declares {width} x {height} = {height * width:,} px, more than "
                                f"data.max_pixels={max_pixels:,}")


def jpeg_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) from a JPEG's header, read without decoding; UndecodableSample above max_pixels."""
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(data)  # a ValueError for bytes that are no JPEG
    check_pixels(h, w, max_pixels)
    return h, w


@functools.cache
def get_decoder(name: str, max_pixels: int = MAX_PIXELS):
    """The decode function of `name` (one of DECODERS), which refuses a header declaring more than
    `max_pixels` before the decoder allocates anything; a clear error when its package is missing."""
    if name not in DECODERS:
        raise ValueError(f"data.decoder={name!r}; expected one of {DECODERS}")
    try:
        decode = globals()[f"_{name}"]()
    except ImportError as e:
        raise ValueError(f"data.decoder={name!r} needs a package that is not installed ({e})") from e

    def capped(data: bytes) -> torch.Tensor:
        jpeg_size(data, max_pixels)
        return decode(data)

    return capped


def decode_lossless(data: bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """PNG (or any format Pillow reads) -> uint8 RGB [3, H, W]; UndecodableSample for what Pillow refuses,
    its own decompression-bomb limit included, and for a header declaring more than max_pixels (Pillow reads
    only the header until `convert`)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(im.height, im.width, max_pixels)
            return _from_hwc(np.array(im.convert("RGB")))
    # Pillow's documented errors for bad files: OSError (UnidentifiedImageError, truncated data), SyntaxError
    # from some format plugins, and DecompressionBombError, which derives from Exception only.
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableSample(f"not a decodable image ({type(e).__name__}: {e})") from e


_NPY_HEADER_MAX = 4096  # an .npy header of a plain array is padded to 64 bytes; 4 KiB is ample


def decode_frames(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """gzip'd .npy uint16 event counts of exactly `shape`; a ValueError for anything else (corrupt gzip, a
    decompression bomb, which stops one byte past the size the sample must have, another shape or dtype).
    The .npy header is checked before the array is read: np.load allocates the shape a header declares
    before it finds the data missing."""
    from numpy.lib import format as npy

    raw = gunzip(data, int(np.prod(shape)) * 2 + _NPY_HEADER_MAX)
    f = io.BytesIO(raw)
    version = npy.read_magic(f)  # a ValueError for anything but an .npy header
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"an .npy file of format version {version}, expected 1.0 or 2.0")
    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    got, fortran, dtype = read_header(f, max_header_size=_NPY_HEADER_MAX)
    if dtype != np.dtype("<u2") or tuple(got) != tuple(shape) or fortran:
        raise ValueError(f"event frames of {dtype} {tuple(got)}{' (Fortran order)' if fortran else ''}, "
                         f"expected little-endian uint16 {tuple(shape)}")
    if len(raw) - f.tell() != int(np.prod(shape)) * 2:
        raise ValueError(f"event frames of {len(raw) - f.tell()} data bytes, expected {int(np.prod(shape)) * 2}")
    return torch.from_numpy(np.frombuffer(raw, np.uint16, offset=f.tell()).reshape(shape).copy())


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
        raise UndecodableSample("not a decodable JPEG")
    return torch.from_numpy(array).permute(2, 0, 1)


def _simplejpeg():
    import simplejpeg

    return lambda data: _from_hwc(simplejpeg.decode_jpeg(data, colorspace="RGB"))


def _opencv():
    import cv2

    cv2.setNumThreads(1)  # the loader's parallelism is its worker processes

    def decode(data: bytes) -> torch.Tensor:
        try:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error as e:  # most bad files give None; some reach OpenCV's own exception
            raise UndecodableSample(f"not a decodable JPEG ({e})") from e
        return _from_hwc(None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    return decode


def _torchvision():
    from torchvision.io import ImageReadMode, decode_image

    def decode(data: bytes) -> torch.Tensor:
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:  # torchvision's error type for a file its decoders refuse
            raise UndecodableSample(f"not a decodable JPEG ({e})") from e

    return decode


def _torchcodec():
    from torchcodec.decoders import decode_jpeg

    def decode(data: bytes) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode="RGB")
        except RuntimeError as e:  # TorchCodec's error type for a file it refuses
            raise UndecodableSample(f"not a decodable JPEG ({e})") from e

    return decode


def _pil():
    return decode_lossless


def decode_reduced(data: bytes, factor: int) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB [3, ceil(H / factor), ceil(W / factor)] through libjpeg-turbo's scaled IDCT
    (factor 1, 2, 4 or 8; simplejpeg picks the scale that gives at least that size, which is exactly
    1/factor for these)."""
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    return _from_hwc(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // factor),
                                            min_width=-(-w // factor)))


def decode_window(data: bytes, top: int, left: int, height: int, width: int, factor: int = 1) -> torch.Tensor:
    """uint8 RGB [3, height, width]: that window of the JPEG decoded at 1/factor of its size (factor 1, 2, 4 or
    8; the window in the reduced image's pixels), without decoding the rest (deepspike_jpeg, libjpeg-turbo's
    partial decode). The same pixels as `decode_reduced(data, factor)[:, top:top + height, left:left + width]`.
    NotImplementedError for CMYK files, which libjpeg cannot convert to RGB."""
    import deepspike_jpeg

    buf = deepspike_jpeg.decode_window(data, top, left, height, width, factor)
    return torch.frombuffer(buf, dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


def require_window_decoder() -> None:
    """A clear error, before any worker starts, when deepspike_jpeg is not built."""
    try:
        import deepspike_jpeg  # noqa: F401
    except ImportError as e:
        raise ValueError(f"data.window_decode needs deepspike's compiled JPEG decoder (module deepspike_jpeg: "
                         f"{e}). Build it from the checkout root with `python models/csrc/build.py` (`make test` "
                         "and `make demo` do), or set data.window_decode=false") from e


class DecoderCrop:
    """JPEG bytes -> uint8 [3, size, size]: v2.RandomResizedCrop(size) (+ v2.RandomHorizontalFlip with `flip`)
    with the same draws from torch's RNG as the decode-then-crop path, so a seed gives the same window and
    flip; the window is drawn from the JPEG's header before any pixel is decoded.

    `window` (data.window_decode): only the window is decoded (`decode_window`): the same pixels as decoding
    the whole image first, at about 1.3x the speed (bench.loaders). `reduce` (data.reduced_decode): the JPEG
    is decoded at the largest power-of-two reduction (up to 8) that leaves the window's short side at least
    `size` px, and the window is cut from that smaller image.

    Only 1/2 and smaller pay: libjpeg-turbo's other scales (7/8 ... 5/8) have no SIMD path and decode slower
    than full size (bench.loaders), and 1/2 needs a window of at least 2 * size px, so with 224 px crops this
    changes nothing for images stored at <= 448 px on the short side. Where it applies the pixels differ
    from decode-then-crop: the scaled IDCT averages 8x8 blocks instead of the antialiased bilinear resize
    doing all the reduction, and the window's edges are rounded to the reduced grid (under `factor` stored
    pixels); tests/test_data_decoders.py bounds the difference. `decode(data, factor)`: the whole-image
    decoder for `window=False` and for CMYK files."""

    def __init__(self, size: int, flip: bool, reduce: bool = True, window: bool = False, decode=decode_reduced,
                 max_pixels: int = MAX_PIXELS):
        from torchvision.transforms import v2

        self.size, self.reduce, self.window, self.decode, self.flip = size, reduce, window, decode, flip
        self.max_pixels = max_pixels
        self.crop = v2.RandomResizedCrop(size, antialias=True)
        self.whole_image_decodes = 0  # CMYK files under `window`, in this process

    def __call__(self, data: bytes) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        h, w = jpeg_size(data, self.max_pixels)
        box = self.crop.make_params([torch.zeros(1, 1, 1).expand(3, h, w)])  # only the size is read
        factor = 1
        while self.reduce and factor < 8 and min(box["height"], box["width"]) >= 2 * factor * self.size:
            factor *= 2
        # The window on the grid of the image decoded at 1/factor, inside it.
        rh, rw = -(-h // factor), -(-w // factor)
        top, left = int(box["top"] * rh / h), int(box["left"] * rw / w)
        height = min(rh - top, max(1, round(box["height"] * rh / h)))
        width = min(rw - left, max(1, round(box["width"] * rw / w)))
        x = None
        if self.window:
            try:
                x = decode_window(data, top, left, height, width, factor)
            except NotImplementedError:
                self._count_whole_image_decode()
        if x is None:
            x = self.decode(data, factor)[:, top:top + height, left:left + width]
        x = F.resize(x, [self.size, self.size], antialias=True)
        # v2.RandomHorizontalFlip's own draw, without its per-call dispatch (a tenth of this call's time)
        return x.flip(-1) if self.flip and torch.rand(1) < 0.5 else x

    def _count_whole_image_decode(self) -> None:
        self.whole_image_decodes += 1
        n = self.whole_image_decodes
        if n & (n - 1) == 0:  # 1, 2, 4, ...: the count grows in the log without a line per file
            log.warning("%d CMYK JPEG(s) so far in this process took the whole-image decode (libjpeg cannot "
                        "convert CMYK to RGB window by window): slower, the same pixels", n)
