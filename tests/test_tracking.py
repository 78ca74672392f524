"""MLflow logging: the sweep's experiment opens on MLflow 3's model-training view."""

from tscray.tracking import EXPERIMENT_KIND, Tracker


def test_experiment_is_tagged_for_the_model_training_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})
    exp = t.client.get_experiment(t.exp_id)
    assert exp.tags[EXPERIMENT_KIND] == "custom_model_development"
    # an experiment created by an older tscray (no tag) gets it on the next sweep
    t.client.delete_experiment_tag(t.exp_id, EXPERIMENT_KIND)
    again = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})
    assert again.exp_id == t.exp_id and again.parent == t.parent
    assert again.client.get_experiment(t.exp_id).tags[EXPERIMENT_KIND] == "custom_model_development"


def test_params_and_round_metrics_land_on_the_runs(tmp_path):
    """Logged in batches (MLflow's limit is 100 params a batch): every param and every round's metric."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"name": "s", "grid": {f"axis{i}": [i, i + 1] for i in range(150)}, "long": "x" * 900}
    t = Tracker(uri, "s", "abc", str(tmp_path), spec)
    params = t.client.get_run(t.parent).data.params
    assert len(params) == 152 and params["grid.axis149"] == "[149, 150]" and params["long"] == "x" * 500
    trial = {"attack": "badnets", "t": 0.4, "rounds": None}
    for step, asr in ((1, 50.0), (2, 7.5)):
        t.log_round("trial-1", trial, {"acc": 90.0 - step, "asr": asr}, step)
    run = t.client.get_run(t.children["trial-1"])
    assert run.data.params == {"attack": "badnets", "t": "0.4", "rounds": ""}
    history = t.client.get_metric_history(run.info.run_id, "asr")
    assert [(m.step, m.value) for m in history] == [(1, 50.0), (2, 7.5)]
    assert run.data.metrics == {"acc": 88.0, "asr": 7.5}


def test_a_copied_storage_never_logs_into_the_original_and_a_report_logs_only_its_own_files(tmp_path, capsys):
    """MLflow records a run's artifact folder as an absolute path: a report on a copy of a storage wrote its files
    into the original storage's mlartifacts/ (and a report whose --out held other files uploaded them all,
    the storage itself included when --out was the storage)."""
    import shutil
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    orig = tmp_path / "orig"
    t = Tracker(f"sqlite:///{orig / 'mlflow.db'}", "s", "abc", str(orig), {"name": "s"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "table1.csv").write_text("a\n1\n")
    (out / "someone_elses.bin").write_text("x")
    t.log_files([out / "table1.csv"], "report")
    logged = Path(unquote(urlparse(t.client.get_run(t.parent).info.artifact_uri).path)) / "report"
    assert sorted(p.name for p in logged.iterdir()) == ["table1.csv"]
    assert t.elsewhere is None and logged.is_relative_to(orig)

    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    c = Tracker(f"sqlite:///{copy / 'mlflow.db'}", "s", "abc", str(copy), {"name": "s"})
    assert c.parent == t.parent and c.elsewhere is not None  # the copied database still points at orig/
    (out / "fig.png").write_bytes(b"png")
    c.log_files([out / "fig.png"], "report")
    c.log_artifacts(str(out), "results")
    assert sorted(p.name for p in logged.iterdir()) == ["table1.csv"]  # nothing written into the original
    assert not (orig / "mlartifacts").joinpath("x").exists() and "outside the storage" in capsys.readouterr().err
    # a database of the user's own, shared by storages, is left to its own locations
    shared = Tracker(f"sqlite:///{tmp_path / 'shared.db'}", "s", "abc", str(copy), {"name": "s"})
    assert shared.elsewhere is None


def test_a_resumed_trial_logs_each_round_once(tmp_path):
    """A resumed trial replays its stored rounds to Tune; each was logged again, so a trial run's history held
    rounds 0-2 twice (or three times after two resumes)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial = {"attack": "badnets", "t": 0.4}
    first = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})
    for step in (1, 2):
        first.log_round("trial-1", trial, {"acc": 90.0, "asr": 50.0 / step}, step)
    first.log_round("trial-1", trial, {"acc": 90.0, "asr": 25.0}, 2)  # (a retry within one driver)
    resumed = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})  # the next run of the sweep
    for step in (1, 2, 3):
        resumed.log_round("trial-1", trial, {"acc": 90.0, "asr": 50.0 / step}, step)
    run = resumed.children["trial-1"]
    assert run == first.children["trial-1"]
    assert sorted(m.step for m in resumed.client.get_metric_history(run, "acc")) == [1, 2, 3]
    assert sorted((m.step, m.value) for m in resumed.client.get_metric_history(run, "asr")) == [
        (1, 50.0), (2, 25.0), (3, 50.0 / 3)]
    rerun = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})  # the trial rerun with other settings
    rerun.log_round("trial-1", trial, {"acc": 91.0, "asr": 4.0}, 1)
    history = rerun.client.get_metric_history(run, "asr")
    assert [m.value for m in history if m.step == 1] == [50.0, 4.0]  # its new numbers are logged, not dropped
