"""The embedded dataset: a class-balanced Fashion-MNIST subset shipped inside the package.

1,000 train + 200 test images per class (28×28 grayscale, uint8), built from Debian's
``dataset-fashion-mnist`` by ``scripts/build_embedded_fashion_mnist.py`` (MIT licence, see
``FASHION_MNIST_LICENSE`` beside this file).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from tscray.data import DATASETS, Dataset, classes
from tscray.data.files import check_image_size, resize_square
from tscray.data.tensors import ImageData, Preprocess

FILE = "fashion_mnist_embedded.npz"
# Mean/std of the embedded training images (computed once, see tests/data/test_embedded.py).
MEAN, STD = (0.2867,), (0.3540,)


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    path = Path(str(resources.files("tscray.data").joinpath(FILE)))
    if not path.exists():
        raise FileNotFoundError(f"embedded dataset missing at {path}; reinstall tscray or run "
                                "scripts/build_embedded_fashion_mnist.py")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@DATASETS.register("fashion-mnist-embedded")
@classes(10)
def fashion_mnist_embedded(root: Path | None = None, train_per_class: int | None = None,
                           test_per_class: int | None = None, image_size: int | None = None) -> Dataset:
    """The embedded Fashion-MNIST subset; optionally fewer images per class (first ones, balanced), and
    resized to ``image_size`` px (native 28; e.g. 32 for nets with five 2× poolings, such as VGG)."""
    size = check_image_size(image_size, 28)
    a = _arrays()

    def split(x: np.ndarray, y: np.ndarray, per_class: int | None) -> ImageData:
        if per_class is not None:
            keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))
            x, y = x[keep], y[keep]
        return ImageData(resize_square(torch.from_numpy(x.copy()).unsqueeze(1), size),
                         torch.from_numpy(y.astype(np.int64)))

    return Dataset(
        name="fashion-mnist-embedded",
        train=split(a["x_train"], a["y_train"], train_per_class),
        test=split(a["x_test"], a["y_test"], test_per_class),
        num_classes=10,
        prep=Preprocess(mean=MEAN, std=STD, crop_padding=max(1, round(2 * size / 28)), hflip=False),
    )
