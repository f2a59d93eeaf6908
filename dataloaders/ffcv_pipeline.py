"""The FFCV path: FFCV's decoders and threads, driven by our epoch plan.

FFCV's own random ops draw from unseeded per-thread RNGs, which makes an interrupted epoch impossible to
replay. So the ImageNet train decoder is FFCV's ResizedCropRGBImageDecoder with one change: each sample
seeds the RNG from `mix_seed(epoch_key, index)` before choosing its crop (and flip). The key is a compile-
time constant of the generated code, so a new epoch recompiles the pipeline (a few seconds per epoch).
Small fixed-size images (CIFAR, digits) are decoded raw by FFCV and cropped/flipped per sample with
torchvision, seeded the same way; AutoAugment (ImageNet) also runs there, on the loader's thread.
"""

from __future__ import annotations

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.ndarray import NDArrayDecoder
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    ResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
    get_random_crop,
)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as FfcvLoader
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from dataloaders.datasets import get_dataset
from dataloaders.order import mix_seed
from dataloaders.transforms import seeded


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + optional flip, reproducible per (key, sample)."""

    def __init__(self, output_size: tuple[int, int], flip: bool, key: int = 0):
        super().__init__(output_size)
        self.scale, self.ratio, self.flip, self.key = (0.08, 1.0), (3 / 4, 4 / 3), flip, key

    @property
    def get_crop_generator(self):
        return get_random_crop

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        # Fresh dispatchers per compilation, as FFCV's own decoders do: numba dispatchers shared between
        # generated pipelines break once one of those pipelines is garbage collected.
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c, mix_c = Compiler.compile(get_random_crop), Compiler.compile(mix_seed)
        scale, ratio, flip, key = np.array(self.scale), np.array(self.ratio), self.flip, np.uint64(self.key)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                # numba keeps one RNG per thread; seeding it here makes the draws depend on the sample only
                np.random.seed(mix_c(key, source_ix))
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                if flip and np.random.random() < 0.5:
                    destination[dst_ix] = destination[dst_ix][:, ::-1].copy()
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
        self.augment, self.blank_shape = augment, blank_shape
        skipped = [s["index"] for s in manifest["skipped"]]
        self.records = np.setdiff1d(np.arange(manifest["num_records"]), skipped).astype(np.uint64)
        self.dtype = torch.uint16 if manifest["sample"]["kind"] == "frames" else torch.uint8
        self.seeded = None
        if manifest["sample"]["kind"] == "frames":
            field, decoders = "frames", [NDArrayDecoder(), ToTensor()]
        elif not get_dataset(cfg.dataset).decoder_crops:
            field, decoders = "image", [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()]
        elif train:
            self.seeded = SeededRandomResizedCrop((cfg.image_size, cfg.image_size), cfg.hflip)
            field, decoders = "image", [self.seeded, ToTensor(), ToTorchImage()]
        else:
            side = (cfg.val_crop, cfg.val_crop)
            crop = CenterCropRGBImageDecoder(side, ratio=cfg.val_crop / cfg.val_resize)
            field, decoders = "image", [crop, ToTensor(), ToTorchImage()]
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
            if self.augment is not None:
                images = torch.stack([seeded(self.augment, im, None if seeds is None else int(seeds[r, k]))
                                      for k, im in enumerate(images)])
            x = torch.zeros((len(row), *images.shape[1:]), dtype=images.dtype)
            x[:n], y[:n] = images, labels.reshape(-1)  # copies: FFCV reuses its buffers for later batches
            yield x, y, 0
