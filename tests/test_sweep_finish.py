"""The sweep's closing summary (fast, no Ray): what it counts as this spec's finished trials."""

import io

from tscray.store import Store
from tscray.sweep import _finish


class _Tracker:
    """Records what the summary tells MLflow (the real tracker needs a store; only the status matters)."""

    def __init__(self) -> None:
        self.status = None

    def log_artifacts(self, *args) -> None:
        pass

    def close(self, status: str) -> None:
        self.status = status


def test_results_of_other_slices_on_the_storage_do_not_count_as_this_specs_trials(tmp_path):
    """Slices of one spec (or other specs) may share a storage; a run whose own trial did not finish used to
    print 'finished: 2/1' and close its MLflow run FINISHED because the other slices' files were counted."""
    store = Store(str(tmp_path))
    for tid in ("aaa", "bbb"):  # two trials of another slice (unreadable rows are skipped by the summary)
        store.write_bytes(f"results/trial-{tid}.parquet", b"not parquet")
    out, tracker = io.StringIO(), _Tracker()
    summary = {"trials": 1, "results": str(tmp_path / "results"), "mlflow_uri": "sqlite:///x", "sweep_id": "s"}
    _finish(tracker, str(tmp_path), store, summary, out, {"ccc"})
    assert summary["done"] == 0
    assert "stopped: 0/1 trials have results" in out.getvalue()
    assert "1 trial(s) not run" in out.getvalue()
    assert tracker.status == "KILLED"
    _finish(tracker, str(tmp_path), store, summary, io.StringIO(), {"ccc", "aaa"})
    assert summary["done"] == 1
