"""Two drivers on one storage (issue 14, row 9): step leases in the store and one MLflow run per trial."""

from __future__ import annotations

import threading
import time

import pyarrow.fs as pafs
import pytest

from tscray.store import Store


@pytest.mark.parametrize("kind", ["local", "object"])
def test_a_lease_has_one_holder_until_it_expires(tmp_path, kind):
    store = Store(str(tmp_path / "s")) if kind == "local" else Store("bucket/s", pafs._MockFileSystem())
    assert store.lease_holder("k") is None
    assert store.acquire_lease("k", "A", ttl=0.6)
    assert store.acquire_lease("k", "A", ttl=0.6)  # re-entrant for its holder
    assert not store.acquire_lease("k", "B", ttl=0.6)
    assert store.lease_holder("k") == ("A", True)
    time.sleep(0.4)
    store.renew_lease("k", "A")
    time.sleep(0.4)
    assert not store.acquire_lease("k", "B", ttl=0.6)  # renewed: still live after 0.8 s
    time.sleep(0.8)  # A died: no more renewals
    assert store.lease_holder("k") == ("A", False)
    assert store.acquire_lease("k", "B", ttl=0.6)
    store.renew_lease("k", "A")  # the dead holder cannot take it back by renewing
    assert store.lease_holder("k") == ("B", True)
    store.release_lease("k", "A")  # nor release someone else's lease
    assert store.lease_holder("k") == ("B", True)
    store.release_lease("k", "B")
    assert store.lease_holder("k") is None and store.acquire_lease("k", "C", ttl=0.6)


def _interleaved(monkeypatch, first, second, at="lease_holder", pause=0.5):
    """Run ``first`` here; when it first calls Store's method ``at`` on the lease of "k" (after that read for
    ``lease_holder``, before that write for ``write_bytes``), run ``second`` on another thread and give it
    ``pause`` s to finish before ``first`` goes on: a second driver acting between a check and its act."""
    real, out, done = getattr(Store, at), {}, threading.Event()

    def interleave():
        if threading.current_thread() is threading.main_thread() and "thread" not in out:
            out["thread"] = threading.Thread(target=lambda: (out.__setitem__("second", second()), done.set()))
            out["thread"].start()
            done.wait(pause)

    def hook(self, key, *rest):
        if at == "write_bytes" and key == "leases/k.json":
            interleave()
        got = real(self, key, *rest)
        if at == "lease_holder" and key == "k":
            interleave()
        return got

    monkeypatch.setattr(Store, at, hook)
    out["first"] = first()
    out["thread"].join(10)
    monkeypatch.setattr(Store, at, real)
    return out["first"], out["second"]


def test_two_takers_of_an_expired_lease_do_not_both_get_it(tmp_path, monkeypatch):
    """B read the dead driver's lease as expired; A took it over; B then renamed A's live lease away and took
    it too: two drivers computed the step, one writing into the other's artifacts."""
    store = Store(str(tmp_path))
    assert store.acquire_lease("k", "dead", ttl=0.2)
    time.sleep(0.3)
    a, b = _interleaved(monkeypatch, lambda: store.acquire_lease("k", "A", ttl=60),
                        lambda: store.acquire_lease("k", "B", ttl=60))
    assert [a, b].count(True) == 1, (a, b)
    assert store.lease_holder("k") == ("A" if a else "B", True)


def test_a_late_renewal_does_not_overwrite_a_lease_another_driver_took(tmp_path, monkeypatch):
    """A's heartbeat came after its lease expired; B took the lease between A's check and A's write, and A's
    write made the file say A while B computed."""
    store = Store(str(tmp_path))
    assert store.acquire_lease("k", "A", ttl=0.2)
    time.sleep(0.3)
    _, b = _interleaved(monkeypatch, lambda: store.renew_lease("k", "A"),
                        lambda: store.acquire_lease("k", "B", ttl=60), at="write_bytes")
    holder = store.lease_holder("k")
    assert holder is not None and holder[1] and (holder[0] == "B") == b, (b, holder)


def test_taking_ones_own_expired_lease_again_renews_it(tmp_path):
    store = Store(str(tmp_path))
    assert store.acquire_lease("k", "A", ttl=0.3)
    time.sleep(0.4)
    assert store.acquire_lease("k", "A", ttl=0.3)  # a restarted coordinator of the same driver
    assert store.lease_holder("k") == ("A", True) and not store.acquire_lease("k", "B", ttl=0.3)


def test_an_unreadable_lease_counts_as_expired(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("leases/k.json", b"\x00garbage")
    assert store.lease_holder("k") == ("?", False)
    assert store.acquire_lease("k", "A", ttl=5)


def test_two_trackers_share_one_parent_and_one_run_per_trial(tmp_path):
    from tscray.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a = Tracker(uri, "two", "sid", str(tmp_path), {"name": "two"})
    b = Tracker(uri, "two", "sid", str(tmp_path), {"name": "two"})
    assert a.parent == b.parent
    ra = a.child("t1", {"defense": "tsc"})
    assert b.child("t1", {"defense": "tsc"}) == ra
    # a race: both created a run for t2 before either saw the other's; both settle on the earliest
    q = f"tags.tscray_parent = '{a.parent}' and tags.tscray_trial_id = 't2'"
    tags = {"mlflow.parentRunId": a.parent, "tscray_parent": a.parent, "tscray_trial_id": "t2", "tscray_kind": "trial"}
    first = a.client.create_run(a.exp_id, tags=tags).info.run_id
    second = b.client.create_run(b.exp_id, tags=tags).info.run_id
    assert b._one(q, second) == first and a._one(q, first) == first
    assert [r.info.run_id for r in a.client.search_runs([a.exp_id], q)] == [first]


def test_status_shows_steps_in_progress_and_expired_leases(tmp_path, capsys):
    from tscray.cli import main

    store = Store(str(tmp_path))
    store.write_json("sweep.json", {"spec": {"name": "x"}, "sweep_id": "s", "trials": 1, "steps": 2})
    assert store.acquire_lease("a", "A", ttl=60) and store.acquire_lease("b", "B", ttl=0.01)
    time.sleep(0.05)
    assert main(["status", str(tmp_path)]) == 0
    assert "in progress: 1 step(s) being computed by a driver now (1 expired lease(s) of a stopped driver)" in \
        capsys.readouterr().out


def _open_tracker(uri: str, storage: str, barrier) -> str:
    from tscray.tracking import Tracker

    barrier.wait()
    t = Tracker(uri, "race", "sid", storage, {"name": "race"})
    return t.parent


def test_drivers_starting_together_on_a_fresh_store_share_one_mlflow_database(tmp_path):
    """Two `tscray sweep` started in the same second on a fresh storage both created MLflow's SQLite schema:
    the later one died on `table alembic_version already exists`. Schema and experiment creation are
    serialised by a lock beside the database."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = 4
    barrier = ctx.Manager().Barrier(n)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with ctx.Pool(n) as pool:
        parents = pool.starmap(_open_tracker, [(uri, str(tmp_path), barrier)] * n)
    assert len(set(parents)) == 1
