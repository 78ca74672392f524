"""ImageNet-100 (``imagenet100``) from an ImageFolder tree, decoded once into a memory-mapped cache.

On disk, under the data root ``root`` (default ``$TSCRAY_DATA``), in ``root/imagenet100``,
``root/imagenet-100`` or ``root`` itself (the first holding both splits)::

    imagenet100/train/<class_dir>/*.{JPEG,jpg,jpeg,png}
    imagenet100/val/<class_dir>/*.{JPEG,jpg,jpeg,png}

Classes are the train class folders sorted by name (label = position, as torchvision's
``ImageFolder``); every val class folder must also be a train class folder. Images are decoded with
PIL, converted to RGB, resized so the shorter side is ``image_size`` (default 224, bilinear,
antialiased) and center-cropped to ``image_size`` × ``image_size``; the result is cached as uint8
``.npy`` in ``cache_dir`` / ``$TSCRAY_CACHE`` / ``~/.cache/tscray`` (see :mod:`tscray.data.files`)
and read back memory-mapped, so the dataset is never held in RAM whole (about 19 GB for the
126,689 train images at 224 px). There is no download: ImageNet needs an account, and ImageNet-100
is a class subset chosen by the user.

Normalisation as BackdoorBench's ``imagenet``: mean (0.485, 0.456, 0.406), std
(0.229, 0.224, 0.225); augmentation: random crop with padding size // 8, no flip (BackdoorBench
flips CIFAR-10 only).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tscray.data import DATASETS, Dataset
from tscray.data.errors import not_found
from tscray.data.files import (check_image_size, decode_cached, eight_bit, image_data, pil_to_chw, preprocess,
                               require_root)

NAME = "imagenet100"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")
LAYOUT = ("<root>/imagenet100/{train,val}/<class_dir>/*.{JPEG,jpg,png} "
          "(an ImageFolder tree; the imagenet100/ level may be omitted)")


def _decode(path: Path, size: int) -> np.ndarray:
    """Shorter side resized to ``size`` (bilinear, antialiased), then a center ``size``×``size`` crop."""
    from PIL import Image
    with Image.open(path) as f:
        im = eight_bit(f, grey=False)
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        return pil_to_chw(im.crop((left, top, left + size, top + size)))


def _locate(root: Path) -> Path | None:
    for folder in (root / "imagenet100", root / "imagenet-100", root):
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            return folder
    return None


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _samples(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    samples = []
    for d in _class_dirs(split_dir):
        if d.name not in class_to_idx:
            raise ValueError(f"{NAME}: class folder {d} has no counterpart in the train split")
        samples += [(f, class_to_idx[d.name]) for f in sorted(d.iterdir())
                    if f.suffix.lower() in EXTENSIONS and f.is_file()]
    if not samples:
        raise ValueError(f"{NAME}: no {'/'.join(EXTENSIONS)} images in the class folders of {split_dir}")
    return samples


@DATASETS.register(NAME)
def imagenet100(root: Path | None = None, image_size: int | None = None, download: bool = False,
                cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> Dataset:
    """ImageNet-100 from ``root/imagenet100/{train,val}`` at ``image_size`` (default 224), cached.

    Any ImageFolder tree works: the class count is the number of train class folders. ``workers``
    threads decode on a cache miss (default min(8, CPUs)).
    """
    root = require_root(NAME, root)
    size = check_image_size(image_size, 224)
    folder = _locate(root)
    if folder is None:
        raise not_found(NAME, "ImageNet-100", root, [root / "imagenet100", root / "imagenet-100", root],
                        LAYOUT, hint="set --data-root or $TSCRAY_DATA (download=True cannot help: "
                                     "there is no download, build the tree from ImageNet)")
    classes = [d.name for d in _class_dirs(folder / "train")]
    class_to_idx = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "val"):
        samples = _samples(folder / split, class_to_idx)
        x, y = decode_cached(NAME, split, folder, samples, size, _decode, cache_dir, workers)
        splits[split] = image_data(x, y)
    return Dataset(name=NAME, train=splits["train"], test=splits["val"], num_classes=len(classes),
                   prep=preprocess(size, MEAN, STD), class_names=tuple(classes))

