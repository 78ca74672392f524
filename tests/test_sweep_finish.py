"""The sweep's closing summary and progress line (fast, no Ray): what they count."""

import io

import pytest

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


def test_progress_line_counts_started_trials_apart_from_the_steps_that_compute():
    """On 2 workers the line read '8 running' while 6 of those trials waited for a shared backdoored model:
    trials are 'started', and the steps say how many compute, on how many workers, and how many queue."""
    from tscray.sweep import TrialCounts, progress_line

    progress = TrialCounts(total=56, done=3, running={f"t{i}" for i in range(8)}, start=0.0)
    stats = {"computed": 10, "reused": 5, "inflight": 5, "computing": 2, "busy": 2, "workers": 2, "waiting": 0,
             "work": {"backdoor": [10, 10.0, 200.0]}}
    todo = {"backdoor": (110, 110.0)}
    line = progress_line(progress, stats, todo, elapsed=100.0)
    assert "running" not in line
    assert "3/56 done, 8 started, 0 failed" in line
    assert "10/110 computed, 5 reused, 2 computing on 2/2 workers, 3 queued" in line
    assert "ETA 1000s" in line and "another driver" not in line
    line = progress_line(progress, {**stats, "inflight": 6, "waiting": 1, "computed": 0, "work": {}}, todo, 5.0)
    assert "2 computing on 2/2 workers, 3 queued, 1 waiting for another driver" in line
    assert "ETA" not in line  # nothing computed yet: no rate to extrapolate


def test_the_progress_line_counts_only_steps_the_pending_trials_need():
    """A study resumed from copied result files counted every step of the plan that was not stored, including
    those only finished trials need, which are never computed: the clean-scale study read 'steps 14/603' and
    an ETA 23% too long when 489 were left."""
    from tscray.config import validate
    from tscray.plan import make_plan
    from tscray.sweep import steps_to_compute as by_kind

    def steps_to_compute(pending, stored):
        return sum(n for n, _ in by_kind(pending, stored).values())

    def plan_of(attacks):
        return make_plan(validate({"name": "s", "storage": "/tmp/unused", "train": {"epochs": 1},
                                   "grid": {"attack": attacks, "defense": ["tsc", "none"], "rounds": [1, 2],
                                            "t": [0.4, 0.5]}}))

    both, one = plan_of(["lf", "blended"]), plan_of(["lf"])  # (lf's backdoor reads an attack_resource step)
    nothing_stored = lambda step: False  # noqa: E731
    assert steps_to_compute(list(both.trials), nothing_stored) == len(both.steps)
    pending = [t for t in both.trials if t.params["attack"] == "lf"]  # blended's trials have finished
    assert steps_to_compute(pending, nothing_stored) == len(one.steps) < len(both.steps)
    backdoor = pending[0].chain[0].step
    below = {s.key for s in backdoor.inputs}
    assert below and all(k not in {st.step.key for t in pending for st in t.chain} for k in below)
    # the backdoored model is stored: it and its inputs (read only to compute it) are not computed again
    assert steps_to_compute(pending, lambda step: step.key == backdoor.key) == len(one.steps) - 1 - len(below)
    assert steps_to_compute(pending, lambda step: True) == 0


def test_the_eta_weighs_each_step_by_its_work_within_its_kind():
    """The ETA counted steps alike: in the clean-scale study a 2,500-image TSC round costs 10x a 200-image one, so
    the ETA after the small rounds was 12x short, and it swung between 13,000 and 85,000 s. Each kind's measured
    seconds per unit of :func:`step_work` (epochs x clean-set share) now prices that kind's remaining steps."""
    from tscray.config import validate
    from tscray.plan import cost_class, make_plan, step_work
    from tscray.sweep import TrialCounts, estimate_eta, progress_line, steps_to_compute

    plan = make_plan(validate({"name": "s", "storage": "/tmp/unused", "train": {"epochs": 3},
                               "defense": {"tsc": {"curve_epochs": 20, "finetune_epochs": 2}},
                               "grid": {"attack": ["badnets"], "defense": ["tsc"], "rounds": [1],
                                        "defense.clean_ratio": [0.02, 0.25]}}))
    rounds = {s.params["clean_ratio"]: s for s in plan.steps.values() if s.kind == "tsc_round"}
    assert step_work(rounds[0.25]) == pytest.approx(12.5 * step_work(rounds[0.02]))
    assert step_work(rounds[0.02]) == pytest.approx(0.02 * 22)  # curve + fine-tune epochs
    backdoor = next(s for s in plan.steps.values() if s.kind == "backdoor")
    assert step_work(backdoor) == 3
    todo = steps_to_compute(list(plan.trials), lambda step: False)
    assert todo["tsc_round"] == (2, pytest.approx(step_work(rounds[0.02]) + step_work(rounds[0.25])))

    # 5 small rounds took 10 s each, 5 rounds 12.5x their size are left: 625 s of work, at the wall time's rate
    small, big = step_work(rounds[0.02]), step_work(rounds[0.25])
    todo = {"tsc_round": (10, 5 * small + 5 * big), "backdoor": (1, 3.0)}
    done = {"tsc_round": [5, 5 * small, 50.0], "backdoor": [1, 3.0, 30.0]}
    assert estimate_eta(todo, done, elapsed=40.0) == pytest.approx(40.0 * 625 / 80)
    # a kind not measured yet is priced at the mean seconds of a computed step
    todo["stage"] = (2, 7.0)
    assert estimate_eta(todo, done, elapsed=40.0) == pytest.approx(40.0 * (625 + 2 * 80 / 6) / 80)
    assert estimate_eta(todo, {}, elapsed=40.0) != estimate_eta(todo, {}, elapsed=40.0)  # NaN: nothing measured

    stats = {"computed": 6, "reused": 0, "inflight": 2, "computing": 2, "busy": 2, "workers": 2, "work": done}
    assert f"ETA {40.0 * (625 + 2 * 80 / 6) / 80:4.0f}s" in progress_line(TrialCounts(total=10), stats, todo, 40.0)

    # a baseline defense's steps are priced per defense (NC's step costs many times FP's)
    plan = make_plan(validate({"name": "s", "storage": "/tmp/unused", "train": {"epochs": 1},
                               "grid": {"defense": ["nc", "fp", "tsc"], "rounds": [1]}}))
    todo = steps_to_compute(list(plan.trials), lambda step: False)
    assert {"defense:nc", "defense:fp", "tsc_round", "backdoor"} <= set(todo)
    assert {cost_class(s) for s in plan.steps.values()} == set(todo)


def test_ray_failing_to_start_is_one_resumable_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Under a memory limit (ulimit -v 6 GB) Ray's object store could not map its default size and ray.init
    raised a bare Exception('The current node timed out during startup...'): the sweep died with a traceback."""
    import yaml
    import ray

    from tscray.cli import main

    def init(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray "
                        "processes failed to startup.\nmore lines")
    monkeypatch.setattr(ray, "init", init)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "storage": str(tmp_path / "run"), "train": {"epochs": 1},
                                    "grid": {"defense": ["none"]}}))
    assert main(["sweep", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "stopped: Ray could not start on this machine: The current node timed out during startup" in err
    assert "ulimit -v" in err and "run the same command again" in err and "Traceback" not in err
    assert "more lines" not in err


def test_error_lines_are_each_errors_last_line_counted():
    from tscray.sweep import error_lines

    tb = "Traceback (most recent call last):\n  File 'x.py', line 1\n    f()\nValueError: bad t\n"
    assert error_lines([RuntimeError(tb), RuntimeError(tb), KeyError("k"), RuntimeError("")]) == [
        (2, "ValueError: bad t"), (1, "'k'"), (1, "RuntimeError")]
