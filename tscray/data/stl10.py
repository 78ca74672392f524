"""STL-10, labelled splits only (``stl10``), from the binary files.

On disk, under the data root ``root`` (default ``$TSCRAY_DATA``), the first of these folders that
holds the four files::

    root/stl10_binary/            (torchvision's layout)
    root/stl10/stl10_binary/
    root/                         the files directly

    train_X.bin, test_X.bin       uint8, per image 3×96×96 stored column-major (C, W, H)
    train_y.bin, test_y.bin       uint8 labels 1..10, one byte per image

Images are transposed to C×H×W and labels mapped to 0..9; the unlabelled split is never read.
``download=True`` fetches stl10_binary with torchvision (the whole 2.6 GB archive).

BackdoorBench has no STL-10; the normalisation is mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) (no
dataset statistics), augmentation BackdoorBench's default: random crop with padding size // 8
(12 at the native 96 px), no flip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tscray.data import DATASETS, Dataset, classes
from tscray.data.errors import not_found
from tscray.data.files import check_image_size, image_data, locate, preprocess, require_root, resize_square

NAME = "stl10"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # not in BackdoorBench: plain [-1, 1] scaling
SIDE = 96
BYTES = 3 * SIDE * SIDE
FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
LAYOUT = "<root>/stl10_binary/{train,test}_{X,y}.bin (torchvision's layout)"


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N×3×96×96 uint8, N labels 0..9) of one labelled split; ValueError naming the file if malformed."""
    xf, yf = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    raw = np.fromfile(xf, dtype=np.uint8)
    if raw.size == 0 or raw.size % BYTES:
        raise ValueError(f"{NAME}: {xf} has {raw.size} bytes, not a positive multiple of {BYTES} "
                         f"(3×{SIDE}×{SIDE} per image; truncated?)")
    y = np.fromfile(yf, dtype=np.uint8).astype(np.int64)
    n = raw.size // BYTES
    if y.size != n:
        raise ValueError(f"{NAME}: {yf} has {y.size} labels for the {n} images of {xf}")
    if y.min() < 1 or y.max() > 10:
        raise ValueError(f"{NAME}: {yf} has labels outside 1..10")
    x = np.ascontiguousarray(raw.reshape(n, 3, SIDE, SIDE).transpose(0, 1, 3, 2))
    return x, y - 1


def _locate(root: Path) -> Path | None:
    for folder in (root / "stl10_binary", root / "stl10" / "stl10_binary", root):
        if all((folder / f).is_file() for f in FILES):
            return folder
    return None


def _download(root: Path) -> None:
    from tscray._torchvision import torchvision
    tv = torchvision()
    tv.datasets.STL10(str(root), split="train", download=True)  # one archive holds every split


@DATASETS.register(NAME)
@classes(10)
def stl10(root: Path | None = None, image_size: int | None = None, download: bool = False) -> Dataset:
    """STL-10 labelled splits (10 classes, 5,000 + 8,000 RGB images, native 96 px; ``image_size`` resizes)."""
    root = require_root(NAME, root)
    size = check_image_size(image_size, SIDE)
    folder = locate(_locate, root, _download, download, lambda: not_found(
        NAME, "STL-10", root, [root / "stl10_binary", root / "stl10" / "stl10_binary", root], LAYOUT))
    splits = {}
    for split in ("train", "test"):
        x, y = read_split(folder, split)
        splits[split] = image_data(resize_square(torch.from_numpy(x), size), y)
    return Dataset(name=NAME, train=splits["train"], test=splits["test"], num_classes=10,
                   prep=preprocess(size, MEAN, STD))
