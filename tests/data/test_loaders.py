"""The on-disk dataset loaders, on small fixtures written in each dataset's exact format."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tscray.data import DATASETS, DatasetNotFound, load

N = 20  # images per split (CIFAR train: 5 batches of 4)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Caches go to tmp_path, never to ~/.cache; no ambient data root."""
    monkeypatch.setenv("TSCRAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TSCRAY_DATA", raising=False)


def _images(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- CIFAR-10

def _cifar_arrays():
    x_train, x_test = _images(N, 32, 0), _images(N, 32, 1)
    y_train, y_test = np.arange(N) % 10, (np.arange(N) * 3) % 10
    # A distinct image (train index 9 = data_batch_3, second record): one red pixel at (row 0, col 5),
    # one blue pixel at (row 31, col 0), label 7 — pins plane order (R, G, B) and row-major pixels.
    x_train[9] = 0
    x_train[9, 0, 0, 5], x_train[9, 2, 31, 0] = 255, 128
    y_train[9] = 7
    return x_train, y_train, x_test, y_test


def write_cifar_py(root: Path, protocol: int = 4, numpy1_names: bool = False) -> tuple[np.ndarray, ...]:
    x_train, y_train, x_test, y_test = arrays = _cifar_arrays()
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    parts = {f"data_batch_{i + 1}": slice(4 * i, 4 * i + 4) for i in range(5)}
    for name, sl in parts.items():
        _dump(folder / name, x_train[sl], y_train[sl], protocol, numpy1_names)
    _dump(folder / "test_batch", x_test, y_test, protocol, numpy1_names)
    return arrays


def _dump(path: Path, x: np.ndarray, y: np.ndarray, protocol: int, numpy1_names: bool) -> None:
    blob = pickle.dumps({b"batch_label": b"fixture", b"data": x.reshape(len(x), -1), b"labels": [int(v) for v in y],
                         b"filenames": [b"f.png"] * len(x)}, protocol=protocol)
    if numpy1_names:  # as the original (Python 2, numpy 1) CIFAR pickles name the reconstructor
        assert protocol == 2
        blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(blob)


def write_cifar_bin(root: Path) -> tuple[np.ndarray, ...]:
    x_train, y_train, x_test, y_test = arrays = _cifar_arrays()
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)

    def records(x, y):
        return np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1).tobytes()

    for i in range(5):
        (folder / f"data_batch_{i + 1}.bin").write_bytes(records(x_train[4 * i:4 * i + 4], y_train[4 * i:4 * i + 4]))
    (folder / "test_batch.bin").write_bytes(records(x_test, y_test))
    return arrays


@pytest.mark.parametrize("fmt", ["py2-numpy1", "py2", "py4", "py5", "bin"])
def test_cifar10_python_and_binary_versions_round_trip(tmp_path, fmt):
    if fmt == "bin":
        x_train, y_train, x_test, y_test = write_cifar_bin(tmp_path)
    else:
        x_train, y_train, x_test, y_test = write_cifar_py(tmp_path, int(fmt[2]), numpy1_names=fmt.endswith("numpy1"))
    d = load("cifar10", tmp_path)
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape == (N, 3, 32, 32) and d.test.x.shape == (N, 3, 32, 32)
    assert torch.equal(d.train.x, torch.from_numpy(x_train)) and torch.equal(d.test.x, torch.from_numpy(x_test))
    assert d.train.y.tolist() == y_train.tolist() and d.test.y.tolist() == y_test.tolist()
    img = d.train.x[9]
    assert int(d.train.y[9]) == 7 and img[0, 0, 5] == 255 and img[2, 31, 0] == 128 and int(img.sum()) == 383
    assert d.num_classes == 10 and d.in_channels == 3 and d.image_size == 32
    assert d.prep.mean == (0.4914, 0.4822, 0.4465) and d.prep.std == (0.247, 0.243, 0.261)
    assert d.prep.crop_padding == 4 and d.prep.hflip


def test_cifar10_image_size_resizes_and_scales_padding(tmp_path):
    write_cifar_py(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    x = np.full((4, 3072), 77, dtype=np.uint8)  # a constant batch stays constant under any resize
    _dump(folder / "data_batch_1", x.reshape(4, 3, 32, 32), np.array([1, 2, 3, 4]), 4, False)
    d = load("cifar10", tmp_path, image_size=64)
    assert d.train.x.shape == (N, 3, 64, 64) and d.test.x.shape == (N, 3, 64, 64) and d.image_size == 64
    assert d.train.x.dtype == torch.uint8 and bool((d.train.x[:4] == 77).all())
    assert d.prep.crop_padding == 8 and d.train.y[:4].tolist() == [1, 2, 3, 4]
    small = load("cifar10", tmp_path, image_size=16)
    assert small.train.x.shape == (N, 3, 16, 16) and small.prep.crop_padding == 2


def test_cifar10_refuses_a_malicious_pickle_without_running_it(tmp_path):
    write_cifar_py(tmp_path)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refused global") as err:
        load("cifar10", tmp_path)
    assert str(bad) in str(err.value) and isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()
    # the codec helper admitted for protocol-2 bytes takes latin-1 only
    bad.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match="rot13"):
        load("cifar10", tmp_path)


@pytest.mark.parametrize("fmt", ["py", "bin"])
def test_cifar10_truncated_or_malformed_batch_names_the_file(tmp_path, fmt):
    if fmt == "py":
        write_cifar_py(tmp_path)
        f = tmp_path / "cifar-10-batches-py" / "test_batch"
    else:
        write_cifar_bin(tmp_path)
        f = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="test_batch") as err:
        load("cifar10", tmp_path)
    assert str(f) in str(err.value)
    if fmt == "py":  # well-formed pickle, wrong shape
        f.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
        with pytest.raises(ValueError, match=r"expected uint8 \(N, 3072\)"):
            load("cifar10", tmp_path)


def test_cifar10_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (Path(root) / "cifar-10-batches-py").exists():
                write_cifar_py(Path(root))

    fake = SimpleNamespace(datasets=SimpleNamespace(CIFAR10=FakeCIFAR10))
    monkeypatch.setattr("tscray._torchvision.torchvision", lambda: fake)
    with pytest.raises(DatasetNotFound):
        load("cifar10", tmp_path)  # download is off by default
    assert calls == []
    d = load("cifar10", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)] and len(d.train) == N


# ------------------------------------------------------------------------------------------- GTSRB

def _ppm(path: Path, rgb: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def write_gtsrb(root: Path) -> None:
    base = root / "gtsrb"
    train = base / "GTSRB" / "Training"
    for cls in (0, 2, 42):
        for i in range(3):
            _ppm(train / f"{cls:05d}" / f"00000_{i:05d}.ppm", (cls * 5, 10 * i, 200), (30 + 7 * i, 40 + 3 * cls % 20))
        (train / f"{cls:05d}" / f"GT-{cls:05d}.csv").write_text("Filename;ClassId\n")  # as the real zip has
    images = base / "GTSRB" / "Final_Test" / "Images"
    rows = []
    for i, (cls, rgb) in enumerate([(14, (200, 10, 30)), (2, (0, 255, 0)), (42, (9, 9, 9)), (0, (1, 2, 3))]):
        _ppm(images / f"{i:05d}.ppm", rgb, (25 + 10 * i, 28))
        rows.append([f"{i:05d}.ppm", 25 + 10 * i, 28, 5, 5, 20, 20, cls])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        w.writerows(rows)


def test_gtsrb_torchvision_layout_resized_labels_from_folders_and_csv(tmp_path):
    write_gtsrb(tmp_path)
    d = load("gtsrb", tmp_path, workers=1)
    assert d.train.x.shape == (9, 3, 32, 32) and d.test.x.shape == (4, 3, 32, 32) and d.train.x.dtype == torch.uint8
    assert d.train.y.tolist() == [0] * 3 + [2] * 3 + [42] * 3 and d.test.y.tolist() == [14, 2, 42, 0]
    assert d.num_classes == 43 and d.prep.mean == (0.0, 0.0, 0.0) and d.prep.std == (1.0, 1.0, 1.0)
    assert d.prep.crop_padding == 4 and not d.prep.hflip
    # solid colours survive resizing from any size exactly
    assert torch.equal(d.test.x[0], torch.tensor([200, 10, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    assert torch.equal(d.train.x[4, :, 7, 7], torch.tensor([10, 10, 200], dtype=torch.uint8))
    big = load("gtsrb", tmp_path, image_size=64, workers=1)
    assert big.train.x.shape == (9, 3, 64, 64) and big.prep.crop_padding == 8
    # the gtsrb/ level may be omitted
    assert torch.equal(load("gtsrb", tmp_path / "gtsrb", workers=1).test.y, d.test.y)


def test_gtsrb_malformed_csv_or_image_names_the_file(tmp_path):
    write_gtsrb(tmp_path)
    table = tmp_path / "gtsrb" / "GT-final_test.csv"
    table.write_text(table.read_text() + "99999.ppm;30;30;5;5;20;20;3\n")
    with pytest.raises(ValueError, match="99999.ppm") as err:
        load("gtsrb", tmp_path, workers=1)
    assert str(table) in str(err.value)
    write_gtsrb(tmp_path / "b")
    bad = tmp_path / "b" / "gtsrb" / "GTSRB" / "Training" / "00002" / "00000_00001.ppm"
    bad.write_bytes(bad.read_bytes()[:20])  # a truncated image
    with pytest.raises(ValueError, match="00000_00001.ppm") as err:
        load("gtsrb", tmp_path / "b", workers=1)
    assert str(bad) in str(err.value)


# -------------------------------------------------------------------------------------------- SVHN

def write_svhn(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import scipy.io
    out = {}
    for split, seed in (("train", 2), ("test", 3)):
        x = _images(N, 32, seed)
        y = (np.arange(N) % 10) + 1  # 1..10, 10 is the digit 0
        x[3] = 0
        x[3, 0, 1, 2] = 255  # red pixel at (row 1, col 2)
        X = np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # N×C×H×W → H×W×C×N as the .mat stores it
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": X, "y": y.astype(np.uint8)[:, None]})
        out[split] = (x, y % 10)
    return out


def test_svhn_mat_files_round_trip_and_label_10_is_0(tmp_path, monkeypatch):
    expected = write_svhn(tmp_path)
    monkeypatch.setenv("TSCRAY_DATA", str(tmp_path))  # the default root
    d = load("svhn")
    for split, data in (("train", d.train), ("test", d.test)):
        x, y = expected[split]
        assert data.x.shape == (N, 3, 32, 32) and data.x.dtype == torch.uint8
        assert torch.equal(data.x, torch.from_numpy(x)) and data.y.tolist() == y.tolist()
    assert d.train.y[9] == 0 and d.train.y[0] == 1 and d.train.x[3, 0, 1, 2] == 255 and int(d.train.x[3].sum()) == 255
    assert d.num_classes == 10 and d.prep.mean == (0.5, 0.5, 0.5) and not d.prep.hflip
    assert load("svhn", image_size=48).train.x.shape == (N, 3, 48, 48)


def test_svhn_truncated_mat_names_the_file(tmp_path):
    write_svhn(tmp_path)
    f = tmp_path / "test_32x32.mat"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match="test_32x32.mat"):
        load("svhn", tmp_path)


# ------------------------------------------------------------------------------------------ STL-10

def write_stl10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", 6, 4), ("test", 4, 5)):
        x = _images(n, 96, seed)
        x[1] = 0
        x[1, 1, 3, 70] = 255  # green pixel at (row 3, col 70): not symmetric, so a missed transpose shows
        y = np.array([1, 10, 5, 2, 9, 3][:n], dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes(y.tobytes())
        out[split] = (x, y.astype(np.int64) - 1)
    return out


def test_stl10_binary_is_transposed_and_labels_shifted(tmp_path):
    expected = write_stl10(tmp_path)
    d = load("stl10", tmp_path)
    for split, data in (("train", d.train), ("test", d.test)):
        x, y = expected[split]
        assert data.x.dtype == torch.uint8 and torch.equal(data.x, torch.from_numpy(x))
        assert data.y.tolist() == y.tolist()
    assert d.train.x[1, 1, 3, 70] == 255 and d.train.y[1] == 9 and d.test.y.tolist() == [0, 9, 4, 1]
    assert d.image_size == 96 and d.prep.crop_padding == 12 and d.num_classes == 10
    small = load("stl10", tmp_path, image_size=32)
    assert small.train.x.shape == (6, 3, 32, 32) and small.prep.crop_padding == 4


def test_stl10_truncated_or_mismatched_files_name_the_file(tmp_path):
    write_stl10(tmp_path)
    xf, yf = tmp_path / "stl10_binary" / "train_X.bin", tmp_path / "stl10_binary" / "test_y.bin"
    raw = xf.read_bytes()
    xf.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="train_X.bin.*truncated"):
        load("stl10", tmp_path)
    xf.write_bytes(raw)
    yf.write_bytes(yf.read_bytes()[:-1])
    with pytest.raises(ValueError, match="test_y.bin"):
        load("stl10", tmp_path)


# ------------------------------------------------------------------------------------ ImageNet-100

def write_imagefolder(root: Path) -> Path:
    base = root / "imagenet100"
    for split, classes in (("train", ("n02_cat", "n01_ant", "n03_dog")), ("val", ("n01_ant", "n02_cat"))):
        for ci, cls in enumerate(classes):
            d = base / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + 5 * i, 36), (ci * 60, 20 * i, 100)).save(d / f"img{i}.JPEG", quality=95)
            Image.new("L", (20, 30), 128).save(d / "gray.png")  # greyscale, converted to RGB
    # a two-colour 64×32 PNG: red left half, blue right half; at 32 px it is center-cropped to columns 16..47
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32, 0], img[:, 32:, 2] = 255, 255
    Image.fromarray(img).save(base / "val" / "n02_cat" / "two.png")
    (base / "val" / "n02_cat" / "notes.txt").write_text("not an image")
    return base


def test_imagenet100_imagefolder_sorted_classes_crop_and_cache(tmp_path, monkeypatch):
    base = write_imagefolder(tmp_path)
    d = load("imagenet100", tmp_path, image_size=32, workers=1)
    assert d.train.x.shape == (12, 3, 32, 32) and d.test.x.shape == (9, 3, 32, 32) and d.train.x.dtype == torch.uint8
    assert d.num_classes == 3  # n01_ant, n02_cat, n03_dog (sorted by folder name)
    assert d.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and d.test.y.tolist() == [0] * 4 + [1] * 5
    assert d.prep.mean == (0.485, 0.456, 0.406) and d.prep.crop_padding == 4 and not d.prep.hflip
    two = d.test.x[8]  # val/n02_cat/two.png sorts last in its folder
    assert bool((two[0, :, :16] == 255).all() and (two[2, :, :16] == 0).all())
    assert bool((two[2, :, 16:] == 255).all() and (two[0, :, 16:] == 0).all())
    assert bool((d.train.x[0] == 128).all())  # train/n01_ant/gray.png sorts first
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 4 and all(n.startswith(("train-32px-", "val-32px-")) for n in cached)

    def no_decode(path, size):
        raise AssertionError(f"decoded {path} again")

    with monkeypatch.context() as m:
        m.setattr("tscray.data.imagefolder._decode", no_decode)
        again = load("imagenet100", tmp_path, image_size=32)  # served from the cache
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    Image.new("RGB", (33, 33), (1, 2, 3)).save(base / "train" / "n03_dog" / "new.png")  # the folder changed
    more = load("imagenet100", tmp_path, image_size=32, workers=1)
    assert len(more.train) == 13 and bool((more.train.x[12] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all())
    assert len(list((tmp_path / "cache").rglob("train-32px-*.x.npy"))) == 1  # the stale cache is gone


def test_imagenet100_cache_is_memory_mapped_and_default_size_224(tmp_path):
    from tscray.data.files import decode_cached
    from tscray.data.imagefolder import _decode
    base = write_imagefolder(tmp_path)
    samples = [(p, 0) for p in sorted((base / "val" / "n01_ant").iterdir())]
    x, y = decode_cached("imagenet100", "val", base, samples, 24, _decode, tmp_path / "c", workers=1)
    assert isinstance(x, np.memmap) and x.shape == (4, 3, 24, 24) and y.tolist() == [0] * 4
    d = load("imagenet100", tmp_path, workers=1)
    assert d.image_size == 224 and d.test.x.shape == (9, 3, 224, 224) and d.prep.crop_padding == 28


def test_imagenet100_corrupt_image_and_unknown_val_class(tmp_path):
    base = write_imagefolder(tmp_path)
    (base / "val" / "n09_owl").mkdir()
    with pytest.raises(ValueError, match="n09_owl"):
        load("imagenet100", tmp_path, image_size=16, workers=1)
    (base / "val" / "n09_owl").rmdir()
    bad = base / "train" / "n03_dog" / "img1.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="img1.JPEG") as err:
        load("imagenet100", tmp_path, image_size=16, workers=1)
    assert str(bad) in str(err.value)


# --------------------------------------------------------------------------------- errors and roots

LAYOUT_SNIPPETS = {
    "cifar10": "cifar-10-batches-py/data_batch_1..5 and test_batch",
    "gtsrb": "gtsrb/GTSRB/Training/00000..00042/*.ppm",
    "svhn": "train_32x32.mat",
    "stl10": "stl10_binary/{train,test}_{X,y}.bin",
    "imagenet100": "imagenet100/{train,val}/<class_dir>",
}


@pytest.mark.parametrize("name", sorted(LAYOUT_SNIPPETS))
def test_missing_dataset_names_the_path_and_the_layout(tmp_path, name):
    root = tmp_path / "nowhere"
    assert name in DATASETS
    with pytest.raises(DatasetNotFound) as err:
        load(name, root)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert msg.startswith(f"{name}: ") and str(root) in msg and LAYOUT_SNIPPETS[name] in msg
    assert "TSCRAY_DATA" in msg
    with pytest.raises(DatasetNotFound, match=r"\$TSCRAY_DATA is unset"):
        load(name)  # no root and no $TSCRAY_DATA


def test_imagenet100_has_no_download(tmp_path):
    with pytest.raises(DatasetNotFound, match="no download"):
        load("imagenet100", tmp_path, download=True)


def test_bad_image_size_is_refused(tmp_path):
    write_svhn(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load("svhn", tmp_path, image_size=0)
