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
