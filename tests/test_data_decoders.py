"""data.decoder: every JPEG decoder gives the same RGB pixels (up to libjpeg rounding) for colour and grey
files, refuses corrupt bytes in a way the loader counts, and can drive the wds loader."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders import DataConfig, build_loader, synthetic
from dataloaders.config import DECODERS
from dataloaders.decoders import get_decoder

pytest_plugins = ["data_fixtures"]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("name", DECODERS)
def test_decoders_agree_on_pixels_and_refuse_corrupt_bytes(name):
    decode = get_decoder(name)
    colour = Image.fromarray(synthetic.class_image(1, 3, 37, 52, np.random.default_rng(0)))
    for image in (colour, colour.convert("L")):
        data = _jpeg(image)
        ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        x = decode(data)
        assert x.dtype == torch.uint8 and x.shape == (3, 37, 52)
        assert (x.int() - ref.int()).abs().max() <= 2, name
    with pytest.raises((ValueError, RuntimeError)):
        decode(b"\xff\xd8\xff\xe0 this is no jpeg")


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="data.decoder='nvjpeg'"):
        DataConfig(decoder="nvjpeg")


def test_loader_batches_match_across_decoders(imagenet_wds):
    """The same eval batch through the old default and the new one: identical up to rounding."""
    def batch(decoder):
        cfg = DataConfig(dataset="imagenet", path=str(imagenet_wds), batch_size=12, num_workers=0,
                         val_resize=48, val_crop=40, decoder=decoder)
        return next(iter(build_loader(cfg, "val", 0, 1)))

    (x_old, y_old), (x_new, y_new) = batch("torchvision"), batch("simplejpeg")
    assert torch.equal(y_old, y_new) and (x_old.int() - x_new.int()).abs().max() <= 2


def test_reduced_decode_stays_close_to_decoding_first():
    """Where the JPEG is decoded at 1/2 to 1/8 (400x480 px stored, 32 px crops: every window of >= 64 px),
    the same seed gives the same window and flip, so a crop differs only by the scaled IDCT's filtering and
    the window rounded to the reduced grid: on these striped, noisy images under 5 levels of 255 on average
    and under 10 for any one crop."""
    from torchvision.transforms import v2

    from dataloaders.decoders import DecoderCrop, decode_reduced
    from dataloaders.transforms import seeded

    data = _jpeg(Image.fromarray(synthetic.class_image(1, 3, 400, 480, np.random.default_rng(0))))
    assert decode_reduced(data, 2).shape == (3, 200, 240) and decode_reduced(data, 8).shape == (3, 50, 60)
    assert torch.equal(decode_reduced(data, 1), get_decoder("simplejpeg")(data))
    reduced, windowed = DecoderCrop(32, flip=True), DecoderCrop(32, flip=True, window=True)
    full = v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip()])
    errors = []
    for seed in range(100):
        a, b = seeded(reduced, data, seed), seeded(full, get_decoder("simplejpeg")(data), seed)
        assert torch.equal(seeded(windowed, data, seed), a)  # the window of the reduced image is that image's
        assert a.shape == b.shape == (3, 32, 32)
        errors.append((a.int() - b.int()).abs().float().mean().item())
    assert 0 < np.mean(errors) < 5 and max(errors) < 10, (np.mean(errors), max(errors))


def test_reduced_decode_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="reduced_decode"):
        DataConfig(dataset="imagenet", format="ffcv", reduced_decode=True)
    with pytest.raises(ValueError, match="reduced_decode"):
        DataConfig(dataset="cifar10", reduced_decode=True)
