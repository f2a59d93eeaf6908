"""`build_loader`: one rank's stateful, resumable stream of batches, from wds or ffcv files.

    loader = build_loader(DataConfig(dataset="imagenet", format="wds", path="/data/imagenet-wds"),
                          "train", rank, world_size)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # images uint8 [N, C, H, W] (uint16 [N, T, 2, 128, 128] for DVS)
            x = loader.normalize(images.to(device), labels.to(device))   # float32, what the model takes
            ...
        state = loader.state_dict()     # store with the checkpoint; load_state_dict() resumes mid-epoch
    loader.seek(epoch, batches)         # the same position on another world size

Every rank yields `len(loader)` batches per epoch (see `dataloaders.order` for the plan, and
`dataloaders.stream` for data.access=stream). Rows with label -1 are zeros (after `normalize` too) and
carry no sample: eval padding on ranks that ran out of data (train too in stream mode, which reads every
sample once per epoch), or a sample that failed to decode (logged, counted in `metrics()`:
`data/decode_errors` for train over the run, `val/decode_errors` for the latest pass over an eval split,
both summed over ranks); use `ignore_index=-1` in the loss and mask them in accuracy counts. With
data.access=random train batches are always full (the epoch's remainder is dropped); eval batches keep their
size with padding rows. Batches stay uint8 up to the training device, where `loader.to_model(x, y, device,
dtype)` normalises them and puts sequence data time first (the data set's `time_first`): normalising in the
loader cost its CPU about a third as much again as decoding and cropping, mostly page faults on each fresh
float batch (bench.loaders).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from dataloaders import transforms
from dataloaders.config import DataConfig
from dataloaders.datasets import crops_in_decoder, get_dataset
from dataloaders.manifest import is_remote, read_manifest, resolve
from dataloaders.order import PAD, SampleOrder
from dataloaders.stream import ShardStream, StreamOrder

log = logging.getLogger(__name__)


def model_input(x, device, dtype, time_first: bool, normalize=None, labels=None):
    """Batch as the model takes it: time first for sequence data ([N, T, C, H, W] -> [T, N, ...]), on the
    device, in `dtype` (the model's weights' dtype). `normalize` (a Loader's: its batches are uint8) runs on
    the device after the copy (asynchronous on a GPU from the DataLoader's pinned memory); `labels` (on the
    device already) lets it zero the padding rows."""
    if normalize is not None:
        x = normalize(x.to(device, non_blocking=True), labels)
    x = x.transpose(0, 1) if time_first else x
    return x.to(device, dtype=dtype, non_blocking=True)


class Loader:
    def __init__(self, plan: SampleOrder, backend, normalize, classes: list[str], time_first: bool = False):
        self.plan, self.backend, self.normalize, self.classes = plan, backend, normalize, classes
        self.time_first = time_first
        """The data set's: the model takes its batches time first."""
        self.epoch, self.batches_yielded, self.decode_errors = 0, 0, 0
        self.pass_decode_errors = 0  # since the current pass over the split began (an eval's count)

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        """Real (non-padding) samples this rank reads per epoch."""
        return int((self.plan.rows(self.epoch) != PAD).sum())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; the same epoch again keeps a restored mid-epoch position."""
        if epoch != self.epoch:
            self.epoch, self.batches_yielded = epoch, 0

    def __iter__(self):
        epoch, start = self.epoch, self.batches_yielded
        rows = self.plan.rows(epoch)[start:]
        seeds = self.plan.seeds(epoch, rows)
        batches = self.backend.batches(rows, seeds, self.plan.epoch_key(epoch), self.plan.reads(epoch))
        if start == 0:
            self.pass_decode_errors = 0
        for k, (images, labels, bad) in enumerate(batches):
            self.decode_errors += bad
            self.pass_decode_errors += bad
            # Advance before handing the batch over: a checkpoint taken after using it resumes after it, and
            # after the last batch the state already points at the next epoch.
            if start + k + 1 == len(self):
                self.epoch, self.batches_yielded = epoch + 1, 0
            else:
                self.batches_yielded = start + k + 1
            yield images, labels

    def to_model(self, x, y, device, dtype):
        """(inputs, labels) of one of this loader's batches as the model and the loss take them."""
        y = y.to(device, non_blocking=True)
        return model_input(x, device, dtype, self.time_first, self.normalize, y), y

    def seek(self, epoch: int, batches: int) -> None:
        """Continue `batches` batches into `epoch`. Unlike `load_state_dict`, this holds under another world
        size: an epoch's order depends only on (seed, epoch), and every global batch is the next
        global-batch samples of it whatever the number of ranks."""
        if not 0 <= batches < len(self):
            raise ValueError(f"cannot seek {batches} batches into an epoch of {len(self)}")
        if isinstance(self.plan, StreamOrder) and batches:
            log.warning("data.access=stream splits an epoch by world size: continuing %d batches into epoch %d "
                        "on another world size may repeat or miss some of this epoch's samples", batches, epoch)
        self.epoch, self.batches_yielded = epoch, batches

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": self.plan.seed,
                 "world_size": self.plan.world_size, "decode_errors": self.decode_errors, "access": self.access}
        if isinstance(self.plan, StreamOrder):  # where this rank's reading restarts, for people and logs
            state["stream"] = self.plan.position(self.epoch, self.batches_yielded)
        return state

    @property
    def access(self) -> str:
        return "stream" if isinstance(self.plan, StreamOrder) else "random"

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.plan.seed, "world_size": self.plan.world_size, "access": self.access}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {value}: a "
                                 "mid-epoch position only means the same thing with the same seed, world size "
                                 "and data.access (start a fresh epoch with set_epoch instead)")
        self.epoch, self.batches_yielded = state["epoch"], state["batches_yielded"]
        self.decode_errors = state["decode_errors"]

    def metrics(self, device=None) -> dict[str, float]:
        """Collective in a process group of several ranks: the counts summed over ranks, reduced on `device`
        (the training device: an NCCL group takes no CPU tensors). Train: `data/decode_errors` over the run;
        eval splits: `val/decode_errors` of the latest pass."""
        import torch
        import torch.distributed as dist

        train = self.plan.train
        count = torch.tensor([self.decode_errors if train else self.pass_decode_errors], dtype=torch.float64,
                             device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if device is None:
                raise ValueError("Loader.metrics sums over ranks: pass the training device")
            dist.all_reduce(count)
        return {"data/decode_errors" if train else "val/decode_errors": count.item()}


def build_loader(cfg: DataConfig, split: str, rank: int, world_size: int) -> Loader:
    """Loader of `split` ('train' shuffles and augments; 'val'/'test' are read exactly once, either name
    works for data sets that ship only one of them) for `rank` of `world_size`."""
    cfg.validate()
    if not cfg.path:
        raise ValueError("data.path is empty: point it at the --out folder of dataloaders.convert")
    manifest = read_manifest(cfg.path, split, cfg.format)
    if manifest["dataset"] != cfg.dataset:
        raise ValueError(f"{cfg.path} holds {manifest['dataset']!r}, but data.dataset={cfg.dataset!r}")
    train, spec = split == "train", get_dataset(cfg.dataset)
    if cfg.access == "stream":
        sizes = tuple(s["num_samples"] for s in manifest["shards"])
        plan = StreamOrder(manifest["num_samples"], cfg.batch_size, rank, world_size, cfg.seed, train, sizes,
                          cfg.shuffle_buffer)
    else:
        plan = SampleOrder(manifest["num_samples"], cfg.batch_size, rank, world_size, cfg.seed, train)
    stored = manifest["sample"]["shape"]
    shape = transforms.output_shape(cfg, stored, train)
    side = stored[0] if stored else manifest.get("stats", {}).get("median_short_side", cfg.image_size)
    if cfg.format == "wds":
        from dataloaders.decoders import DecoderCrop, require_window_decoder
        from dataloaders.wds_reader import ShardSet, WdsDataset

        jpeg = manifest["sample"]["ext"] == "jpg"
        if cfg.reduced_decode and train and not jpeg:
            raise ValueError(f"data.reduced_decode decodes JPEGs; {cfg.path} stores {manifest['sample']['ext']}")
        window = cfg.window_decode and train and jpeg and crops_in_decoder(spec, cfg, side)
        if window:
            require_window_decoder()
        crop = None
        if window or (cfg.reduced_decode and train):
            crop = DecoderCrop(cfg.image_size, cfg.hflip, reduce=cfg.reduced_decode, window=window,
                               max_pixels=cfg.max_pixels)
        augment = transforms.augment(cfg, train, side, cropped_by_decoder=crop is not None)
        shards = ShardSet(cfg.path, manifest, cfg.cache_dir)
        dataset = WdsDataset(shards, manifest["sample"]["ext"], augment, shape, cfg.decoder, len(manifest["classes"]),
                             crop, cfg.max_pixels)
        stream = ShardStream(shards, cfg.retries, cfg.retry_backoff) if cfg.access == "stream" else None
        return Loader(plan, _TorchBackend(dataset, cfg.num_workers, stream), transforms.normalize(cfg, manifest),
                      manifest["classes"], spec.time_first)
    if is_remote(cfg.path):
        raise ValueError(f"FFCV memory-maps local files; copy {cfg.path} to node-local storage first")
    from dataloaders.ffcv_pipeline import FfcvBackend

    augment = transforms.augment(cfg, train, side, cropped_by_decoder=True)
    backend = FfcvBackend(cfg, manifest, resolve(cfg.path, manifest["file"]), train, augment, shape)
    return Loader(plan, backend, transforms.normalize(cfg, manifest), manifest["classes"], spec.time_first)


class InMemory(list):
    """Batches already in memory, ready but for the layout (no normalisation), behind a Loader's `to_model`:
    what `trainer.evaluate.evaluate` takes besides a Loader."""

    def __init__(self, batches, time_first: bool = False):
        super().__init__(batches)
        self.time_first = time_first

    to_model = Loader.to_model
    normalize = None


class _TorchBackend:
    """A torch DataLoader whose batch sampler serves the plan's remaining rows; its workers persist across
    epochs."""

    def __init__(self, dataset, num_workers: int, stream=None):
        import torch

        # The sampler is its own object: were it this backend, the DataLoader would sit in a reference
        # cycle and its workers would be shut down by the cyclic GC, which can close their queues first
        # and leave each join to time out.
        self.rows, self.stream = _Rows(), stream
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.rows, num_workers=num_workers,
                                                  persistent_workers=num_workers > 0,
                                                  pin_memory=torch.cuda.is_available())

    def batches(self, rows: np.ndarray, seeds: np.ndarray | None, epoch_key: int, reads: np.ndarray | None):
        items = [[(int(p), None if seeds is None else int(s)) for p, s in
                  zip(row, seeds[r] if seeds is not None else row)] for r, row in enumerate(rows)]
        # Streaming: the sampler, in this process, reads the shards in order as the workers ask for batches
        # (their prefetch is the read-ahead) and hands each item its bytes.
        self.rows.count = len(items)
        self.rows.items = items if reads is None else self.stream.items(items, reads)
        for images, labels, bad in self.loader:
            yield images, labels, int(bad.sum())


class _Rows:
    """Batch sampler protocol, run in the main process: lists of (position, seed) items."""

    def __init__(self):
        self.items: Iterable[list[tuple]] = []
        self.count = 0

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.count
