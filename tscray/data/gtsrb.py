"""GTSRB, the German Traffic Sign Recognition Benchmark (``gtsrb``), in torchvision's layout.

On disk, under the data root ``root`` (default ``$TSCRAY_DATA``), in ``root/gtsrb`` (torchvision's
folder) or in ``root`` itself::

    gtsrb/GTSRB/Training/<class>/*.ppm          class folders 00000 .. 00042 (the label is the number)
    gtsrb/GTSRB/Final_Test/Images/*.ppm
    gtsrb/GT-final_test.csv                     semicolon CSV: Filename;Width;Height;Roi.X1;Roi.Y1;
                                                Roi.X2;Roi.Y2;ClassId (also accepted in GTSRB/ or in
                                                Final_Test/Images/)

These are what GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip
unpack to; ``download=True`` fetches them with torchvision. Images have varying sizes and are
always resized to ``image_size`` × ``image_size`` (default 32, bilinear, antialiased, whole image,
no ROI crop, as BackdoorBench and torchvision), then cached (see :mod:`tscray.data.files`).

Normalisation as BackdoorBench, which uses ``Normalize([0, 0, 0], [1, 1, 1])`` for GTSRB, i.e. none
beyond scaling to [0, 1]; augmentation: random crop with padding size // 8, no flip (flipping
changes the meaning of some signs).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from tscray.data import DATASETS, Dataset, classes
from tscray.data.errors import not_found
from tscray.data.files import (check_image_size, decode_cached, image_data, locate,
                               pil_to_chw, preprocess, require_root)

NAME = "gtsrb"
NUM_CLASSES = 43
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # BackdoorBench: Normalize([0, 0, 0], [1, 1, 1]) for GTSRB
CSV = "GT-final_test.csv"
LAYOUT = ("<root>/gtsrb/GTSRB/Training/00000..00042/*.ppm, <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm and "
          f"<root>/gtsrb/{CSV} (torchvision's layout; the gtsrb/ level may be omitted)")


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return pil_to_chw(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _locate(root: Path) -> tuple[Path, Path, Path, Path] | None:
    """(base, training folder, test image folder, test CSV) of the first complete copy under root."""
    for base in (root / "gtsrb", root):
        train, test = base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images"
        if not (train.is_dir() and test.is_dir()):
            continue
        for table in (base / CSV, base / "GTSRB" / CSV, test / CSV):
            if table.is_file():
                return base, train, test, table
    return None


def _train_samples(folder: Path) -> list[tuple[Path, int]]:
    samples = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not d.name.isdigit() or int(d.name) >= NUM_CLASSES:
            raise ValueError(f"{NAME}: unexpected class folder {d}; expected 00000 .. {NUM_CLASSES - 1:05d}")
        samples += [(f, int(d.name)) for f in sorted(d.iterdir()) if f.suffix.lower() == ".ppm"]
    if not samples:
        raise ValueError(f"{NAME}: no .ppm images in the class folders of {folder}")
    return samples


def _test_samples(folder: Path, table: Path) -> list[tuple[Path, int]]:
    samples = []
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        for i, row in enumerate(rows, start=2):
            if row.get("Filename") is None or row.get("ClassId") is None:
                raise ValueError(f"line {i} lacks Filename or ClassId")
            label = int(row["ClassId"])
            if not 0 <= label < NUM_CLASSES:
                raise ValueError(f"line {i}: ClassId {label} outside 0..{NUM_CLASSES - 1}")
            path = folder / row["Filename"].strip()
            if not path.is_file():
                raise ValueError(f"line {i}: image {path} is missing")
            samples.append((path, label))
    except (ValueError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{NAME}: malformed test table {table}: {err}") from err
    if not samples:
        raise ValueError(f"{NAME}: test table {table} lists no images")
    return samples


def _download(root: Path) -> None:
    from tscray._torchvision import torchvision
    tv = torchvision()
    for split in ("train", "test"):
        tv.datasets.GTSRB(str(root), split=split, download=True)


@DATASETS.register(NAME)
@classes(43)
def gtsrb(root: Path | None = None, image_size: int | None = None, download: bool = False,
          cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> Dataset:
    """GTSRB (43 classes, 39,209 + 12,630 images, resized to ``image_size``, default 32).

    Decoded images are cached in ``cache_dir`` (default ``$TSCRAY_CACHE`` or ``~/.cache/tscray``);
    ``workers`` threads decode on a cache miss.
    """
    root = require_root(NAME, root)
    size = check_image_size(image_size, 32)
    found = locate(_locate, root, _download, download,
                   lambda: not_found(NAME, "GTSRB", root, [root / "gtsrb", root], LAYOUT))
    base, train_dir, test_dir, table = found
    splits = {}
    for split, samples in (("train", _train_samples(train_dir)), ("test", _test_samples(test_dir, table))):
        x, y = decode_cached(NAME, split, base, samples, size, _decode, cache_dir, workers)
        splits[split] = image_data(x, y)
    return Dataset(name=NAME, train=splits["train"], test=splits["test"], num_classes=NUM_CLASSES,
                   prep=preprocess(size, MEAN, STD))
