"""The FFCV path: FFCV's decoders and threads, driven by our epoch plan.

FFCV's own random ops draw from unseeded per-thread RNGs, which makes an interrupted epoch impossible to
replay. So the ImageNet train decoder is FFCV's ResizedCropRGBImageDecoder with one change: each sample
seeds the RNG from `mix_seed(epoch_key, index)` before choosing its crop (and flip). Train and eval
decoders also report JPEGs that fail to decode (FFCV itself yields the previous image's pixels for them):
those rows get label -1 and are counted as decode errors, as on the wds path. The key is a compile-
time constant of the generated code, so a new epoch recompiles the pipeline (a few seconds per epoch).
Small fixed-size images (CIFAR, digits) are decoded raw by FFCV and cropped/flipped per sample with
torchvision, seeded the same way; AutoAugment (ImageNet) also runs there, on the loader's thread.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.ndarray import NDArrayDecoder
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    ResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
    get_center_crop,
    get_random_crop,
)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as FfcvLoader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from dataloaders.datasets import get_dataset
from dataloaders.order import mix_seed
from dataloaders.transforms import seeded

log = logging.getLogger(__name__)


class CheckedCrop(ResizedCropRGBImageDecoder):
    """FFCV's resized-crop decoding (random crop: RandomResizedCrop with scale 0.08-1, ratio 3/4-4/3 and an
    optional flip, reproducible per (key, sample); or center crop with `center_ratio`), with undecodable
    JPEGs flagged. FFCV ignores imdecode's status and passes on whatever its buffer held before (an earlier
    image) as the sample; here each output image carries one extra row whose first byte is 1 for a sample
    that failed to decode (the image is zeros), which `FfcvBackend` strips, counts and blanks."""

    def __init__(self, output_size: tuple[int, int], flip: bool = False, key: int = 0,
                 center_ratio: float | None = None):
        super().__init__(output_size)
        self.flip, self.key, self.center_ratio = flip, key, center_ratio
        self.scale, self.ratio = ((0.08, 1.0), (3 / 4, 4 / 3)) if center_ratio is None else (None, center_ratio)

    @property
    def get_crop_generator(self):
        return get_random_crop if self.center_ratio is None else get_center_crop

    def declare_state_and_memory(self, previous_state):
        state, (out, temp) = super().declare_state_and_memory(previous_state)
        shape = (out.shape[0] + 1, *out.shape[1:])
        return replace(state, shape=shape), (AllocationQuery(shape, out.dtype), temp)

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        # Fresh dispatchers per compilation, as FFCV's own decoders do: numba dispatchers shared between
        # generated pipelines break once one of those pipelines is garbage collected.
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c, mix_c = Compiler.compile(self.get_crop_generator), Compiler.compile(mix_seed)
        seeded, flip, key, rows = self.center_ratio is None, self.flip, np.uint64(self.key), self.output_size[0]
        scale = np.array(self.scale) if seeded else None
        ratio = np.array(self.ratio) if seeded else self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                image = destination[dst_ix]
                image[rows, 0, 0] = 0
                status = 0
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    status = imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                                        False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                if status != 0:
                    image[:] = 0
                    image[rows, 0, 0] = 1
                else:
                    if seeded:  # numba keeps one RNG per thread; seeding it here makes the draws per sample
                        np.random.seed(mix_c(key, source_ix))
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, image[:rows])
                    if flip and np.random.random() < 0.5:
                        image[:rows] = image[:rows][:, ::-1].copy()
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


def _next(epoch_iter):
    """next(epoch_iter), but an error instead of a hang when FFCV's loading thread has died (FFCV prints
    the thread's exception and leaves the consumer waiting forever)."""
    q = epoch_iter.output_queue
    with q.not_empty:  # holds q.mutex: hence the lock-free _qsize
        while not q._qsize():
            if not epoch_iter.is_alive():
                raise RuntimeError("FFCV's loading thread stopped in the middle of an epoch; its error is "
                                   "printed above")
            q.not_empty.wait(timeout=1.0)
    return next(epoch_iter)


class _PlannedOrder(TraversalOrder):
    """Serves the indices our plan chose (FFCV asks once per `iter`). FFCV takes an instance and calls it
    with the loader."""

    def __init__(self):
        pass

    def __call__(self, loader):
        super().__init__(loader)
        return self

    def sample_order(self, epoch):
        return getattr(self.loader, "planned", self.indices)


class FfcvBackend:
    def __init__(self, cfg, manifest: dict, path: str, train: bool, augment, blank_shape):
        self.augment, self.blank_shape, self.path = augment, blank_shape, path
        skipped = [s["index"] for s in manifest["skipped"]]
        self.records = np.setdiff1d(np.arange(manifest["num_records"]), skipped).astype(np.uint64)
        self.dtype = torch.uint16 if manifest["sample"]["kind"] == "frames" else torch.uint8
        self.seeded = None
        if manifest["sample"]["kind"] == "frames":
            field, decoders = "frames", [NDArrayDecoder(), ToTensor()]
        elif not get_dataset(cfg.dataset).decoder_crops:
            field, decoders = "image", [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()]
        elif train:
            self.seeded = CheckedCrop((cfg.image_size, cfg.image_size), cfg.hflip)
            field, decoders = "image", [self.seeded, ToTensor(), ToTorchImage()]
        else:
            crop = CheckedCrop((cfg.val_crop, cfg.val_crop), center_ratio=cfg.val_crop / cfg.val_resize)
            field, decoders = "image", [crop, ToTensor(), ToTorchImage()]
        self.checked = isinstance(decoders[0], CheckedCrop)
        self.loader = FfcvLoader(path, batch_size=cfg.batch_size, num_workers=max(1, cfg.num_workers),
                                 order=_PlannedOrder(), drop_last=False, os_cache=True,
                                 pipelines={field: decoders, "label": [IntDecoder(), ToTensor()]})
        self._epoch_iter = None

    def batches(self, rows: np.ndarray, seeds: np.ndarray | None, epoch_key: int, reads: None):
        """`reads` is always None: FFCV files are read by position (DataConfig refuses data.access=stream)."""
        if self._epoch_iter is not None:  # stop FFCV's thread of an abandoned epoch before starting another
            self._epoch_iter.close()
        if self.seeded is not None and self.seeded.key != epoch_key:
            self.seeded.key = epoch_key
            self.loader.generate_code()
        real = rows[rows >= 0]
        self.loader.planned = self.records[real]
        self._epoch_iter = iter(self.loader) if len(real) else None
        for r, row in enumerate(rows):
            n = int((row >= 0).sum())
            y = torch.full((len(row),), -1, dtype=torch.int64)
            if not n:
                yield torch.zeros((len(row), *self.blank_shape), dtype=self.dtype), y, 0
                continue
            images, labels = _next(self._epoch_iter)
            bad = torch.zeros(n, dtype=torch.bool)
            if self.checked:  # CheckedCrop's status row
                bad, images = images[:, 0, -1, 0] == 1, images[:, :, :-1]
                for k in bad.nonzero().flatten().tolist():
                    log.warning("skipping undecodable record %d of %s", int(self.records[row[k]]), self.path)
            if self.augment is not None:
                images = torch.stack([seeded(self.augment, im, None if seeds is None else int(seeds[r, k]))
                                      for k, im in enumerate(images)])
            x = torch.zeros((len(row), *images.shape[1:]), dtype=images.dtype)
            x[:n], y[:n] = images, labels.reshape(-1)  # copies: FFCV reuses its buffers for later batches
            y[:n][bad] = -1
            yield x, y, int(bad.sum())
