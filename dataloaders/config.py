"""What a loader reads and how (`DataConfig`, the training config's `data` section), and how the converter
writes what it reads (`ConvertConfig`, the options of `python -m dataloaders.convert`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dataloaders.datasets import get_dataset, list_datasets

FORMATS = ("wds", "ffcv")
FOLDER_AUGMENTS = ("auto", "pad_crop", "resized_crop")
ACCESS = ("random", "stream")
DECODERS = ("simplejpeg", "torchvision", "opencv", "torchcodec", "pil")
ON_ERROR = ("skip", "stop")
WRITE_MODES = ("raw", "jpg", "smart")
# 2**27 px (e.g. 16,384 x 8,192; 384 MiB of RGB pixels): an order of magnitude above camera photos such as
# ImageNet's, small enough that a worker decoding one does not take the node's memory.
MAX_PIXELS = 1 << 27


@dataclass
class DataConfig:
    dataset: str = "digits"
    """A `dataloaders.datasets` module's name: `list_datasets()`."""
    format: str = "wds"
    """'wds' (WebDataset tar shards) or 'ffcv' (.beton files)."""
    path: str = ""
    """The `--out` folder of `python -m dataloaders.convert`. For wds it may be a URL (`https://...`,
    `s3://...` through fsspec) or a `pipe:` command with `{}` standing for the file name."""
    batch_size: int = 32
    """Per-rank micro batch."""
    num_workers: int = 2
    """DataLoader worker processes (wds) or FFCV threads (ffcv), per rank."""
    image_size: int = 224
    """ImageNet train crop; the small data sets keep their stored size."""
    seed: int = 0
    """Seeds the per-epoch sample order and every sample's augmentation."""
    val_resize: int = 256
    val_crop: int = 224
    """ImageNet evaluation: resize the short side, then center crop (320/288 for the paper's 76.02 %)."""
    auto_augment: bool = True
    """ImageNet train: AutoAugment with the ImageNet policy after the crop, as the authors' recipe."""
    hflip: bool = False
    """ImageNet train: random horizontal flip (the authors' recipe has none). CIFAR always flips."""
    folder_augment: str = "auto"
    """folder: 'pad_crop', 'resized_crop' or 'auto' (by the images' size); see dataloaders.datasets.folder."""
    small_side: int = 64
    """folder, 'auto': images whose median short side is at most this many pixels get 'pad_crop'."""
    cache_dir: str = ""
    """random access: node-local folder for shards fetched from URLs; default ~/.cache/deepspike/shards."""
    decoder: str = "simplejpeg"
    """wds JPEGs: 'simplejpeg', 'torchvision', 'opencv', 'torchcodec' or 'pil'; all give
    the same uint8 RGB pixels up to libjpeg rounding (dataloaders.decoders, measured by bench.loaders). With
    data.window_decode the train crops of ImageNet and folder sets do not use it."""
    window_decode: bool = True
    """wds train, data sets whose FFCV decoder crops (ImageNet, folder), JPEG shards: draw the
    RandomResizedCrop window first and decode only that window (libjpeg-turbo's partial decode,
    deepspike_jpeg): bit-identical batches, less CPU (bench.loaders). No effect elsewhere; false decodes the
    whole image with data.decoder first."""
    reduced_decode: bool = False
    """wds train, data sets whose FFCV decoder crops (ImageNet, folder): draw the RandomResizedCrop first and
    decode each JPEG at the largest power-of-two reduction that leaves the crop >= image_size px (libjpeg-
    turbo's scaled IDCT). The same crops and flips; other pixels where a reduction applies (only for crops of
    >= 2 * image_size px; see decoders.DecoderCrop), hence off by default."""
    access: str = "random"
    """wds: 'random' reads samples of one exact global permutation per epoch (local shards; remote ones are
    fetched whole into cache_dir first); 'stream' has each rank read its own run of shards front to back
    through a shuffle buffer, caching nothing (remote shards too big for a node). See dataloaders.stream."""
    shuffle_buffer: int = 1000
    """stream, train: samples held for the buffered shuffle (WebDataset's shuffle(n)); also the read-ahead."""
    max_pixels: int = MAX_PIXELS
    """wds: a sample whose image header declares more pixels than this is skipped and counted (as an
    undecodable sample) before any decoder allocates memory for it."""
    retries: int = 3
    retry_backoff: float = 1.0
    """stream: re-reads of a failing shard before the run stops, the first after retry_backoff seconds,
    doubling."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise a clear error for a bad value; also run by `build_loader` after command-line overrides."""
        if self.dataset not in list_datasets():
            raise ValueError(f"data.dataset={self.dataset!r}; expected one of {list_datasets()}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}; expected one of {FORMATS}")
        if self.folder_augment not in FOLDER_AUGMENTS:
            raise ValueError(f"data.folder_augment={self.folder_augment!r}; expected one of {FOLDER_AUGMENTS}")
        if self.decoder not in DECODERS:
            raise ValueError(f"data.decoder={self.decoder!r}; expected one of {DECODERS}")
        if self.access not in ACCESS or (self.access == "stream" and self.format != "wds"):
            raise ValueError(f"data.access={self.access!r} with data.format={self.format!r}; expected one of "
                             f"{ACCESS} ('stream' for wds only: FFCV memory-maps local files)")
        if self.reduced_decode and (self.format != "wds" or not get_dataset(self.dataset).decoder_crops):
            raise ValueError(f"data.reduced_decode is for data.format='wds' on a data set with random resized "
                             f"crops (decoder_crops): not format={self.format!r}, dataset={self.dataset!r}")
        if self.shuffle_buffer < 1 or self.retries < 0:
            raise ValueError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1 and "
                             f"data.retries={self.retries} >= 0")
        if self.max_pixels < 1:
            raise ValueError(f"data.max_pixels={self.max_pixels} must be >= 1")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1 and "
                             f"data.num_workers={self.num_workers} >= 0")


def _option(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ConvertConfig:
    """How `dataloaders.convert` writes a data set. Each field is the converter's option of the same name
    (`max_side` is `--max-side`; a true bool is switched off by `--no-<name>`) with the same default, and
    the library call `convert(..., **options)` takes the same names."""

    max_side: int = _option(512, "imagenet, folder: longer image side stored at most (larger images are "
                                 "downscaled)")
    shard_size: int = _option(1000, "wds: source samples per shard")
    workers: int = field(default_factory=lambda: os.cpu_count() or 1,
                         metadata={"help": "processes reading and encoding (default: all CPU cores)"})
    on_error: str = _option("skip", "an unreadable sample: skip it (logged, listed in the manifest) or "
                                    "stop", choices=ON_ERROR)
    write_mode: str = _option("smart", "ffcv images: raw pixels, jpg, or smart (JPEG only when the raw "
                                       "pixels exceed --smart-threshold bytes)", choices=WRITE_MODES)
    smart_threshold: int = _option(3 * 256 * 256, "ffcv, write mode smart: raw-pixel bytes above which an "
                                                  "image is stored as JPEG")
    jpeg_quality: int = _option(90, "quality of re-encoded JPEGs")
    frames: int = _option(20, "cifar10dvs: frames per recording (T)")
    train_fraction: float = _option(0.9, "cifar10dvs: recordings of each class in train")
    size: int = _option(32, "digits: image side")
    verify_md5: bool = _option(True, "cifar10, cifar100: check the files against the published md5 sums "
                                     "before unpickling them (off for pickles you made, which are then "
                                     "unpickled with only numpy arrays allowed)")

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r}; expected one of {ON_ERROR}")
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode={self.write_mode!r}; expected one of {WRITE_MODES}")
        if min(self.max_side, self.shard_size, self.workers, self.frames, self.size) < 1:
            raise ValueError("max_side, shard_size, workers, frames and size must be >= 1")
