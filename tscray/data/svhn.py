"""SVHN, Street View House Numbers, cropped digits (``svhn``), from the format-2 ``.mat`` files.

On disk, under the data root ``root`` (default ``$TSCRAY_DATA``), in ``root`` itself (torchvision's
layout) or in ``root/svhn``::

    train_32x32.mat, test_32x32.mat     MATLAB v5 files: X uint8 32×32×3×N, y N×1 with 1..10

Label 10 stands for the digit 0 and becomes 0, so labels are the digits 0..9. The ``extra`` split
is not loaded. ``download=True`` fetches the two files with torchvision into ``root``.

BackdoorBench has no SVHN; the normalisation is mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) (no
dataset statistics), augmentation BackdoorBench's default: random crop with padding size // 8,
no flip (flipped digits are not digits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tscray.data import DATASETS, Dataset, classes
from tscray.data.errors import not_found
from tscray.data.files import check_image_size, image_data, locate, preprocess, require_root, resize_square

NAME = "svhn"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # not in BackdoorBench: plain [-1, 1] scaling
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
LAYOUT = "<root>/train_32x32.mat and <root>/test_32x32.mat (torchvision's layout) or the same in <root>/svhn/"


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N×3×32×32 uint8, N labels 0..9) from one SVHN ``.mat``; ValueError naming the file if malformed."""
    import scipy.io
    try:
        m = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as err:  # noqa: BLE001  (scipy raises many kinds on a truncated/corrupt file)
        raise ValueError(f"{NAME}: {path} is not a readable SVHN .mat file: {type(err).__name__}: {err}") from err
    if "X" not in m or "y" not in m:
        raise ValueError(f"{NAME}: {path} lacks the variables X and y")
    x, y = m["X"], np.asarray(m["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise ValueError(f"{NAME}: {path}: X has shape {x.shape} and y {y.size} labels; "
                         "expected X 32×32×3×N and N labels")
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{NAME}: {path}: X ({x.dtype}) has values outside 0..255")
        x = x.astype(np.uint8)
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise ValueError(f"{NAME}: {path}: labels outside 1..10")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def _locate(root: Path) -> Path | None:
    for folder in (root, root / "svhn"):
        if all((folder / f).is_file() for f in FILES.values()):
            return folder
    return None


def _download(root: Path) -> None:
    from tscray._torchvision import torchvision
    tv = torchvision()
    for split in FILES:
        tv.datasets.SVHN(str(root), split=split, download=True)


@DATASETS.register(NAME)
@classes(10)
def svhn(root: Path | None = None, image_size: int | None = None, download: bool = False) -> Dataset:
    """SVHN (10 digit classes, 73,257 + 26,032 RGB images, native 32 px; ``image_size`` resizes)."""
    root = require_root(NAME, root)
    size = check_image_size(image_size, 32)
    folder = locate(_locate, root, _download, download,
                    lambda: not_found(NAME, "SVHN", root, [root, root / "svhn"], LAYOUT))
    splits = {}
    for split, f in FILES.items():
        x, y = read_mat(folder / f)
        splits[split] = image_data(resize_square(torch.from_numpy(x), size), y)
    return Dataset(name=NAME, train=splits["train"], test=splits["test"], num_classes=10,
                   prep=preprocess(size, MEAN, STD))
