"""data.window_decode: deepspike_jpeg decodes only a crop's window, with the pixels of the whole-image decode,
for every kind of JPEG a data set holds, and the train batches do not change."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders import DataConfig, build_loader, synthetic
from dataloaders.decoders import DecoderCrop, decode_reduced, decode_window, get_decoder, require_window_decoder
from dataloaders.transforms import seeded

pytest_plugins = ["data_fixtures"]


def _jpeg(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


_COLOUR = Image.fromarray(synthetic.class_image(2, 5, 203, 317, np.random.default_rng(1)))
KINDS = {
    "4:2:0": _jpeg(_COLOUR, subsampling=2),
    "4:2:2": _jpeg(_COLOUR, subsampling=1),
    "4:4:4": _jpeg(_COLOUR, subsampling=0),
    "grey": _jpeg(_COLOUR.convert("L")),
    "progressive": _jpeg(_COLOUR, progressive=True),
    "restart markers": _jpeg(_COLOUR, restart_marker_rows=1),
    "tiny": _jpeg(_COLOUR.resize((9, 5))),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_a_window_has_the_pixels_of_the_whole_decode(kind, factor):
    """Random windows (the image's edges included) of every subsampling, a grey file, a progressive one and
    one with restart markers, at every scale: bit for bit the whole-image decode's pixels."""
    data, rng = KINDS[kind], np.random.default_rng(factor)
    whole = decode_reduced(data, factor)
    _, h, w = whole.shape
    windows = [(0, 0, h, w), (h - 1, w - 1, 1, 1), (0, w - 1, h, 1)]
    for _ in range(60):
        height, width = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        windows.append((int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1)), height, width))
    for top, left, height, width in windows:
        x = decode_window(data, top, left, height, width, factor)
        assert torch.equal(x, whole[:, top:top + height, left:left + width]), (kind, top, left, height, width)


def test_bad_input_is_a_value_error():
    data = KINDS["4:2:0"]
    for args in ((0, 0, 204, 10), (-1, 0, 5, 5), (0, 300, 5, 18), (0, 0, 0, 5), (5, 0, 2**31 - 1, 5)):
        with pytest.raises(ValueError, match="outside"):
            decode_window(data, *args, 1)
    with pytest.raises(ValueError, match="factor"):
        decode_window(data, 0, 0, 5, 5, 3)
    for corrupt in (b"\xff\xd8\xff\xe0 this is no jpeg", b"", data[:300]):
        with pytest.raises(ValueError, match="not a decodable JPEG"):
            decode_window(corrupt, 0, 0, 5, 5, 1)


def test_a_cut_short_jpeg_is_refused_where_the_window_reaches_the_cut():
    """libjpeg pads over missing entropy data with a warning; like simplejpeg, the window decoder refuses
    the file instead, but only when the window reaches the cut: decoding stops after the window's last row,
    and rows above the cut are the file's own pixels."""
    data = KINDS["4:2:0"]
    cut = data[: len(data) // 2]
    with pytest.raises(ValueError, match="Premature end"):
        get_decoder("simplejpeg")(cut)
    with pytest.raises(ValueError, match="not a decodable JPEG.*Premature end"):
        decode_window(cut, 150, 20, 50, 200, 1)
    assert torch.equal(decode_window(cut, 0, 20, 40, 200, 1), get_decoder("simplejpeg")(data)[:, :40, 20:220])


def test_decoder_crop_matches_decode_then_crop_and_falls_back_for_cmyk(caplog):
    """The same seed draws the same window and flip as v2.RandomResizedCrop + flip on the decoded image: the
    crops are equal. CMYK files, which libjpeg cannot turn into RGB, take the whole-image decode, counted in
    the log (at the 1st, 2nd, 4th ... file of a process)."""
    from torchvision.transforms import v2

    full = v2.Compose([v2.RandomResizedCrop(48, antialias=True), v2.RandomHorizontalFlip()])
    window = DecoderCrop(48, flip=True, reduce=False, window=True)
    for data in (KINDS["4:2:0"], KINDS["grey"]):
        decoded = get_decoder("simplejpeg")(data)
        for seed in range(40):
            assert torch.equal(seeded(window, data, seed), seeded(full, decoded, seed)), seed
    cmyk = _jpeg(_COLOUR.convert("CMYK"))
    with pytest.raises(NotImplementedError):
        decode_window(cmyk, 0, 0, 5, 5, 1)
    whole = DecoderCrop(48, flip=True, reduce=False, window=False)
    assert window.whole_image_decodes == 0
    assert torch.equal(seeded(window, cmyk, 3), seeded(whole, cmyk, 3))
    seeded(window, cmyk, 4)
    seeded(window, cmyk, 5)
    assert window.whole_image_decodes == 3 and whole.whole_image_decodes == 0  # counted where windows decode
    assert [r.getMessage()[:2] for r in caplog.records if "CMYK" in r.getMessage()] == ["1 ", "2 "]  # 1, 2, 4..


def _epoch(imagenet_wds, image_size: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = DataConfig(dataset="imagenet", path=str(imagenet_wds), batch_size=6, num_workers=0, image_size=image_size,
                     hflip=True, **{"auto_augment": False, **kw})
    return [(x.clone(), y.clone()) for x, y in build_loader(cfg, "train", 0, 1)]


@pytest.mark.parametrize("options", [{}, {"auto_augment": True}])
def test_train_batches_are_those_of_the_whole_image_decode(imagenet_wds, options):
    """The default (window decode) and with AutoAugment, against data.window_decode=false: the same train
    batches, bit for bit, crops, flips and AutoAugment ops drawn from the same per-sample seeds."""
    tested = _epoch(imagenet_wds, 64, **options)
    whole = _epoch(imagenet_wds, 64, window_decode=False, auto_augment=options.get("auto_augment", False))
    assert len(tested) == len(whole) == 4
    for (xa, ya), (xb, yb) in zip(tested, whole):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("window_decode", [True, False])
def test_reduced_decode_reduces_and_keeps_the_crops(imagenet_wds, window_decode):
    """data.reduced_decode with and without the window decode, at 16 px crops of the 40-96 px images, where
    windows of >= 32 px are decoded at 1/2 or less: the same samples, crops and flips as the whole-image
    decode (close pixels), but not the same pixels everywhere (a reduction happened)."""
    tested = _epoch(imagenet_wds, 16, reduced_decode=True, window_decode=window_decode)
    whole = _epoch(imagenet_wds, 16, window_decode=False)
    assert len(tested) == len(whole) == 4
    diffs = []
    for (xa, ya), (xb, yb) in zip(tested, whole):
        assert torch.equal(ya, yb)
        diffs += (xa.int() - xb.int()).abs().float().mean(dim=(1, 2, 3)).tolist()
    reduced = sum(d > 0 for d in diffs)
    assert 0 < reduced < len(diffs) and np.mean(diffs) < 10, diffs
    print(f"reduced_decode, window_decode={window_decode}: {reduced} of {len(diffs)} crops decoded at a "
          f"reduced scale, mean |difference| {np.mean(diffs):.2f} levels of 255")


def test_a_missing_build_is_a_clear_error(monkeypatch, imagenet_wds):
    monkeypatch.setitem(sys.modules, "deepspike_jpeg", None)  # what an import finds when it is not built
    with pytest.raises(ValueError, match="models/csrc/build.py.*window_decode=false"):
        require_window_decoder()
    cfg = DataConfig(dataset="imagenet", path=str(imagenet_wds), batch_size=6, num_workers=0, image_size=32)
    with pytest.raises(ValueError, match="deepspike_jpeg"):
        build_loader(cfg, "train", 0, 1)
    build_loader(DataConfig(**{**cfg.__dict__, "window_decode": False}), "train", 0, 1)
