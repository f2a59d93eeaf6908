"""CIFAR-10 and CIFAR-100 in their official python formats, both directions.

CIFAR-10 (`cifar-10-batches-py`): five pickled training batches `data_batch_1..5`, one `test_batch`, and
`batches.meta`. Each batch is a dict with 'data' (uint8 [n, 3072]: the red, green, blue 32x32 planes of each
image), 'labels', 'filenames' and 'batch_label'.
CIFAR-100 (`cifar-100-python`): one `train` and one `test` pickle of the same layout with 'fine_labels'
and 'coarse_labels' instead of 'labels', and `meta` with 'fine_label_names' and 'coarse_label_names'. We
train on the 100 fine labels. The published files of both have fixed md5 sums, checked on read before
anything is unpickled unless the files are declared home-made (`verify_md5=False`), so a corrupted or
substituted download fails at conversion, not as noise or as code run by the unpickler. Home-made files
are unpickled with only the numpy globals an array needs. The originals were pickled by Python 2 and load
with encoding='latin1'; so do ours.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
FILES = (*TRAIN_FILES, "test_batch", "batches.meta")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
               "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
               "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
               "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
"""md5 of the files in the published cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a)."""
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"}
"""md5 of the files in the published cifar-100-python.tar.gz (md5 eb9058c3a382ffc7106e4002c42a8d85)."""


MAX_FILE_BYTES = 1 << 28
"""The biggest batch file read (CIFAR-100's train pickle is 155 MB): a bigger archive member is not a CIFAR
file, and reading it (a gzip bomb inflates without bound) is refused before it fills memory."""


class _ArrayUnpickler(pickle.Unpickler):
    """Only what a pickled dict of lists and numpy arrays names; anything else (os.system, ...) is refused."""

    # _codecs.encode: how protocol 2 stores bytes; 'scalar': numpy scalars. Both only build values.
    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR pickle holds only arrays")
        return super().find_class(module, name)


def _load_pickles(src: Path, files: tuple[str, ...], what: str, md5: dict[str, str] | None = None) -> dict:
    """{file name: unpickled dict} from the extracted folder or the distributed `.tar.gz`; each file's bytes
    checked against `md5` when given."""
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir():
        members = {name: (src / name).read_bytes() for name in files if (src / name).is_file()}
    else:
        try:
            with tarfile.open(src, "r:*") as tf:
                wanted = [m for m in tf.getmembers() if m.isfile() and Path(m.name).name in files]
                for m in wanted:
                    if m.size > MAX_FILE_BYTES:
                        raise ValueError(f"{src}: {m.name} is {m.size} bytes, more than any {what} file")
                members = {Path(m.name).name: tf.extractfile(m).read() for m in wanted}
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{src}: cannot read the {what} archive ({e}); it is truncated or not a "
                             f"{what} python archive; download it again or pass the extracted folder") from e
    missing = [name for name in files if name not in members]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: expected the {what} python folder "
                                f"with {', '.join(files)}")
    for name, data in members.items() if md5 else ():
        got = hashlib.md5(data).hexdigest()
        if got != md5[name]:
            raise ValueError(f"{src / name}: md5 {got}, the published file has {md5[name]}; the "
                             "download is corrupt (fetch it again), or for files you made yourself pass "
                             "--no-verify-md5")
    batches = {}
    for name in files:
        try:
            batches[name] = _ArrayUnpickler(io.BytesIO(members[name]), encoding="latin1").load()
        except Exception as e:  # any unpickling failure means the same thing to the user
            raise ValueError(f"{src / name} is not a {what} pickle ({type(e).__name__}: {e})") from e
    return batches


def _images_labels(batches: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar10(src: str | Path, verify_md5: bool = True
                 ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(class names, {'train': (uint8 [50000, 32, 32, 3], int64 labels), 'test': (...)})."""
    b = _load_pickles(Path(src), FILES, "CIFAR-10", CIFAR10_MD5 if verify_md5 else None)
    return list(b["batches.meta"]["label_names"]), {
        "train": _images_labels([b[n] for n in TRAIN_FILES], "labels"),
        "test": _images_labels([b["test_batch"]], "labels")}


def read_cifar100(src: str | Path, verify_md5: bool = True
                  ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(the 100 fine class names, {'train': (uint8 [50000, 32, 32, 3], int64 fine labels), 'test': ...})."""
    b = _load_pickles(Path(src), CIFAR100_FILES, "CIFAR-100", CIFAR100_MD5 if verify_md5 else None)
    return list(b["meta"]["fine_label_names"]), {split: _images_labels([b[split]], "fine_labels")
                                                 for split in ("train", "test")}


def _dump(path: Path, images: np.ndarray, labels: dict[str, np.ndarray], batch_label: str) -> None:
    d = {"batch_label": batch_label, **{k: [int(v) for v in y] for k, y in labels.items()},
         "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
         "filenames": [f"synthetic_{path.name}_{i}.png" for i in range(len(images))]}
    path.write_bytes(pickle.dumps(d, protocol=2))


def write_cifar10(out: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  classes=CLASSES) -> Path:
    """Write uint8 [n, 32, 32, 3] images and labels as a cifar-10-batches-py folder; returns it."""
    out = Path(out) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    for k, idx in enumerate(np.array_split(np.arange(len(train[0])), len(TRAIN_FILES))):
        _dump(out / TRAIN_FILES[k], train[0][idx], {"labels": train[1][idx]}, f"training batch {k + 1} of 5")
    _dump(out / "test_batch", test[0], {"labels": test[1]}, "testing batch 1 of 1")
    meta = {"num_cases_per_batch": -(-len(train[0]) // 5), "label_names": list(classes), "num_vis": 3072}
    (out / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def write_cifar100(out: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                   fine_classes: list[str], coarse_classes: list[str]) -> Path:
    """Write uint8 [n, 32, 32, 3] images and fine labels as a cifar-100-python folder (coarse label: fine
    label // 5, as each CIFAR-100 superclass holds five classes); returns it."""
    out = Path(out) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for name, (images, fine) in (("train", train), ("test", test)):
        _dump(out / name, images, {"fine_labels": fine, "coarse_labels": np.asarray(fine) // 5},
              f"{'training' if name == 'train' else 'testing'} batch 1 of 1")
    meta = {"fine_label_names": list(fine_classes), "coarse_label_names": list(coarse_classes)}
    (out / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out
