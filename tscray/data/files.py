"""Shared pieces of the on-disk dataset loaders: finding a dataset under a root, resizing,
BackdoorBench-style preprocessing, and a cache of decoded images as memory-mapped ``.npy``.

The decoded-image cache (used by the loaders that decode image files: ``gtsrb`` and
``imagenet100``) lives in ``cache_dir`` if given, else ``$TSCRAY_CACHE``, else ``~/.cache/tscray``,
as ``<cache>/<name>-<hash of the data folder>/<split>-<size>px-<key>.{x,y}.npy``; the key hashes
the image list (relative paths, labels, sizes, mtimes), so an edited folder is decoded afresh and
the stale cache of that split and size is removed. It is read with ``np.load(mmap_mode="c")``: a
large dataset is paged in from disk, never held in RAM whole.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from tscray.data.errors import no_root
from tscray.data.tensors import ImageData, Preprocess

CACHE_VERSION = 1


def require_root(name: str, root: Path | str | None) -> Path:
    """``root`` as a Path, or a clear error when there is none."""
    if root is None:
        raise no_root(name)
    return Path(root).expanduser()


def check_image_size(image_size: int | None, default: int) -> int:
    size = default if image_size is None else image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return size


def preprocess(image_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = False) -> Preprocess:
    """BackdoorBench's training augmentation: random crop with padding 4 at 32 px (scaled: size // 8)."""
    return Preprocess(mean=tuple(mean), std=tuple(std), crop_padding=image_size // 8, hflip=hflip)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N×C×H×W images resized to size×size (bilinear, antialiased), in bounded-memory chunks."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    n, c, h, w = x.shape
    chunk = max(1, 2 ** 25 // (c * max(h, w, size) ** 2))
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for i in range(0, n, chunk):
        part = torch.nn.functional.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                                               align_corners=False, antialias=True)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def image_data(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> ImageData:
    """ImageData from uint8 N×C×H×W images and integer labels (numpy arrays are shared, not copied)."""
    x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    y = torch.from_numpy(np.asarray(y, dtype=np.int64)) if isinstance(y, np.ndarray) else y
    return ImageData(x, y)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The decoded-image cache: ``cache_dir``, else ``$TSCRAY_CACHE``, else ``~/.cache/tscray``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TSCRAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tscray"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_cached(name: str, split: str, base: Path, samples: Sequence[tuple[Path, int]], size: int,
                  decode: Callable[[Path, int], np.ndarray], cache_dir: str | os.PathLike | None = None,
                  workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``samples`` (path, label) decoded by ``decode(path, size) -> uint8 3×size×size``, cached.

    Returns (x, y): x a copy-on-write memory map of the cache (N×3×size×size uint8), y int64 labels.
    """
    h = hashlib.sha256(f"{CACHE_VERSION}\n{name}\n{split}\n{size}\n".encode())
    for path, label in samples:
        st = path.stat()
        h.update(f"{path.relative_to(base).as_posix()}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()[:20]
    folder = cache_root(cache_dir) / f"{name}-{hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:10]}"
    stem = f"{split}-{size}px-"
    xf, yf = folder / f"{stem}{key}.x.npy", folder / f"{stem}{key}.y.npy"
    n = len(samples)
    if xf.exists() and yf.exists():
        try:
            x, y = np.load(xf, mmap_mode="c"), np.load(yf)
            if x.shape == (n, 3, size, size) and x.dtype == np.uint8 and y.shape == (n,):
                return x, y.astype(np.int64)
        except (OSError, ValueError):
            pass  # unreadable cache: decode afresh
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{stem}*.npy"):
        stale.unlink(missing_ok=True)
    tmp_x = folder / f".{stem}{key}.x.{os.getpid()}.tmp"
    tmp_y = folder / f".{stem}{key}.y.{os.getpid()}.tmp"
    try:
        mm = np.lib.format.open_memmap(tmp_x, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))

        def work(i: int) -> None:
            path = samples[i][0]
            try:
                img = decode(path, size)
            except Exception as err:  # noqa: BLE001  (any decoder failure is a malformed file)
                raise ValueError(f"{name}: cannot decode image {path}: {err}") from err
            if img.shape != (3, size, size) or img.dtype != np.uint8:
                raise ValueError(f"{name}: decoding {path} gave {img.dtype} {img.shape}, "
                                 f"expected uint8 (3, {size}, {size})")
            mm[i] = img  # noqa: F821  (deleted only after every work() has run)

        ex = ThreadPoolExecutor(max_workers=workers or default_workers())
        try:
            for _ in ex.map(work, range(n)):
                pass
        finally:
            ex.shutdown(wait=True, cancel_futures=True)  # on a failure, skip the images not yet begun
        mm.flush()
        del mm
        with open(tmp_y, "wb") as f:
            np.save(f, np.array([label for _, label in samples], dtype=np.int64))
        os.replace(tmp_y, yf)
        os.replace(tmp_x, xf)  # the x file last: its presence marks a complete cache
    finally:
        tmp_x.unlink(missing_ok=True)
        tmp_y.unlink(missing_ok=True)
    return np.load(xf, mmap_mode="c"), np.load(yf)


GREY_MODES = ("1", "L", "LA", "La")
DEEP_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey (PNG, TIFF); "I" is how some read it


def eight_bit(img: "Any", grey: bool | None = None) -> "Any":
    """A PIL image as 8 bits per channel: mode ``L`` when ``grey`` (default: when the image is grey), else
    ``RGB``. PIL's own ``convert`` clips 16-bit grey at 255, which turned a 16-bit PNG almost all white;
    here its full range maps onto 0-255. Float images have no agreed range and are refused."""
    from PIL import Image

    if img.mode == "F":
        raise ValueError("a 32-bit float image has no agreed value range; save it as an 8- or 16-bit image")
    if img.mode in DEEP_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f"a {img.mode}-mode image with values in {wide.min():g}..{wide.max():g}, beyond 16 "
                             "bits: save it as an 8- or 16-bit image")
        img = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), "L")
    if grey is None:
        grey = img.mode in GREY_MODES
    return img.convert("L" if grey else "RGB")


def pil_to_chw(img: "object") -> np.ndarray:
    """A PIL RGB image as a contiguous uint8 3×H×W array."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


T = TypeVar("T")


def locate(find: Callable[[Path], T | None], root: Path, download: Callable[[Path], None] | None,
           want_download: bool, missing: Callable[[], Exception]) -> T:
    """Find a dataset under ``root``; download it first when asked and possible; else raise ``missing()``."""
    found = find(root)
    if found is None and want_download and download is not None:
        download(root)
        found = find(root)
    if found is None:
        raise missing()
    return found
