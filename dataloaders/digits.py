"""scikit-learn's bundled digits (1,797 real 8x8 handwritten digits), upsampled to RGB images.

The only real image data available offline on every machine; used by the demo, the tests and the
depth study. The split is fixed (stratified, seed 0) so accuracies are comparable across runs.
torch and scikit-learn load inside the functions: the dataset registry imports this module for MEAN/STD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MEAN, STD = (0.2087,) * 3, (0.3081,) * 3
"""Per-channel statistics of the 0..1 pixels (the three channels are equal)."""


def digits_uint8(size: int = 32, test_fraction: float = 0.25) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 [N, size, size, 3], labels int64 [N]), 'test': (...)}.

    Pixels (0..16) are scaled to 0..255 and bilinearly upsampled; the three channels are equal.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    img = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=0)
    return {"train": (img[idx_tr], y[idx_tr]), "test": (img[idx_te], y[idx_te])}


def digits_tensors(size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (normalised float images [N, 3, size, size], labels)}, ready for the model."""
    import torch

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = {}
    for split, (img, y) in digits_uint8(size).items():
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
        out[split] = ((x - mean) / std, torch.from_numpy(y))
    return out
