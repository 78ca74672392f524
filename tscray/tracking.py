"""MLflow logging from a single writer on the driver.

One parent run per sweep and one child run per trial, found again by tags on resume (so no run is
ever duplicated); per-round metrics use the round as the MLflow step. Many processes writing one
fresh SQLite file race on schema creation, so only the driver writes.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ray import tune

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def default_uri(storage: str) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI inside a local sweep directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in storage and not storage.startswith("file://"):
        raise ValueError(f"storage {storage} is not local: set mlflow_uri (e.g. http://<head>:5000) in the spec, "
                         "--mlflow-uri, or $MLFLOW_TRACKING_URI")
    path = Path(storage.removeprefix("file://")).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def mlflow_uri_problem(uri: str) -> str | None:
    """Why MLflow cannot log to ``uri`` (a scheme it has no store for: ``nope://x``), or None; nothing is
    created. The run had written sweep.json and started Ray before such a URI failed, in a 57-line traceback."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry
    except ImportError:  # (another MLflow layout: the run finds out)
        return None
    try:
        registry.get_store_builder(uri)
    except Exception:  # noqa: BLE001 - MLflow's own exception types differ between its versions
        return (f"{uri!r} is not a tracking URI MLflow can log to (e.g. sqlite:////abs/path/mlflow.db, "
                "http://<host>:5000, file:///abs/dir)")
    return None


@contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """Serialise the first touch of a SQLite tracking database across processes: two drivers started in the
    same second both created MLflow's schema, and the later one died on `table ... already exists`."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# MLflow 3's UI opens an experiment on the view its kind names; without the tag it infers one and opens
# sweeps on the (empty) GenAI traces page. Training runs belong on the model-training view.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


class Tracker:
    """Finds or creates the sweep's parent run and its trials' child runs."""

    def __init__(self, uri: str, sweep_name: str, sweep_id: str, storage: str, spec: dict[str, Any]) -> None:
        import logging

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import
        self.uri = uri
        # An explicit client, never mlflow.set_tracking_uri: that also exports MLFLOW_TRACKING_URI to the
        # process environment, which then leaks into every later sweep started from this process.
        name = f"tscray/{sweep_name}"
        with _creation_lock(uri):  # MLflow creates and migrates the schema on first use
            self.client = MlflowClient(uri)
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                loc = None if "://" in storage else (Path(storage) / "mlartifacts").resolve().as_uri()
                try:
                    self.exp_id = self.client.create_experiment(name, artifact_location=loc, tags=EXPERIMENT_TAGS)
                except MlflowException as err:  # a tracking server: another driver created it just now
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            self.exp_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND) != EXPERIMENT_TAGS[EXPERIMENT_KIND]:
                self.client.set_experiment_tag(self.exp_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
        self.sweep_id = sweep_id
        runs = self.client.search_runs([self.exp_id], f"tags.tscray_sweep_id = '{sweep_id}' and "
                                                      "tags.tscray_kind = 'sweep'", max_results=1)
        if runs:
            self.parent = runs[0].info.run_id
        else:
            mine = self.client.create_run(self.exp_id, run_name=sweep_name, tags={
                "tscray_sweep_id": sweep_id, "tscray_kind": "sweep", "tscray_storage": storage}).info.run_id
            self.parent = self._one(f"tags.tscray_sweep_id = '{sweep_id}' and tags.tscray_kind = 'sweep'", mine)
            if self.parent == mine:
                flat = _flatten(spec)
                self._log_params(self.parent, {k: str(v)[:500] for k, v in list(flat.items())[:400]})
        self.elsewhere = self._artifacts_elsewhere(uri, storage)
        self.children: dict[str, str] = {}
        # per trial run, the (metric, round, value) it holds: a resumed trial replays its stored rounds to Tune,
        # and logging them again gave every such run's history each round twice (a round with a new value, a
        # trial rerun with other settings, is logged)
        self._logged: dict[str, set[tuple[str, int, float]]] = {}
        for r in self.client.search_runs([self.exp_id], f"tags.tscray_parent = '{self.parent}'", max_results=50000):
            self.children[r.data.tags["tscray_trial_id"]] = r.info.run_id

    def _one(self, query: str, mine: str) -> str:
        """After creating run ``mine``: the one run matching ``query`` that every driver agrees on (the
        earliest); a duplicate this driver created concurrently with another is deleted."""
        runs = self.client.search_runs([self.exp_id], query, max_results=100)
        if len(runs) <= 1:
            return mine
        keep = min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        if keep != mine:
            self.client.delete_run(mine)
        return keep

    def child(self, trial_id: str, params: dict[str, Any]) -> str:
        if trial_id not in self.children:
            query = f"tags.tscray_parent = '{self.parent}' and tags.tscray_trial_id = '{trial_id}'"
            found = self.client.search_runs([self.exp_id], query, max_results=100)
            if found:  # another driver on the same storage logged this trial
                self.children[trial_id] = min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
                return self.children[trial_id]
            name = "-".join(f"{v}" for v in params.values())
            run = self.client.create_run(self.exp_id, run_name=name[:200], tags={
                "mlflow.parentRunId": self.parent, "tscray_parent": self.parent, "tscray_trial_id": trial_id,
                "tscray_kind": "trial"})
            self.children[trial_id] = self._one(query, run.info.run_id)
            if self.children[trial_id] == run.info.run_id:
                self._log_params(run.info.run_id, {k: "" if v is None else str(v) for k, v in params.items()})
                self._logged[run.info.run_id] = set()  # (new: nothing to read back)
        return self.children[trial_id]

    def log_round(self, trial_id: str, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """Log a round's metrics on the trial's run, each (metric, round, value) once: a round the run already
        holds with that value (logged before a resume, or by another driver) is not logged again; a new
        value (the trial rerun with other settings) is."""
        from mlflow.entities import Metric

        run = self.child(trial_id, params)
        if run not in self._logged:  # a run of an earlier driver: what it holds, read once
            self._logged[run] = {(k, m.step, float(m.value)) for k in {*metrics, "acc", "asr"}
                                 for m in self.client.get_metric_history(run, k)}
        fresh = {k: float(v) for k, v in metrics.items() if (k, step, float(v)) not in self._logged[run]}
        if not fresh:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(run, metrics=[Metric(k, v, now, step) for k, v in fresh.items()])
        self._logged[run].update((k, step, v) for k, v in fresh.items())

    def _log_params(self, run: str, params: dict[str, str]) -> None:
        """One ``log_batch`` (MLflow splits it at its 100-param limit), where one ``log_param`` per param
        committed once each: 50 ms apiece on a local SQLite store, 2.8 s for the quickstart's spec."""
        from mlflow.entities import Param

        self.client.log_batch(run, params=[Param(k, v) for k, v in params.items()])

    def finish(self, trial_id: str, params: dict[str, Any], status: str) -> None:
        self.client.set_terminated(self.child(trial_id, params), status)

    def _artifacts_elsewhere(self, uri: str, storage: str) -> str | None:
        """The parent run's artifact folder when the storage's own database sends it outside the storage: a
        copied or moved storage keeps the absolute artifact location MLflow recorded at the original."""
        from urllib.parse import unquote, urlparse

        if not uri.startswith("sqlite:///") or "://" in storage:
            return None
        root = Path(storage).resolve()
        if Path(uri.removeprefix("sqlite:///")).resolve().parent != root:
            return None  # a database of the user's own (shared by storages): its locations are its business
        art = self.client.get_run(self.parent).info.artifact_uri or ""
        if not art.startswith("file:"):
            return None
        return None if Path(unquote(urlparse(art).path)).resolve().is_relative_to(root) else art

    def _may_log(self, what: str) -> bool:
        if self.elsewhere is None:
            return True
        import sys

        print(f"tscray: not logging the {what} to MLflow: this storage's MLflow runs keep their artifacts at "
              f"{self.elsewhere}, outside the storage (it was copied or moved); the files stay where they were "
              "written", file=sys.stderr)
        return False

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if Path(local_dir).is_dir() and self._may_log(f"{artifact_path} folder"):
            self.client.log_artifacts(self.parent, local_dir, artifact_path)

    def log_files(self, paths: list[Path], artifact_path: str) -> None:
        """Log these files (not the whole folder they sit in: a report's --out may hold anything)."""
        if paths and self._may_log(artifact_path):
            for p in paths:
                self.client.log_artifact(self.parent, str(p), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MLflowCallback(tune.Callback):
    """Tune callback (driver side) forwarding per-round trial results to the :class:`Tracker`."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def _ids(self, trial: Any) -> tuple[str, dict[str, Any]]:
        t = trial.config["trial"]
        return t["id"], t["params"]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid, params = self._ids(trial)
        metrics = {k: result[k] for k in ("acc", "asr") if isinstance(result.get(k), (int, float))}
        if metrics:
            self.tracker.log_round(tid, params, metrics, int(result.get("round", 0)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid, params = self._ids(trial)
        self.tracker.finish(tid, params, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid, params = self._ids(trial)
        self.tracker.finish(tid, params, "FAILED")
