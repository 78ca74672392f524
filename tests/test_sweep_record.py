"""sweep.json keeps every spec that ran on a storage (slices of one study, a grown grid)."""

from __future__ import annotations

import json

from tscray import sweep_record
from tscray.config import validate
from tscray.plan import make_plan
from tscray.store import Store


def spec(tmp_path, attacks, **train):
    return validate({"name": "s", "storage": str(tmp_path), "grid": {"attack": attacks, "defense": ["tsc", "none"],
                                                                     "rounds": [1], "t": [0.5]},
                     "train": {"epochs": 1, **train}})


def d(s):
    """The spec as sweep.json holds it (JSON: tuples read back as lists)."""
    return json.loads(json.dumps(s.to_dict()))


def record(store, s):
    sweep_record.write(store, s, "x", make_plan(s))
    return store.read_json("sweep.json")


def test_slices_accumulate_and_a_rerun_slice_is_recorded_once(tmp_path):
    store = Store(str(tmp_path))
    a, b = spec(tmp_path, ["badnets"]), spec(tmp_path, ["blended"])
    record(store, a)
    info = record(store, b)
    assert info["spec"] == d(b) and info["history"] == [d(a)]
    assert info["trials"] == len(make_plan(b).trials)  # the current spec's count, as before
    ids = {t.id for s in (a, b) for t in make_plan(s).trials}
    assert set(sweep_record.trials(info)) == ids
    info = record(store, a)  # the first slice again: it is current, the other one history, nothing twice
    assert info["spec"] == d(a) and info["history"] == [d(b)]
    assert set(sweep_record.trials(info)) == ids


def test_the_newest_spec_wins_a_shared_trial_id_and_an_unreadable_old_record_is_replaced(tmp_path):
    store = Store(str(tmp_path))
    old, new = spec(tmp_path, ["badnets"], epochs=1), spec(tmp_path, ["badnets"], epochs=2)  # ids: grid points only
    record(store, old)
    info = record(store, new)
    trials = sweep_record.trials(info)
    new_trials = {t.id: t for t in make_plan(new).trials}
    assert set(trials) == set(new_trials)
    assert all(trials[i].final.key == new_trials[i].final.key for i in trials)
    store.write_bytes("sweep.json", b"{not json")
    info = record(store, old)
    assert info["history"] == [] and info["spec"] == d(old)


def test_a_recorded_spec_this_version_refuses_is_skipped(tmp_path):
    store = Store(str(tmp_path))
    a = spec(tmp_path, ["badnets"])
    info = record(store, a)
    info["history"] = [{"name": "s", "grid": {"attack": ["no-such-attack"]}}]
    assert set(sweep_record.trials(info)) == {t.id for t in make_plan(a).trials}


def test_a_moved_storage_keeps_its_recorded_sweep_id(tmp_path):
    """The id was a hash of the storage's path: a moved or copied storage got a new one on its next run, so
    MLflow held a second parent run for it (with no trials under it) and its new rows another id than its old."""
    import shutil

    from tscray.sweep import recorded_sweep_id, sweep_id

    old = tmp_path / "old"
    store = Store(str(old))
    assert recorded_sweep_id(store, str(old)) == sweep_id(str(old))  # a new storage: its path's
    sweep_record.write(store, spec(old, ["badnets"]), sweep_id(str(old)), make_plan(spec(old, ["badnets"])))
    shutil.move(str(old), str(tmp_path / "new"))
    moved = Store(str(tmp_path / "new"))
    assert recorded_sweep_id(moved, str(tmp_path / "new")) == sweep_id(str(old))
    moved.write_bytes("sweep.json", b"{damaged")
    assert recorded_sweep_id(moved, str(tmp_path / "new")) == sweep_id(str(tmp_path / "new"))
