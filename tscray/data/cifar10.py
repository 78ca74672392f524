"""CIFAR-10 from its standard on-disk formats (``cifar10``).

On disk, under the data root ``root`` (default ``$TSCRAY_DATA``), the first of these that exists::

    root/cifar-10-batches-py/        data_batch_1 .. data_batch_5, test_batch   (python version;
    root/cifar10/cifar-10-batches-py/                                            torchvision's layout)
    root/cifar-10-batches-bin/       data_batch_1.bin .. data_batch_5.bin, test_batch.bin
    root/cifar10/cifar-10-batches-bin/                                          (binary version)
    root/                            the batch files directly (either version)

The python batches are pickles; they are read by a restricted unpickler that admits only the
numpy globals an array needs (any other global, e.g. ``os.system``, is refused before it can run).
Each binary record is 1 label byte followed by 3,072 pixel bytes (R, G, B planes of 32×32).
``download=True`` fetches the python version with torchvision into ``root/cifar-10-batches-py``.

Normalisation and augmentation as BackdoorBench: mean (0.4914, 0.4822, 0.4465), std
(0.247, 0.243, 0.261), random crop with padding size // 8 and horizontal flip.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tscray.data import DATASETS, Dataset, ImageData, classes
from tscray.data.errors import not_found
from tscray.data.files import check_image_size, image_data, locate, preprocess, require_root, resize_square

NAME = "cifar10"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
TRAIN_PY = [f"data_batch_{i}" for i in range(1, 6)]
TEST_PY = "test_batch"
TRAIN_BIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_BIN = "test_batch.bin"
PIXELS = 3 * 32 * 32
LAYOUT = ("<root>/cifar-10-batches-py/data_batch_1..5 and test_batch (python version) or "
          "<root>/cifar-10-batches-bin/data_batch_1..5.bin and test_batch.bin (binary version)")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover  (numpy 1.x)
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # protocol-5 pickles of arrays
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for bytes, latin-1 only."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: numpy array reconstruction only, every other global refused."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays may be unpickled)")


def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def read_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch: (N×3×32×32 uint8, N int64 labels); ValueError naming the file if malformed."""
    try:
        with open(path, "rb") as f:
            d = SafeUnpickler(f, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001  (truncated, corrupt or unsafe: all malformed)
        raise ValueError(f"{NAME}: {path} is not a readable CIFAR-10 batch: {type(err).__name__}: {err}") from err
    try:
        if not isinstance(d, dict):
            raise TypeError(f"a {type(d).__name__}, not a dict")
        data, labels = _get(d, "data"), _get(d, "labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
            raise TypeError(f"data {getattr(data, 'dtype', type(data).__name__)} "
                            f"{getattr(data, 'shape', '')}, expected uint8 (N, {PIXELS})")
        y = np.asarray(labels)
        if y.shape != (data.shape[0],) or y.dtype.kind not in "iu":
            raise TypeError(f"{y.shape[0] if y.ndim else 0} labels ({y.dtype}) for {data.shape[0]} images")
    except (KeyError, TypeError) as err:
        raise ValueError(f"{NAME}: {path} is not a CIFAR-10 batch: {err}") from err
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), y.astype(np.int64)


def read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary-version batch (records of 1 label byte + 3,072 pixel bytes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (PIXELS + 1):
        raise ValueError(f"{NAME}: {path} has {raw.size} bytes, not a positive multiple of the "
                         f"{PIXELS + 1}-byte record (truncated?)")
    rec = raw.reshape(-1, PIXELS + 1)
    return np.ascontiguousarray(rec[:, 1:]).reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def _locate(root: Path) -> tuple[Path, bool] | None:
    """(folder, is_python_version) of the first complete CIFAR-10 copy under root."""
    for base in (root, root / "cifar10"):
        for sub, files, is_py in (("cifar-10-batches-py", TRAIN_PY + [TEST_PY], True),
                                  ("cifar-10-batches-bin", TRAIN_BIN + [TEST_BIN], False)):
            for folder in (base / sub, base):
                if all((folder / f).is_file() for f in files):
                    return folder, is_py
    return None


def _searched(root: Path) -> list[Path]:
    return [p for base in (root, root / "cifar10") for p in
            (base / "cifar-10-batches-py", base / "cifar-10-batches-bin", base)]


def _download(root: Path) -> None:
    from tscray._torchvision import torchvision
    tv = torchvision()
    for train in (True, False):
        tv.datasets.CIFAR10(str(root), train=train, download=True)


def _split(folder: Path, files: list[str], is_py: bool) -> tuple[np.ndarray, np.ndarray]:
    parts = [(read_py_batch if is_py else read_bin_batch)(folder / f) for f in files]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{NAME}: labels outside 0..9 in {folder} ({', '.join(files)})")
    return x, y


@DATASETS.register(NAME)
@classes(10)
def cifar10(root: Path | None = None, image_size: int | None = None, download: bool = False) -> Dataset:
    """CIFAR-10 (10 classes, 50,000 + 10,000 RGB images, native 32 px; ``image_size`` resizes)."""
    root = require_root(NAME, root)
    size = check_image_size(image_size, 32)
    found = locate(_locate, root, _download, download,
                   lambda: not_found(NAME, "CIFAR-10", root, _searched(root), LAYOUT))
    folder, is_py = found
    train = _split(folder, TRAIN_PY if is_py else TRAIN_BIN, is_py)
    test = _split(folder, [TEST_PY] if is_py else [TEST_BIN], is_py)

    def data(xy: tuple[np.ndarray, np.ndarray]) -> ImageData:
        return image_data(resize_square(torch.from_numpy(xy[0]), size), xy[1])

    return Dataset(name=NAME, train=data(train), test=data(test), num_classes=10,
                   prep=preprocess(size, MEAN, STD, hflip=True))
