"""A user's own dataset, named by its path: an ``.npz`` file or an image folder (one sub-folder per class).

``.npz`` (read with ``allow_pickle=False``): ``x`` uint8 images N×H×W (grey), N×H×W×C or N×C×H×W
(C 1 or 3), ``y`` integer labels 0..K-1; optional ``x_test``/``y_test``. Image folder::

    PATH/<class>/*.{png,jpg,jpeg,bmp}                      one split, or
    PATH/train/<class>/*  and  PATH/test|val/<class>/*     both splits (train/ alone: one split)

Classes are the train class folders sorted by name (label = position, as torchvision's ImageFolder), or by
number when every folder name is an integer (``2/`` before ``10/``); the dataset carries their names. Images
are converted to RGB, or kept grey when every image is grey (16-bit grey scaled onto 0-255; float refused).

Without a test split, a stratified ``test_ratio`` of each class (seeded by ``split_seed``) becomes the test
set. Images are resized to ``image_size`` × ``image_size`` when given (bilinear, antialiased; required for non-square
images and for folders of mixed sizes). Normalisation is the training split's per-channel mean and std
unless ``mean``/``std`` are given; augmentation is a random crop with padding size // 8, no flip (a flip
changes the meaning of digits and signs). Every problem with the data (dtype, shapes, labels, a single
class, an empty folder, lengths that do not match) raises ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tscray.data import Dataset
from tscray.data.errors import DatasetNotFound
from tscray.data.files import eight_bit, resize_square
from tscray.data.tensors import ImageData, Preprocess

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TRAIN_DIRS = ("train", "training")  # split folder names, in any case
TEST_DIRS = ("test", "testing", "val", "valid", "validation")  # in order of preference
NPZ_KEYS = ("x", "y", "x_test", "y_test")


def is_path(name: str) -> bool:
    """Whether a dataset name is a path (rather than a registered name): it has a separator, ends in
    ``.npz``, or exists on disk."""
    return os.sep in name or "/" in name or name.endswith(".npz") or Path(name).expanduser().exists()


def load_path(path: str | os.PathLike, image_size: int | None = None, test_ratio: float = 0.2, split_seed: int = 0,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Dataset:
    """The dataset at ``path`` (an ``.npz`` file or an image folder), named by that path."""
    p = Path(path).expanduser()
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size < 1):
        raise ValueError(f"{p}: image_size must be a positive int, got {image_size!r}")
    if not isinstance(test_ratio, (int, float)) or isinstance(test_ratio, bool) or not 0.0 < test_ratio < 1.0:
        raise ValueError(f"{p}: test_ratio must be in (0, 1), got {test_ratio!r}")
    names: tuple[str, ...] | None = None
    if p.is_dir():
        train, test, names = _read_folder(p, image_size)
    elif p.is_file():
        if p.suffix.lower() != ".npz":
            raise ValueError(f"{p}: not an .npz file or an image folder")
        train, test = _read_npz(p)
    else:
        raise DatasetNotFound(f"{p}: no such file or folder (a dataset path is an .npz file or an image folder "
                              "with one sub-folder per class)")
    x, y = train
    num_classes = _check_labels(p, y, None, "y")
    if test is None:
        train_idx, test_idx = stratified_split(y, test_ratio, split_seed)
        if len(test_idx) == 0:
            raise ValueError(f"{p}: {len(y)} images are too few to hold out a test split at test_ratio "
                             f"{test_ratio} (every class keeps at least one training image); add images, raise "
                             "test_ratio, or give a test split")
        x, y, test = x[train_idx], y[train_idx], (x[test_idx], y[test_idx])
    xt, yt = test
    _check_labels(p, yt, num_classes, "test labels")
    if image_size is not None:
        x, xt = resize_square(x, image_size), resize_square(xt, image_size)
    for name, arr in (("train", x), ("test", xt)):
        if arr.shape[-2] != arr.shape[-1]:
            raise ValueError(f"{p}: {name} images are {arr.shape[-2]}×{arr.shape[-1]}, not square; pass image_size")
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"{p}: train images are {tuple(x.shape[1:])} but test images {tuple(xt.shape[1:])}")
    prep = Preprocess(*_stats(p, x, mean, std), crop_padding=x.shape[-1] // 8, hflip=False)
    return Dataset(name=str(path), train=ImageData(x, y), test=ImageData(xt, yt), num_classes=num_classes,
                   prep=prep, class_names=names)


def stratified_split(y: torch.Tensor, test_ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split: ``round(test_ratio * n_c)`` images of each class to test (at least one
    stays in train). Returns sorted (train, test) indices."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, round(test_ratio * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _images(p: Path, key: str, x: np.ndarray) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise ValueError(f"{p}: {key} must be uint8 images (0-255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if first and last:
            raise ValueError(f"{p}: {key} of shape {x.shape} is ambiguous (channels first or last?)")
        if last:
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            raise ValueError(f"{p}: {key} of shape {x.shape} has no channel axis of size 1 or 3 "
                             "(expected N×H×W, N×H×W×C or N×C×H×W)")
    else:
        raise ValueError(f"{p}: {key} must be N×H×W, N×H×W×C or N×C×H×W, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{p}: {key} holds no images")
    if 0 in x.shape[2:]:  # (0×0 passed as square, and failed in the first layer)
        raise ValueError(f"{p}: {key} images are {x.shape[2]}×{x.shape[3]} pixels: empty")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(p: Path, key: str, y: np.ndarray, n: int, xkey: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{p}: {key} must be a vector of integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{p}: {key} must be integers, got {y.dtype}")
    if y.size and int(y.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{p}: {key} hold label {int(y.max())}, beyond any class index")
    if len(y) != n:
        raise ValueError(f"{p}: {xkey} holds {n} images but {key} {len(y)} labels")
    return torch.from_numpy(y.astype(np.int64))


def _read_npz(p: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    if not zipfile.is_zipfile(p):  # np.load would read any other file as a pickle (refused, but misleading)
        raise ValueError(f"{p}: corrupt or not an .npz file (not a zip archive)")
    key, arrays = "", {}
    try:
        with np.load(p, allow_pickle=False) as z:
            files = list(z.files)
            for key in (k for k in NPZ_KEYS if k in files):  # (only these: an unused array is named below)
                arrays[key] = z[key]
    except ValueError as err:  # object arrays need pickle, which is refused
        raise ValueError(f"{p}: array {key} is unreadable as a plain .npz array ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # (a bad CRC: damaged bytes)
        raise ValueError(f"{p}: corrupt or not an .npz file ({err})") from None
    missing = [k for k in ("x", "y") if k not in files]
    if missing:
        raise ValueError(f"{p}: missing array(s) {missing}; expected x (images), y (labels), optional "
                         f"x_test/y_test; found {sorted(files)}")
    extra = sorted(set(files) - set(NPZ_KEYS))
    if extra:  # (x_val or X_test was read as no test split: a stratified share replaced the user's)
        raise ValueError(f"{p}: unknown array(s) {extra}; expected x (images), y (labels), optional x_test/y_test")
    odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if odd:  # zip members without a .npy header come back as raw bytes
        raise ValueError(f"{p}: not an .npz of arrays (member(s) {odd} are not .npy arrays)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{p}: x_test and y_test come together (found only one)")
    x = _images(p, "x", arrays["x"])
    train = (x, _labels(p, "y", arrays["y"], len(x), "x"))
    if "x_test" not in arrays:
        return train, None
    xt = _images(p, "x_test", arrays["x_test"])
    return train, (xt, _labels(p, "y_test", arrays["y_test"], len(xt), "x_test"))


def _check_labels(p: Path, y: torch.Tensor, num_classes: int | None, what: str) -> int:
    """Labels must be 0..K-1 with every class present in the training labels; returns K."""
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{p}: {what} hold a negative label ({int(y.min())})")
    if num_classes is None:
        present = torch.unique(y)
        k = int(present.max()) + 1
        if len(present) < 2:
            raise ValueError(f"{p}: one class only ({int(present[0])}); a classifier needs at least two")
        if k > len(y):
            raise ValueError(f"{p}: {what} hold label {k - 1} but only {len(y)} images: labels must be 0..K-1 "
                             "with every class present")
        if len(present) != k:
            gaps = sorted(set(range(k)) - set(present.tolist()))[:5]
            raise ValueError(f"{p}: labels must be 0..K-1 with every class present; no image of class(es) "
                             f"{gaps} below the largest label {k - 1}")
        return k
    if len(y) and int(y.max()) >= num_classes:
        raise ValueError(f"{p}: {what} hold label {int(y.max())}, out of range for the training labels' "
                         f"{num_classes} classes")
    return num_classes


def _stats(p: Path, x: torch.Tensor, mean: Sequence[float] | None,
           std: Sequence[float] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = x.shape[1]
    if mean is None or std is None:
        xs = x.float().div_(255.0).transpose(0, 1).reshape(c, -1)
        m, s = xs.mean(1).tolist(), xs.std(1).clamp_min(1e-3).tolist()
    for name, given in (("mean", mean), ("std", std)):
        if given is not None and (len(given) != c or not all(isinstance(v, (int, float)) for v in given)):
            raise ValueError(f"{p}: {name} must be {c} number(s), one per channel, got {given!r}")
    if std is not None and not all(v > 0 for v in std):
        raise ValueError(f"{p}: std must be positive, got {std!r}")
    return (tuple(float(v) for v in mean) if mean is not None else tuple(round(v, 4) for v in m),
            tuple(float(v) for v in std) if std is not None else tuple(round(v, 4) for v in s))


def _class_dirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder`` (none when it is not a folder), in class order: by name, or by
    number when every name is an integer ("2" before "10", as a user numbering classes means)."""
    if not folder.is_dir():
        return []
    dirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    numeric = bool(dirs) and all(d.name.isdigit() for d in dirs)
    return sorted(dirs, key=lambda d: (int(d.name), d.name) if numeric else (0, d.name))


def _split(p: Path, names: tuple[str, ...]) -> Path | None:
    """The split folder of ``p`` named one of ``names`` in any case (the first name found wins): one that holds
    class folders (a class that happens to be named "train" holds images)."""
    found = {d.name.lower(): d for d in _class_dirs(p) if _class_dirs(d)}
    return next((found[n] for n in names if n in found), None)


Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FolderFiles:
    """The image files an image folder's dataset is read from, with their labels."""

    classes: tuple[str, ...]
    train_dir: Path
    train: list[tuple[Path, int]]
    test_dir: Path | None  # None: no test split (a stratified share of train becomes it)
    test: list[tuple[Path, int]] | None


def folder_files(p: Path) -> FolderFiles:
    """Which files of image folder ``p`` the dataset reads, as which class: the one place that decides (the
    loader, and the content hash a sweep records of the folder, see :mod:`tscray.data_record`)."""
    test_dir, train = _split(p, TEST_DIRS), _split(p, TRAIN_DIRS)
    if test_dir is not None and train is None:
        raise ValueError(f"{p}: has a {test_dir.name}/ split but no train/ split beside it (expected "
                         f"{p}/train/<class>/* with {test_dir}/<class>/*, or {p}/<class>/*)")
    if train is not None:  # (Train/ + Test/ were read as two classes named "Test" and "Train")
        others = [d.name for d in _class_dirs(p) if d.name.lower() not in (*TRAIN_DIRS, *TEST_DIRS)]
        if others:
            raise ValueError(f"{p}: beside the {train.name}/ split, folder(s) {others[:5]} are no split (expected "
                             f"train/ and optionally one of {', '.join(t + '/' for t in TEST_DIRS)})")
    train_dir = train if train is not None else p  # train/ alone: a stratified share becomes the test set
    classes = [d.name for d in _class_dirs(train_dir)]
    if not classes:
        raise ValueError(f"{train_dir}: no class sub-folders (expected {train_dir}/<class>/*.png ...)")
    index = {c: i for i, c in enumerate(classes)}
    train_files = _files(train_dir, index)
    empty = sorted(set(classes) - {f.relative_to(train_dir).parts[0] for f, _ in train_files})
    if empty:  # (a last class left empty was dropped without a word: K came from the largest label)
        raise ValueError(f"{train_dir}: class folder(s) {empty[:5]} hold no images")
    has_test = train_dir != p and test_dir is not None
    return FolderFiles(tuple(classes), train_dir, train_files, test_dir if has_test else None,
                       _files(test_dir, index) if has_test and test_dir is not None else None)


def _read_folder(p: Path, image_size: int | None) -> tuple[Split, Split | None, tuple[str, ...]]:
    """The train split, the test split if the folder has one, and the class names (label = position)."""
    ff = folder_files(p)
    train_files, test_files, classes = ff.train, ff.test, ff.classes
    images = [_decode(f) for f, _ in train_files + (test_files or [])]
    grey = all(im.shape[0] == 1 for im in images)
    if image_size is not None:
        images = [resize_square(torch.from_numpy(im)[None], image_size)[0].numpy() for im in images]
    sizes = {im.shape[1:] for im in images}
    if len(sizes) > 1:
        raise ValueError(f"{p}: images of {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); pass "
                         "image_size to resize them to one")
    x = torch.from_numpy(np.stack([im if grey else np.broadcast_to(im, (3, *im.shape[1:])) for im in images]))
    y = torch.tensor([label for _, label in train_files + (test_files or [])], dtype=torch.long)
    n = len(train_files)
    return (x[:n], y[:n]), ((x[n:], y[n:]) if test_files is not None else None), tuple(classes)


def _files(split: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    out = []
    for d in _class_dirs(split):
        if d.name not in index:
            raise ValueError(f"{d}: class folder has no counterpart in the train split")
        # images anywhere below the class folder (as torchvision's ImageFolder); hidden files (macOS ._*) skipped
        out += [(f, index[d.name]) for f in sorted(d.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(d).parts)]
    if not out:
        raise ValueError(f"{split}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return out


def _decode(path: Path) -> np.ndarray:
    """uint8 C×H×W: 1 channel for grey images, else RGB."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's note on palette transparency: harmless here
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image: refused, not decoded
            with Image.open(path) as im:
                im = eight_bit(ImageOps.exif_transpose(im))  # as a viewer shows it (phone photos: rotated)
                arr = np.array(im, dtype=np.uint8)  # (a copy: torch warned on PIL's read-only view)
                arr = arr[None] if im.mode == "L" else arr.transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    return np.ascontiguousarray(arr)
