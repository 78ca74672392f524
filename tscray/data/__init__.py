"""Datasets by name, held as tensors, plus the defender's clean subset.

``load(name, root=None)`` returns a :class:`Dataset` (train and test :class:`ImageData`, class
count, preprocessing). Real loaders read a local root (``TSCRAY_DATA`` by default) in the standard
on-disk formats: ``cifar10``, ``gtsrb``, ``svhn``, ``stl10``, ``imagenet100`` (see each module's
docstring for the layout); a missing dataset raises :class:`DatasetNotFound`, a malformed one
``ValueError``. The embedded Fashion-MNIST subset ships inside the package so everything runs offline.
A name that is a path loads the user's own data (``.npz`` or an image folder: :mod:`tscray.data.custom`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tscray.data.errors import DatasetNotFound
from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.registry import Registry


@dataclass
class Dataset:
    """A dataset split into train and test, with its preprocessing."""

    name: str
    train: ImageData
    test: ImageData
    num_classes: int
    prep: Preprocess
    class_names: tuple[str, ...] | None = None  # where the data names its classes (an image folder's folders)

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]

    @property
    def input_hw(self) -> tuple[int, int]:
        """Height and width of one image (what a model's example input needs)."""
        return (int(self.train.x.shape[-2]), int(self.train.x.shape[-1]))


DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


def classes(n: int) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Declare a registered dataset's class count, so a spec's target class is checked before any data is
    read (``@classes(10)`` under ``@DATASETS.register``)."""
    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        setattr(fn, "num_classes", n)  # noqa: B010 - an attribute on a plain function
        return fn
    return deco


def declared_classes(name: str) -> int | None:
    """The class count a registered dataset declares (None: unknown until read, e.g. a folder of classes)."""
    return getattr(DATASETS.get(name), "num_classes", None) if name in DATASETS else None


def data_root(root: str | os.PathLike | None = None) -> Path | None:
    """The data root: the argument, else ``$TSCRAY_DATA``, else None."""
    if root is not None:
        return Path(root)
    env = os.environ.get("TSCRAY_DATA")
    return Path(env) if env else None


def load(name: str, root: str | os.PathLike | None = None, **kw: Any) -> Dataset:
    """Load the registered dataset ``name`` (from ``root`` where it needs one), or the user's dataset at a
    path (an ``.npz`` file or an image folder, see :mod:`tscray.data.custom`)."""
    if name not in DATASETS and custom.is_path(name):
        return custom.load_path(name, **kw)
    return DATASETS.get(name)(root=data_root(root), **kw)


def clean_subset(n: int, ratio: float, seed: int) -> torch.Tensor:
    """Indices of the defender's clean subset: a seeded random (not class-balanced) ``ratio`` of n."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clean ratio must be in (0, 1], got {ratio}")
    k = max(1, round(n * ratio))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def balanced_clean_subset(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a class-balanced clean subset: ``round(n * ratio)`` images, as equal a share per class as
    the classes allow (a class with too few images gives all it has; the rest is spread over the others),
    each class's share drawn at random with ``seed``. A random 5% of a small set can hold a dozen images of a
    class; this never does."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clean ratio must be in (0, 1], got {ratio}")
    labels = torch.as_tensor(labels)
    n = len(labels)
    k = max(1, round(n * ratio))
    gen = torch.Generator().manual_seed(seed)
    pools = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}
    pools = {c: idx[torch.randperm(len(idx), generator=gen)] for c, idx in sorted(pools.items())}
    take = {c: 0 for c in pools}
    left = k
    while left > 0:  # water-filling: one more image to each class that still has some, in class order
        open_ = [c for c in pools if take[c] < len(pools[c])]
        for c in open_[:left] if len(open_) > left else open_:
            take[c] += 1
        left = k - sum(take.values())
    return torch.cat([pools[c][:take[c]] for c in pools]).sort().values


from tscray.data import cifar10, custom, embedded, gtsrb, imagefolder, stl10, svhn  # noqa: E402,F401  (registration)

__all__ = ["DATASETS", "Dataset", "classes", "declared_classes", "DatasetNotFound", "ImageData", "Loader", "Preprocess", "balanced_clean_subset",
           "clean_subset",
           "data_root", "load"]
