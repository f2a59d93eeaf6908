"""CIFAR-10 in its official python format (`cifar-10-batches-py`), both directions.

Five pickled training batches `data_batch_1..5`, one `test_batch`, and `batches.meta`. Each batch is a dict
with 'data' (uint8 [n, 3072]: the red, green, blue 32x32 planes of each image), 'labels', 'filenames' and
'batch_label'. The originals were pickled by Python 2 and load with encoding='latin1'; so do ours.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
FILES = (*TRAIN_FILES, "test_batch", "batches.meta")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _load_members(src: Path) -> dict[str, bytes]:
    if src.is_dir():
        return {name: (src / name).read_bytes() for name in FILES if (src / name).is_file()}
    try:  # the distributed archive, cifar-10-python.tar.gz
        with tarfile.open(src, "r:*") as tf:
            return {Path(m.name).name: tf.extractfile(m).read() for m in tf.getmembers()
                    if m.isfile() and Path(m.name).name in FILES}
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{src}: cannot read the CIFAR-10 archive ({e}); it is truncated or not a "
                         "cifar-10-python.tar.gz; download it again or pass the extracted folder") from e


def read_cifar10(src: str | Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(class names, {'train': (uint8 [50000, 32, 32, 3], int64 labels), 'test': (...)})."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    members = _load_members(src)
    missing = [name for name in FILES if name not in members]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: expected the cifar-10-batches-py folder "
                                f"with {', '.join(FILES)}")
    batches = {}
    for name in FILES:
        try:
            batches[name] = pickle.load(io.BytesIO(members[name]), encoding="latin1")
        except Exception as e:  # any unpickling failure means the same thing to the user
            raise ValueError(f"{src / name} is not a CIFAR-10 pickle ({type(e).__name__}: {e})") from e

    def images_labels(names):
        data = np.concatenate([np.asarray(batches[n]["data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n]["labels"], dtype=np.int64) for n in names])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels

    classes = list(batches["batches.meta"]["label_names"])
    return classes, {"train": images_labels(TRAIN_FILES), "test": images_labels(["test_batch"])}


def write_cifar10(out: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  classes=CLASSES) -> Path:
    """Write uint8 [n, 32, 32, 3] images and labels as a cifar-10-batches-py folder; returns it."""
    out = Path(out) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)

    def dump(name, images, labels, batch_label):
        d = {"batch_label": batch_label, "labels": [int(v) for v in labels],
             "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
             "filenames": [f"synthetic_{name}_{i}.png" for i in range(len(images))]}
        (out / name).write_bytes(pickle.dumps(d, protocol=2))

    for k, idx in enumerate(np.array_split(np.arange(len(train[0])), len(TRAIN_FILES))):
        dump(TRAIN_FILES[k], train[0][idx], train[1][idx], f"training batch {k + 1} of 5")
    dump("test_batch", *test, "testing batch 1 of 1")
    meta = {"num_cases_per_batch": -(-len(train[0]) // 5), "label_names": list(classes), "num_vis": 3072}
    (out / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out
