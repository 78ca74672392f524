"""A user's own dataset: an .npz or an image folder, named by its path (tscray.data.custom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tscray import data
from tscray.cli import main
from tscray.config import SpecError, validate
from tscray.data.custom import load_path, stratified_split

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes.npz"


def arrays(n=40, classes=4, shape=(12, 12), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % classes


def test_the_example_file_loads_with_its_own_test_split_and_train_statistics():
    ds = data.load(str(EXAMPLE))
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.in_channels, ds.image_size) == (600, 200, 4, 1, 24)
    x = ds.train.x.float() / 255
    assert ds.prep.mean == pytest.approx((float(x.mean()),), abs=1e-4)
    assert ds.prep.std == pytest.approx((float(x.std()),), abs=1e-4)
    assert ds.prep.hflip is False and ds.prep.crop_padding == 3
    assert sorted(torch.unique(ds.test.y).tolist()) == [0, 1, 2, 3]


def test_every_image_layout_gives_the_same_tensors(tmp_path):
    x, y = arrays(shape=(10, 10, 3))
    np.savez(tmp_path / "hwc.npz", x=x, y=y)
    np.savez(tmp_path / "chw.npz", x=x.transpose(0, 3, 1, 2), y=y)
    a, b = load_path(tmp_path / "hwc.npz"), load_path(tmp_path / "chw.npz")
    assert a.train.x.shape[1:] == (3, 10, 10)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    grey, gy = arrays()
    np.savez(tmp_path / "grey.npz", x=grey, y=gy.astype(np.uint8))
    assert load_path(tmp_path / "grey.npz").train.x.shape[1:] == (1, 12, 12)


def test_without_a_test_split_a_seeded_stratified_share_of_each_class_is_held_out(tmp_path):
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, te = stratified_split(y, 0.2, seed=3)
    assert sorted(torch.bincount(y[te]).tolist()) == [4, 6, 10]
    assert len(set(tr.tolist()) | set(te.tolist())) == 100 and not set(tr.tolist()) & set(te.tolist())
    assert torch.equal(stratified_split(y, 0.2, seed=3)[1], te) and not torch.equal(stratified_split(y, 0.2, 4)[1], te)
    x, ys = arrays(n=100)
    np.savez(tmp_path / "d.npz", x=x, y=ys)
    ds = load_path(tmp_path / "d.npz", test_ratio=0.3, split_seed=1)
    assert (len(ds.train), len(ds.test)) == (68, 32)  # round(0.3 * 25) = 8 of each class
    assert torch.bincount(ds.test.y).tolist() == [8, 8, 8, 8]


def test_image_size_resizes_and_given_normalisation_is_kept(tmp_path):
    x, y = arrays(shape=(12, 20))
    np.savez(tmp_path / "wide.npz", x=x, y=y)
    with pytest.raises(ValueError, match="not square; pass image_size"):
        load_path(tmp_path / "wide.npz")
    ds = load_path(tmp_path / "wide.npz", image_size=16, mean=[0.5], std=[0.25])
    assert ds.image_size == 16 and ds.prep.mean == (0.5,) and ds.prep.std == (0.25,)


@pytest.mark.parametrize("make,msg", [
    (lambda x, y: dict(x=x.astype(np.float32), y=y), "x must be uint8 images"),
    (lambda x, y: dict(x=x, y=y - 1), "negative label"),
    (lambda x, y: dict(x=x, y=np.zeros_like(y)), "one class only"),
    (lambda x, y: dict(x=x, y=y[:-3]), "x holds 40 images but y 37 labels"),
    (lambda x, y: dict(x=x, y=y.astype(np.float64)), "y must be integers"),
    (lambda x, y: dict(x=x, y=np.where(y == 2, 7, y)), "no image of class(es) [2"),
    (lambda x, y: dict(x=x, y=y, x_test=x, y_test=y + 5), "test labels hold label"),
    (lambda x, y: dict(x=x, y=y, x_test=x), "x_test and y_test come together"),
    (lambda x, y: dict(images=x, labels=y), "missing array(s) ['x', 'y']"),
    (lambda x, y: dict(x=x[:0], y=y[:0]), "x holds no images"),
    (lambda x, y: dict(x=np.zeros((40, 0, 0), np.uint8), y=y), "x images are 0×0 pixels: empty"),  # (passed as square)
    (lambda x, y: dict(x=np.zeros((40, 5, 6, 7), np.uint8), y=y), "no channel axis"),
    (lambda x, y: dict(x=x, y=np.array([object()] * 40)), "unreadable as a plain .npz"),
])
def test_bad_data_is_one_clear_error_naming_the_file(tmp_path, make, msg):
    x, y = arrays()
    path = tmp_path / "bad.npz"
    np.savez(path, **make(x, y))
    with pytest.raises(ValueError) as e:
        load_path(path)
    assert msg in str(e.value) and str(path) in str(e.value)


def test_missing_and_corrupt_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        data.load(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt or not an .npz"):
        data.load(str(tmp_path / "junk.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load(str(tmp_path / "empty"))


def write_folder(root: Path, split_names=("",), classes=("cat", "dog", "emu"), n=4, mode="L", size=(9, 9)):
    rng = np.random.default_rng(0)
    for split in split_names:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (*size[::-1], 3) if mode == "RGB" else size[::-1]
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")


def test_an_image_folder_reads_classes_in_name_order_with_or_without_splits(tmp_path):
    write_folder(tmp_path / "one", n=10)
    ds = data.load(str(tmp_path / "one"))
    assert (ds.num_classes, ds.in_channels, len(ds.train) + len(ds.test)) == (3, 1, 30)
    assert torch.bincount(ds.test.y).tolist() == [2, 2, 2]
    first = np.asarray(Image.open(tmp_path / "one" / "cat" / "0.png"))
    assert any(torch.equal(img[0], torch.from_numpy(first.copy())) for img in torch.cat([ds.train.x, ds.test.x]))
    write_folder(tmp_path / "two", ("train", "val"), mode="RGB")
    ds = data.load(str(tmp_path / "two"), image_size=6)
    assert (len(ds.train), len(ds.test), ds.in_channels, ds.image_size) == (12, 12, 3, 6)
    assert ds.test.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_bad_folders_are_clear(tmp_path):
    write_folder(tmp_path / "a", ("train", "test"))
    (tmp_path / "a" / "test" / "yak").mkdir()
    with pytest.raises(ValueError, match="yak: class folder has no counterpart in the train split"):
        data.load(str(tmp_path / "a"))
    write_folder(tmp_path / "b", classes=("x", "y"))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "b" / "x" / "odd.png")
    with pytest.raises(ValueError, match="2 different sizes"):
        data.load(str(tmp_path / "b"))
    (tmp_path / "c" / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.load(str(tmp_path / "c"))
    (tmp_path / "b" / "y" / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        data.load(str(tmp_path / "b"), image_size=5)


def test_a_train_folder_alone_is_one_split_and_a_class_named_train_stays_a_class(tmp_path):
    """PATH/train/<class>/* with no test/ beside it failed with 'no images in its class folders' (train/ was
    read as a class whose images were folders); a class named "train" (of vehicles) holds images, not folders."""
    write_folder(tmp_path / "a", ("train",), n=10)
    ds = data.load(str(tmp_path / "a"))
    assert (ds.num_classes, len(ds.train), len(ds.test)) == (3, 24, 6)
    write_folder(tmp_path / "v", classes=("car", "plane", "train"), n=5)
    ds = data.load(str(tmp_path / "v"))
    assert ds.num_classes == 3 and len(ds.train) + len(ds.test) == 15
    write_folder(tmp_path / "t", ("val",))
    with pytest.raises(ValueError, match="has a val/ split but no train/ split"):
        data.load(str(tmp_path / "t"))


def test_too_few_images_to_hold_out_a_test_split_is_an_error_not_an_empty_test_set(tmp_path):
    """One image per class left the test set empty without a word (every class keeps a training image)."""
    write_folder(tmp_path / "one", n=1)
    with pytest.raises(ValueError, match="3 images are too few to hold out a test split"):
        data.load(str(tmp_path / "one"))
    x, y = arrays(n=4, classes=2)
    np.savez(tmp_path / "t.npz", x=x, y=y)
    assert len(data.load(str(tmp_path / "t.npz"), test_ratio=0.5).test) == 2
    with pytest.raises(ValueError, match="too few"):
        data.load(str(tmp_path / "t.npz"), test_ratio=0.2)


def test_damaged_or_odd_npz_files_are_one_clear_error(tmp_path):
    """A bad CRC (zipfile.BadZipFile) and a zip of raw members (bytes, not arrays) gave tracebacks; a label of
    10**9 built a set of 10**9 class indices (minutes, gigabytes); uint64 2**64-1 read as 'negative label -1'."""
    import zipfile

    x, y = arrays()
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    raw = bytearray((tmp_path / "ok.npz").read_bytes())
    raw[300] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as z:
        z.writestr("x", "abc")
        z.writestr("y", "def")
    huge = y.copy()
    huge[0] = 10**9
    np.savez(tmp_path / "huge.npz", x=x, y=huge)
    np.savez(tmp_path / "u64.npz", x=x, y=np.where(y == 0, np.uint64(2**64 - 1), y.astype(np.uint64)))
    for name, msg in (("crc", "corrupt or not an .npz file"), ("raw", "are not .npy arrays"),
                      ("huge", "hold label 1000000000 but only 40 images"), ("u64", "beyond any class index")):
        with pytest.raises(ValueError, match=msg):
            data.load(str(tmp_path / f"{name}.npz"))


def test_folders_with_an_empty_class_nested_hidden_or_huge_images_are_handled(tmp_path, monkeypatch):
    """An empty last class folder was dropped without a word (2 classes instead of 3); images in sub-folders of
    a class were skipped; a macOS '._0.png' file aborted loading; a decompression bomb was a traceback."""
    write_folder(tmp_path / "e", classes=("a", "b", "c"))
    for f in (tmp_path / "e" / "c").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\] hold no images"):
        data.load(str(tmp_path / "e"))
    write_folder(tmp_path / "n", classes=("a", "b"), n=5)
    (tmp_path / "n" / "b" / "sub").mkdir()
    for f in list((tmp_path / "n" / "b").glob("*.png")):
        f.rename(tmp_path / "n" / "b" / "sub" / f.name)
    (tmp_path / "n" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = data.load(str(tmp_path / "n"))
    assert (ds.num_classes, len(ds.train) + len(ds.test)) == (2, 10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 9×9 = 81 pixels: over twice the limit
    with pytest.raises(ValueError, match="not a readable image"):
        data.load(str(tmp_path / "n"))
    monkeypatch.undo()
    for c in ("a", "b"):
        (tmp_path / "wide" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), 70000 * (c == "a"), np.int32), "I").save(tmp_path / "wide" / c / f"{i}.tif")
    with pytest.raises(ValueError, match="beyond 16 bits"):
        data.load(str(tmp_path / "wide"))


def test_16_bit_grey_images_keep_their_range_and_float_images_are_refused(tmp_path):
    """PIL's convert clips 16-bit grey at 255: a 16-bit PNG ramp loaded 99.6% white. Its full range now maps
    onto 0-255, in a user's folder and as a blend pattern; grey+alpha stays grey."""
    from tscray.attacks.blended import load_pattern

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    want = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for c in ("a", "b"):
        (tmp_path / "deep" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(ramp).save(tmp_path / "deep" / c / f"{i}.png")
        Image.fromarray(np.stack([want.numpy()] * 2, -1), "LA").save(tmp_path / "deep" / c / "alpha.png")
    assert Image.open(tmp_path / "deep" / "a" / "0.png").mode.startswith("I")
    ds = data.load(str(tmp_path / "deep"), test_ratio=0.25)
    assert ds.in_channels == 1
    assert all(torch.equal(img[0], want) for img in torch.cat([ds.train.x, ds.test.x]))
    assert torch.equal(load_pattern(tmp_path / "deep" / "a" / "0.png", 1, 16, 16)[0], want)
    rgb = load_pattern(tmp_path / "deep" / "a" / "0.png", 3, 16, 16)
    assert all(torch.equal(rgb[k], want) for k in range(3))
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "deep" / "b" / "f.tif")
    with pytest.raises(ValueError, match="f.tif: not a readable image .*32-bit float"):
        data.load(str(tmp_path / "deep"))


def test_sweeps_take_a_path_validate_it_up_front_and_key_data_kw_by_it(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLE.parents[1])
    spec = validate({"name": "x", "grid": {"dataset": [{"path": "examples/shapes.npz"}, "fashion-mnist-embedded"]},
                     "data_kw": {"examples/shapes.npz": {"image_size": 28, "mean": [0.5], "std": [0.25]}}})
    assert spec.grid.dataset == (str(EXAMPLE), "fashion-mnist-embedded")
    assert spec.data_kw == {str(EXAMPLE): {"image_size": 28, "mean": [0.5], "std": [0.25]}}
    x, y = arrays()
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros_like(y))
    with pytest.raises(SpecError) as e:
        validate({"name": "x", "grid": {"dataset": [str(tmp_path / "one.npz"), {"path": 3}, "nope"]},
                  "data_kw": {str(tmp_path / "one.npz"): {"test_ratio": 2, "download": True}}})
    got = "\n".join(e.value.problems)
    assert "grid.dataset[1]: {'path': 3}: path must be a non-empty string" in got
    assert "grid.dataset[2]: unknown dataset 'nope'" in got
    assert f"data_kw.{tmp_path / 'one.npz'}.test_ratio: 2 is not a number in (0, 1)" in got
    assert f"data_kw.{tmp_path / 'one.npz'}.download: unknown option" in got
    with pytest.raises(SpecError, match="one class only"):
        validate({"name": "x", "grid": {"dataset": [str(tmp_path / "one.npz")]}})


def test_an_empty_dataset_path_is_refused_not_read_as_the_current_folder():
    for entry, want in (("", "grid.dataset[0]: unknown dataset ''"),
                        ({"path": ""}, "grid.dataset[0]: {'path': ''}: path must be a non-empty string")):
        with pytest.raises(SpecError) as e:
            validate({"name": "x", "grid": {"dataset": [entry]}})
        assert want in "\n".join(e.value.problems)  # it said '<cwd>: no class sub-folders'


def test_backdoor_and_purify_take_a_path_and_data_kw_and_bad_data_is_one_line(tmp_path, capsys):
    out = tmp_path / "bd.safetensors"
    assert main(["backdoor", "--data", str(EXAMPLE), "--data-kw", "image_size=16", "--arch", "cnn", "--arch-kw",
                 '{"widths": [8, 8, 8, 8]}', "--epochs", "1", "--batch-size", "100", "--target", "2",
                 "--out", str(out)]) == 0
    from tscray.checkpoint import read_meta
    meta = read_meta(out)
    assert (meta["data"], meta["data_kw"], meta["target"]) == (str(EXAMPLE), {"image_size": 16}, 2)
    assert main(["purify", "--model", str(out), "--attack", "badnets", "--rounds", "1", "--curve-epochs", "1",
                 "--finetune-epochs", "1", "--clean-ratio", "0.1", "--batch-size", "50"]) == 0
    assert f"on {EXAMPLE}" in capsys.readouterr().out
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 8, 8), np.float32), y=np.arange(4))
    assert main(["backdoor", "--data", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be uint8 images" in err[0] and str(bad) in err[0]
    assert main(["backdoor", "--data", str(EXAMPLE), "--data-kw", "download=true",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--data-kw download: unknown option" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_a_balanced_clean_subset_gives_every_class_its_share():
    import torch

    from tscray.data import balanced_clean_subset, clean_subset

    labels = torch.tensor([0] * 900 + [1] * 60 + [2] * 40)  # a skewed set of 1,000
    idx = balanced_clean_subset(labels, 0.09, seed=3)  # 90 images: 30 per class
    assert len(idx) == 90 and len(set(idx.tolist())) == 90
    assert torch.bincount(labels[idx]).tolist() == [30, 30, 30]
    assert torch.equal(idx, balanced_clean_subset(labels, 0.09, seed=3))
    assert not torch.equal(idx, balanced_clean_subset(labels, 0.09, seed=4))
    few = balanced_clean_subset(labels, 0.2, seed=0)  # 200: classes 1 and 2 give all they have (60, 40)
    assert torch.bincount(labels[few]).tolist() == [100, 60, 40]
    assert torch.bincount(labels[clean_subset(1000, 0.09, 3)], minlength=3)[2] < 30  # what random gives


def test_clean_balanced_reaches_the_steps_and_leaves_other_keys_alone():
    from tscray.config import validate
    from tscray.plan import make_plan

    base = {"name": "b", "grid": {"defense": ["finetune"]}, "train": {"epochs": 1}}
    plain = make_plan(validate(base))
    balanced = make_plan(validate({**base, "defense": {"clean_balanced": True}}))
    (p,) = [s for s in plain.steps.values() if s.kind == "defense"]
    (b,) = [s for s in balanced.steps.values() if s.kind == "defense"]
    assert "clean_balanced" not in p.params and b.params["clean_balanced"] is True and p.key != b.key
    import pytest

    from tscray.config import SpecError
    with pytest.raises(SpecError, match="defense.clean_balanced"):
        validate({**base, "defense": {"clean_balanced": "yes"}})


def test_a_relative_data_path_is_recorded_absolute_so_purify_finds_it_from_anywhere(tmp_path, monkeypatch, capsys):
    import shutil

    from tscray.checkpoint import read_meta

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(EXAMPLE, work / "shapes.npz")
    monkeypatch.chdir(work)
    assert main(["backdoor", "--data", "shapes.npz", "--arch", "cnn", "--arch-kw", '{"widths": [8, 8, 8, 8]}',
                 "--epochs", "1", "--batch-size", "100", "--out", "bd.safetensors"]) == 0
    assert read_meta(work / "bd.safetensors")["data"] == str(work / "shapes.npz")  # it was "shapes.npz"
    monkeypatch.chdir(elsewhere)
    assert main(["purify", "--model", str(work / "bd.safetensors"), "--attack", "badnets", "--rounds", "1",
                 "--curve-epochs", "1", "--finetune-epochs", "1", "--clean-ratio", "0.1", "--batch-size", "50",
                 "--out", "p.safetensors"]) == 0, capsys.readouterr().err
    assert read_meta(elsewhere / "p.safetensors")["data"] == str(work / "shapes.npz")
    assert main(["purify", "--model", str(work / "bd.safetensors"), "--data", "../work/shapes.npz", "--attack",
                 "badnets", "--rounds", "1", "--curve-epochs", "1", "--finetune-epochs", "1", "--clean-ratio", "0.1",
                 "--batch-size", "50", "--out", "q.safetensors"]) == 0, capsys.readouterr().err
    assert read_meta(elsewhere / "q.safetensors")["data"] == str(work / "shapes.npz")  # was "../work/shapes.npz"


def test_a_data_kw_axis_names_a_dataset_path_with_dots():
    """``data_kw./…/shapes.npz.image_size`` was split at every dot: 'not a dataset of this sweep', naming
    the very path given."""
    from tscray.plan import make_plan

    spec = validate({"name": "x", "grid": {"dataset": [str(EXAMPLE)], "defense": ["none"],
                                           f"data_kw.{EXAMPLE}.image_size": [16, 24]}})
    got = sorted(s.params["data_kw"]["image_size"] for s in make_plan(spec).steps.values() if s.kind == "backdoor")
    assert got == [16, 24]


@pytest.mark.parametrize("splits", [("Train", "Test"), ("training", "testing"), ("TRAIN", "VAL"), ("train", "valid"),
                                    ("train", "validation")])
def test_split_folders_are_recognised_in_any_case_and_common_names(tmp_path, splits):
    """Train/ + Test/ loaded as two classes named "Test" and "Train" (their class folders' images mixed into
    them), and train/ + valid/ dropped the user's validation images for a stratified share of train/."""
    write_folder(tmp_path / "d", splits)
    ds = data.load(str(tmp_path / "d"))
    assert (ds.num_classes, len(ds.train), len(ds.test)) == (3, 12, 12)
    assert ds.test.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_a_folder_beside_the_splits_is_refused_and_test_is_preferred_to_val(tmp_path):
    write_folder(tmp_path / "d", ("train", "test", "val"), n=2)
    ds = data.load(str(tmp_path / "d"))  # test/ is the test split; val/ (model selection) is left alone
    assert len(ds.test) == 6
    write_folder(tmp_path / "d", ("extra",), n=1)
    with pytest.raises(ValueError, match=r"beside the train/ split, folder\(s\) \['extra'\] are no split"):
        data.load(str(tmp_path / "d"))


def test_an_npz_with_arrays_of_other_names_is_refused_naming_them(tmp_path):
    """x_val/y_val (or X_test) were ignored without a word: a stratified share replaced the user's test split."""
    x, y = arrays()
    np.savez(tmp_path / "v.npz", x=x, y=y, x_val=x[:8], y_val=y[:8])
    with pytest.raises(ValueError, match=r"unknown array\(s\) \['x_val', 'y_val'\]; expected x \(images\)"):
        data.load(str(tmp_path / "v.npz"))


def test_numbered_class_folders_are_classes_in_numeric_order(tmp_path):
    """Folders 0..10 were numbered as text: folder "10" was class 2, so --target 2 meant folder 10."""
    write_folder(tmp_path / "d", classes=tuple(str(i) for i in range(11)), n=2)
    Image.fromarray(np.full((9, 9), 77, np.uint8), "L").save(tmp_path / "d" / "10" / "0.png")
    ds = data.load(str(tmp_path / "d"), test_ratio=0.5)
    x, y = torch.cat([ds.train.x, ds.test.x]), torch.cat([ds.train.y, ds.test.y])
    assert y[(x == 77).flatten(1).all(1)].tolist() == [10]


def test_images_are_read_upright_as_their_exif_orientation_says_and_without_torch_warnings(tmp_path, recwarn):
    """A phone photo stored sideways with EXIF Orientation 6 was read sideways; every folder load warned that
    PIL's read-only array was not writable."""
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            stored = np.zeros((8, 8), np.uint8)
            stored[:, 0] = 250  # the stored left column: the top row once turned as Orientation 6 says
            im = Image.fromarray(stored, "L")
            exif = im.getexif()
            exif[0x0112] = 6  # rotate 90° clockwise to view
            im.save(tmp_path / "d" / c / f"{i}.jpg", exif=exif, quality=100)
    ds = data.load(str(tmp_path / "d"), test_ratio=0.5)
    img = ds.train.x[0, 0].float()
    assert img[0, 1:].mean() > 200 and img[1:, 0].mean() < 50, img
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_a_checkpoint_knows_its_classes_and_purify_refuses_data_whose_classes_moved(tmp_path, capsys):
    from tscray.checkpoint import read_meta
    from tscray.data_record import fingerprint

    folder = tmp_path / "pets"
    write_folder(folder, classes=("cat", "dog", "emu"), n=8, size=(16, 16))
    bd = tmp_path / "bd.safetensors"
    assert main(["backdoor", "--data", str(folder), "--arch", "cnn", "--arch-kw", '{"widths": [8, 8, 8, 8]}',
                 "--epochs", "1", "--batch-size", "8", "--target", "1", "--out", str(bd)]) == 0
    meta = read_meta(bd)
    assert meta["classes"] == ["cat", "dog", "emu"] and meta["data_sha256"] == fingerprint(folder)
    purify = ["purify", "--model", str(bd), "--attack", "badnets", "--rounds", "1", "--curve-epochs", "1",
              "--finetune-epochs", "1", "--clean-ratio", "0.5", "--batch-size", "8"]
    (folder / "cat").rename(folder / "fox")  # same count: every label moves (dog 0, emu 1, fox 2), target 1 is emu
    capsys.readouterr()
    assert main([*purify, "--out", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "has classes [dog, emu, fox], but" in err and "trained on [cat, dog, emu]" in err
    assert "(label 0: 'cat' then, 'dog' now)" in err and not (tmp_path / "p.safetensors").exists()
    (folder / "fox").rename(folder / "cat")
    img = folder / "cat" / "0.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(img)  # same classes, other pixels: purify, with a note
    assert main([*purify, "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "changed since bd.safetensors was trained on it" in capsys.readouterr().out
    out = read_meta(tmp_path / "p.safetensors")
    assert out["classes"] == ["cat", "dog", "emu"] and out["data_sha256"] == fingerprint(folder) != meta["data_sha256"]
