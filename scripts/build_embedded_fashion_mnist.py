"""Regenerate tscray/data/fashion_mnist_embedded.npz from Debian's `dataset-fashion-mnist`.

Provenance: Fashion-MNIST (Zalando SE, 2017; MIT/Expat licence, see
tscray/data/FASHION_MNIST_LICENSE) as packaged by Debian in `dataset-fashion-mnist`
(idx.gz files under /usr/share/datasets/fashion-mnist/). No network access is needed
beyond Debian's archive:

    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb /tmp/fm
    python scripts/build_embedded_fashion_mnist.py --src /tmp/fm/usr/share/datasets/fashion-mnist

The subset is class-balanced and deterministic: for each class, the first `--train-per-class`
images of the official training split (in file order) and the first `--test-per-class` of the
official test split. Images stay uint8 (N, 28, 28); labels uint8.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np


def read_idx(path: Path) -> np.ndarray:
    """Read an idx (optionally gzipped) file into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` examples of every class, in file order."""
    idx = [np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(idx))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parents[1] / "tscray/data/fashion_mnist_embedded.npz")
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    a = p.parse_args()

    arrays = {}
    for split, per_class in (("train", a.train_per_class), ("t10k", a.test_per_class)):
        x = read_idx(a.src / f"{split}-images-idx3-ubyte.gz")
        y = read_idx(a.src / f"{split}-labels-idx1-ubyte.gz")
        keep = balanced_subset(y, per_class)
        name = "train" if split == "train" else "test"
        arrays[f"x_{name}"], arrays[f"y_{name}"] = x[keep], y[keep]
    np.savez_compressed(a.out, **arrays)
    digest = hashlib.sha256(a.out.read_bytes()).hexdigest()
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.1f} MB, sha256 {digest[:16]}…)")
    for k, v in arrays.items():
        print(f"  {k}: {v.shape} {v.dtype}")


if __name__ == "__main__":
    main()
