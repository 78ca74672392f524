"""The user's own data a storage's steps were computed on (tscray.data_record): a resume, a dry run, and every
worker refuse data that changed under the same path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tscray import data_record
from tscray.cli import main
from tscray.config import load_spec
from tscray.plan import make_plan
from tscray.store import Store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.npz"


def _folder(root: Path, classes=("cat", "dog")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / c / f"{i}.png")
    return root


def test_the_fingerprint_follows_content_and_labels_not_times_or_hidden_files(tmp_path):
    npz = tmp_path / "d.npz"
    shutil.copy(EXAMPLE, npz)
    first = data_record.fingerprint(npz)
    assert first == data_record.fingerprint(str(npz)) and len(first) == 64
    raw = bytearray(npz.read_bytes())
    raw[-100] ^= 1
    npz.write_bytes(bytes(raw))
    assert data_record.fingerprint(npz) != first

    folder = _folder(tmp_path / "f")
    before = data_record.fingerprint(folder)
    (folder / ".DS_Store").write_bytes(b"x")  # hidden files and non-images: the loader reads neither
    (folder / "cat" / "._0.png").write_bytes(b"x")
    (folder / "README.txt").write_text("notes")
    import os
    os.utime(folder / "cat" / "0.png", ns=(1, 1))  # touched, same bytes (a copy that kept no times)
    assert data_record.fingerprint(folder) == before
    (folder / "cat" / "0.png").rename(folder / "dog" / "9.png")  # relabelled: same bytes, other class
    assert data_record.fingerprint(folder) != before


def test_the_fingerprint_covers_exactly_what_the_loader_reads(tmp_path, monkeypatch):
    """The hash comes from the loader's own file list: a symlinked class folder's images count (rglob does not
    enter it), and files the loader never reads (a loose image, a val/ beside test/) do not raise alarms."""
    import os

    elsewhere = _folder(tmp_path / "elsewhere", classes=("dog",))
    root = _folder(tmp_path / "d", classes=("cat",))
    os.symlink(elsewhere / "dog", root / "dog")
    before = data_record.fingerprint(root)
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(elsewhere / "dog" / "0.png")
    assert data_record.fingerprint(root) != before  # a dog image changed behind the link
    before = data_record.fingerprint(root)
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / "preview.png")  # not in a class folder
    assert data_record.fingerprint(root) == before

    split = tmp_path / "s"
    _folder(split / "train"), _folder(split / "test"), _folder(split / "val")
    before = data_record.fingerprint(split)
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(split / "val" / "cat" / "0.png")  # test/ is read, not val/
    assert data_record.fingerprint(split) == before
    (split / "train").rename(split / "Train")  # the same split under another spelling
    assert data_record.fingerprint(split) == before
    from tscray.data import custom
    real = custom._class_dirs
    monkeypatch.setattr(custom, "_class_dirs", lambda folder: real(folder)[::-1])  # another class-order rule
    assert data_record.fingerprint(split) != before  # same files, other labels (as numbered folders once got)
    monkeypatch.undo()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(split / "test" / "cat" / "0.png")
    assert data_record.fingerprint(split) != before


def test_a_storage_records_user_data_once_and_refuses_it_changed(tmp_path):
    npz = tmp_path / "d.npz"
    shutil.copy(EXAMPLE, npz)
    store = Store(str(tmp_path / "s"))
    names = [str(npz), "fashion-mnist-embedded", None]
    data_record.check(store, names, "s", write=False)
    assert not store.exists(data_record.NAME)
    data_record.check(store, names, "s")
    assert data_record.recorded(store) == {str(npz): data_record.fingerprint(npz)}  # registered data: not hashed
    data_record.check(store, names, "s")  # the same data: fine
    np.savez(npz, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2)
    with pytest.raises(data_record.DataChanged, match=f"{npz}: its content changed .* delete s/data.json"):
        data_record.check(store, names, "s")
    store.write_json(data_record.NAME, {"x": 1, str(npz): "0" * 64})  # (odd entries are ignored, not fatal)
    with pytest.raises(data_record.DataChanged):
        data_record.check(store, names, "s")
    (tmp_path / "s" / data_record.NAME).write_text("{not json")  # a damaged record accepts nothing
    with pytest.raises(data_record.DataChanged, match="unreadable.*delete it"):
        data_record.check(store, names, "s")
    (tmp_path / "s" / data_record.NAME).write_text("[]")  # JSON, but no record: not an empty one either
    with pytest.raises(data_record.DataChanged, match="not a mapping"):
        data_record.check(store, names, "s")


def _spec(tmp_path: Path, dataset: Path) -> Path:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "d", "storage": str(tmp_path / "runs"), "grid": {
        "dataset": [{"path": str(dataset)}], "defense": ["none"]}, "train": {"epochs": 1}}))
    return spec


def test_a_dry_run_and_a_resume_refuse_changed_data_before_writing_anything(tmp_path, capsys):
    from tscray.sweep import run_sweep

    npz = tmp_path / "d.npz"
    shutil.copy(EXAMPLE, npz)
    spec = _spec(tmp_path, npz)
    store = Store(str(tmp_path / "runs"))
    data_record.check(store, [str(npz)], "runs")  # as the first run recorded it
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    capsys.readouterr()
    x, y = np.load(EXAMPLE)["x"], np.load(EXAMPLE)["y"]
    np.savez(npz, x=x[::-1], y=y[::-1])  # the same images, in another order: another clean subset, other models
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{npz}: its content changed" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(data_record.DataChanged):
        run_sweep(load_spec(spec))
    assert store.listdir("") == [data_record.NAME]  # no sweep.json, no results: nothing was touched


def test_a_worker_refuses_a_copy_of_the_data_that_differs_from_the_record(tmp_path):
    from tscray.steps import Context

    npz = tmp_path / "d.npz"
    shutil.copy(EXAMPLE, npz)
    store = Store(str(tmp_path / "s"))
    assert Context(store).dataset(str(npz)).num_classes > 1  # no record (run without a sweep): no check
    store.write_json(data_record.NAME, {str(npz): "0" * 64})  # what the driver saw on its node
    with pytest.raises(data_record.DataChanged, match="this copy differs"):
        Context(store).dataset(str(npz))
    store.write_json(data_record.NAME, {str(npz): data_record.fingerprint(npz)})
    assert Context(store).dataset(str(npz)).num_classes > 1
    from tscray.data import DatasetNotFound
    npz.unlink()  # no copy on this node at all: the loader says so, not a hash's FileNotFoundError
    with pytest.raises(DatasetNotFound, match="no such file or folder"):
        Context(store).dataset(str(npz))


def test_import_steps_carries_the_data_record_and_refuses_steps_of_other_data(tmp_path, capsys):
    import torch

    state = {"w": torch.ones(2)}
    src, dst = Store(str(tmp_path / "src")), Store(str(tmp_path / "dst"))
    src.put_step("backdoor", "k", {"model": state}, {"records": []})
    src.write_json(data_record.NAME, {"/data/pets": "a" * 64})
    assert main(["import-steps", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert data_record.recorded(dst) == {"/data/pets": "a" * 64}  # dst's next run checks its data against it
    other = Store(str(tmp_path / "other"))
    other.write_json(data_record.NAME, {"/data/pets": "b" * 64})
    capsys.readouterr()
    assert main(["import-steps", str(tmp_path / "src"), str(tmp_path / "other")]) == 2
    assert "computed on other data at this path" in capsys.readouterr().err
    assert not any(other.step_keys().values())
    spec = tmp_path / "s.yaml"  # a spec on other data: the clash at /data/pets is not its business
    spec.write_text(yaml.safe_dump({"name": "x", "grid": {"defense": ["none"]}, "train": {"epochs": 1}}))
    assert main(["import-steps", str(tmp_path / "src"), str(tmp_path / "other"), "--spec", str(spec)]) == 0
    assert data_record.recorded(other) == {"/data/pets": "b" * 64}
    assert main(["import-steps", str(tmp_path / "src"), str(tmp_path / "empty"), "--spec", str(spec)]) == 0
    assert data_record.recorded(Store(str(tmp_path / "empty"))) == {}  # nothing copied: nothing adopted


@pytest.mark.slow
def test_a_sweep_on_the_users_data_records_it_and_its_resume_on_edited_data_is_refused(tmp_path):
    """On a real local Ray: the driver records the data, every worker checks its copy against the record
    (and passes), the run finishes; the same command on an edited file is refused before anything runs."""
    from tscray.sweep import run_sweep

    npz = tmp_path / "d.npz"
    shutil.copy(EXAMPLE, npz)
    raw = {"name": "own", "storage": str(tmp_path / "runs"), "grid": {"dataset": [{"path": str(npz)}],
           "defense": ["finetune", "none"]},
           "train": {"epochs": 1, "batch_size": 100, "arch_kw": {"widths": [8, 8, 8, 8]}},
           "defense": {"clean_ratio": 0.1, "finetune": {"epochs": 1, "batch_size": 50}}, "resources": {"workers": 2}}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(raw))
    summary = run_sweep(load_spec(spec))
    assert summary["done"] == summary["trials"] == 2
    store = Store(str(tmp_path / "runs"))
    assert data_record.recorded(store) == {str(npz): data_record.fingerprint(npz)}
    x, y = np.load(EXAMPLE)["x"], np.load(EXAMPLE)["y"]
    x[0] = 255 - x[0]  # one image edited
    np.savez(npz, x=x, y=y)
    results_before = sorted(p.name for p in (tmp_path / "runs" / "results").iterdir())
    with pytest.raises(data_record.DataChanged, match="its content changed"):
        run_sweep(load_spec(spec))
    assert sorted(p.name for p in (tmp_path / "runs" / "results").iterdir()) == results_before


def test_an_attack_file_edited_between_runs_is_refused_like_the_data(tmp_path, capsys):
    """Step keys name an attack's pattern by its path too (LF's pattern, Narcissus' trigger, Blended's image):
    editing it reused models trained with the old trigger. The sweep records it with the data; a dry run
    and a worker building the attack refuse an edited copy; composite attacks report their base's files."""
    from tscray import attacks
    from tscray.steps import Context

    pattern = tmp_path / "lf.npy"
    np.save(pattern, np.full((28, 28), 3.0, np.float32))
    assert attacks.build("lf", pattern=str(pattern)).files() == [pattern]
    blend = tmp_path / "b.png"
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(blend)
    assert attacks.build("sbl", trigger="blended", trigger_kw={"pattern": str(blend)}).files() == [blend]
    assert attacks.build("blended").files() == [] and attacks.build("badnets").files() == []

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "a", "storage": str(tmp_path / "runs"), "grid": {
        "attack": ["lf"], "defense": ["none"]}, "train": {"epochs": 1, "attack_kw": {"lf": {"pattern": str(pattern)}}}}))
    store = Store(str(tmp_path / "runs"))
    assert data_record.spec_inputs(load_spec(spec)) == [str(pattern)]
    data_record.check(store, data_record.spec_inputs(load_spec(spec)), "runs")  # as the first run records it
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    np.save(pattern, np.full((28, 28), 4.0, np.float32))
    capsys.readouterr()
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    assert f"{pattern}: its content changed" in capsys.readouterr().err
    (bd,) = [s for s in make_plan(load_spec(spec)).steps.values() if s.kind == "backdoor"]
    with pytest.raises(data_record.DataChanged, match="this copy differs"):
        Context(store).attack(bd)


def test_attack_files_named_only_in_a_grid_axis_are_recorded(tmp_path):
    """A ``train.attack_kw`` field axis (two LF patterns side by side) names files the base spec does not:
    each value's file is recorded, in the per-attack form and the flat one, and an SSL downstream set named
    by a grid axis too."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.full((28, 28), 3.0, np.float32))
    np.save(b, np.full((28, 28), 2.0, np.float32))
    for path in ("train.attack_kw.lf.pattern", "train.attack_kw.pattern"):
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump({"name": "a", "grid": {
            "attack": ["lf"], "defense": ["none"], path: [str(a), str(b)]}, "train": {"epochs": 1}}))
        assert sorted(data_record.spec_inputs(load_spec(spec))) == sorted([str(a), str(b)]), path
    two = [{"attack": ["badnets"], "defense": ["none"]},
           {"attack": ["lf"], "defense": ["none"], "train.attack_kw.lf.pattern": [str(b)]}]
    spec.write_text(yaml.safe_dump({"name": "a", "grid": two, "train": {"epochs": 1}}))
    assert data_record.spec_inputs(load_spec(spec)) == [str(b)]
    downstream = tmp_path / "d.npz"
    shutil.copy(EXAMPLE, downstream)
    spec.write_text(yaml.safe_dump({"name": "a", "grid": {
        "dataset": [str(EXAMPLE)], "arch": ["simclr-cnn"], "attack": ["ctrl"], "defense": ["none"],
        "ssl.downstream": [str(downstream)]}, "train": {"epochs": 1, "method": "simclr"}}))
    assert data_record.spec_inputs(load_spec(spec)) == [str(EXAMPLE), str(downstream)]
