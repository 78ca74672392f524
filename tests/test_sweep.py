"""The orchestrator end to end on a real local Ray: sharing, single-flight, faults and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tscray.config import validate
from tscray.plan import make_plan
from tscray.store import Store

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def tiny(storage, epochs=1, **grid):
    return {"name": "tiny", "storage": str(storage),
            "grid": {"defense": ["tsc", "mcr", "none"], "rounds": [1, 2], "t": [0.4, 0.5], **grid},
            "train": {"epochs": epochs, "batch_size": 256, "lr": 0.05, "arch_kw": {"widths": [8, 8, 8, 8]}},
            "defense": {"clean_ratio": 0.02, "tsc": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100},
                        "mcr": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100}},
            "resources": {"workers": 2}}


def mlflow_runs(storage):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("tscray/tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("tscray_kind") == "sweep"], \
        [r for r in runs if r.data.tags.get("tscray_kind") == "trial"]


def check_complete(storage, spec_raw):
    plan = make_plan(validate(spec_raw))
    store = Store(str(storage))
    table = pq.read_table(storage / "results").to_pandas()
    assert set(table.trial_id) == {t.id for t in plan.trials}
    assert not table.duplicated(["trial_id", "round", "stage", "t_curve", "step_key"]).any()
    assert (table.groupby("trial_id").stage.apply(lambda s: (s == "final").sum()) == 1).all()
    counts = store.computations()
    assert all(n <= 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}
    assert all(store.has_step(s.kind, k) for k, s in plan.steps.items())
    parents, children = mlflow_runs(storage)
    assert len(parents) == 1
    assert sorted(r.data.tags["tscray_trial_id"] for r in children) == sorted(t.id for t in plan.trials)
    return plan, table, counts


def test_sweep_shares_steps_survives_a_killed_worker_and_logs_once(tmp_path):
    from tscray.sweep import run_sweep
    raw = tiny(tmp_path / "run")
    raw["eval"] = {"curve_ts": [0.0, 1.0]}
    spec = validate(raw)
    # kill the shard worker running the 2nd dispatched step, mid-step
    summary = run_sweep(spec, fault_kill_at=2)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the driver must not leak its tracking URI
    assert summary["done"] == summary["trials"] == len(make_plan(spec).trials) == 7
    assert summary["stats"]["replaced_workers"] >= 1
    # the progress line's counters are balanced at the end, through the killed worker's retry too
    assert summary["stats"]["computing"] == summary["stats"]["busy"] == 0
    assert summary["stats"]["workers"] >= 1
    # the ETA's measurements: every computed step once, by kind, with its work and its measured seconds
    work = summary["stats"]["work"]
    assert sum(n for n, _, _ in work.values()) == summary["stats"]["computed"]
    assert set(work) >= {"backdoor", "tsc_round"} and all(w > 0 and s > 0 for _, w, s in work.values())
    plan, table, counts = check_complete(tmp_path / "run", raw)
    assert len(counts) == len(plan.steps) and set(counts.values()) == {1}  # each step computed exactly once
    assert summary["stats"]["reused"] > 0  # 7 trials asked for one backdoored model at once
    curve_rows = table[table.stage.isin(["curve1", "curve2", "curve"])]
    assert set(curve_rows.t_curve) == {0.0, 1.0}
    # curve 1's endpoints are the round's input and its permuted copy: the same function (BN statistics
    # are recomputed at each point from separately augmented batches, hence only close, not equal)
    c1 = table[(table.stage == "curve1") & (table["round"] == 1)]
    assert c1.acc.max() - c1.acc.min() < 2.0


@pytest.mark.slow
def test_sweep_survives_its_coordinator_being_killed(tmp_path):
    """Ray's OOM killer took the coordinator (and the shard workers it owns) while another process filled
    memory; the driver then stopped with a traceback (issue 14, row 10). The coordinator is now restarted
    by Ray, rebuilds its pool, and the calls in flight are retried: the sweep finishes with every row, each
    step in the store once."""
    from tscray.sweep import run_sweep
    raw = tiny(tmp_path / "run")
    spec = validate(raw)
    summary = run_sweep(spec, fault_die_at=3)  # the coordinator's process exits at its 3rd dispatch
    assert (tmp_path / "run" / "logs" / "fault-coordinator-died").exists()
    assert summary["done"] == summary["trials"] == len(make_plan(spec).trials) == 7
    plan, table, counts = check_complete(tmp_path / "run", raw)
    assert len(counts) == len(plan.steps) and set(counts.values()) == {1}


def _ray_processes():
    r = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def _wait_for_ray_to_die(before: set[int], timeout=60):
    """Wait for the Ray processes the killed sweep started (those not in ``before``) to exit; kill the rest.

    Only the test's own: another Ray on the machine (a user's sweep) is left alone."""
    ours = lambda: [p for p in _ray_processes() if p not in before]  # noqa: E731
    deadline = time.time() + timeout
    while ours() and time.time() < deadline:
        time.sleep(0.5)
    for pid in ours():  # still there: a real user would find and kill them too
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_cli(spec_path, env, wait=True):
    cmd = [sys.executable, "-m", "tscray.cli", "sweep", str(spec_path)]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_killed_driver_resumes_without_recomputing_and_new_grid_values_run_alone(tmp_path):
    storage = tmp_path / "run"
    raw = tiny(storage, epochs=4)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    before = set(_ray_processes())
    proc = _run_cli(spec_path, env, wait=False)
    store = Store(str(storage))
    deadline = time.time() + 300
    while time.time() < deadline and sum(len(v) for v in store.step_keys().values()) < 2:
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    _wait_for_ray_to_die(before)  # a crashed driver's Ray workers may outlive it for a moment; the user re-runs after
    finished_before = {k for v in store.step_keys().values() for k in v}
    assert finished_before and len(finished_before) < len(make_plan(validate(raw)).steps)

    r = _run_cli(spec_path, env)
    assert r.returncode == 0, r.stdout + r.stderr
    plan, table, counts = check_complete(storage, raw)
    assert all(counts.get(k, 0) <= 1 for k in finished_before)
    n_rows = len(table)

    r = _run_cli(spec_path, env)  # everything done: nothing runs, nothing is duplicated
    assert r.returncode == 0 and "nothing to run" in r.stdout
    assert len(check_complete(storage, raw)[1]) == n_rows

    raw2 = tiny(storage, epochs=4, t=[0.4, 0.5, 0.6])
    spec_path.write_text(yaml.safe_dump(raw2))
    r = _run_cli(spec_path, env)
    assert r.returncode == 0, r.stdout + r.stderr
    new = len(make_plan(validate(raw2)).trials) - len(plan.trials)
    assert f"{new} to run" in r.stdout
    _, _, counts2 = check_complete(storage, raw2)
    assert all(n <= 1 for n in counts2.values())


def test_a_damaged_store_is_repaired_by_the_next_run(tmp_path):
    """Issue 14, rows 7-8: a flipped byte in a shared backdoored model and a truncated result file were
    never detected (every later trial failed on every rerun; one bad file hid every row). The next run
    now recomputes only the damaged step and rebuilds the lost rows; dependents keep their artifacts."""
    from tscray.sweep import run_sweep

    raw = tiny(tmp_path / "run")
    raw["grid"].update({"defense": ["tsc", "none"], "rounds": [1], "t": [0.5]})
    spec = validate(raw)
    assert run_sweep(spec)["done"] == 2
    store = Store(str(tmp_path / "run"))
    plan = make_plan(spec)
    bd = next(s for s in plan.steps.values() if s.kind == "backdoor")
    blob = (tmp_path / "run" / "steps" / "backdoor" / bd.key / "model.safetensors")
    data = blob.read_bytes()
    blob.write_bytes(data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:])
    res = sorted((tmp_path / "run" / "results").glob("*.parquet"))[0]
    res.write_bytes(res.read_bytes()[:40])
    before = store.computations()

    summary = run_sweep(spec)
    assert summary["done"] == summary["trials"] == 2
    after = store.computations()
    assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)} == {bd.key: 1}
    assert summary["stats"]["repaired"] == 1
    table = pq.read_table(tmp_path / "run" / "results").to_pandas()
    assert set(table.trial_id) == {t.id for t in plan.trials}
    assert not table.duplicated(["trial_id", "round", "stage", "t_curve", "step_key"]).any()
    assert store.check_step("backdoor", bd.key) is None and blob.read_bytes() == data  # recomputed bitwise equal


def test_two_drivers_on_one_storage_compute_each_step_once(tmp_path):
    """Issue 14, row 9: two `tscray sweep` on the same storage, started seconds apart, each started its own
    Ray and computed shared steps twice, doubling MLflow runs. Step leases in the store make the second
    wait for and reuse what the first computes; MLflow keeps one parent and one run per trial.

    Both drivers must really overlap, whatever the machine's speed (on a loaded CI machine the first once
    finished before the second asked for anything): the test holds the leases of the root steps itself, as a
    third driver would, until both drivers report they wait for them, then lets go without computing them."""
    storage = tmp_path / "run"
    raw = tiny(storage, epochs=3)
    raw["grid"].update({"defense": ["tsc", "mcr", "none"], "rounds": [1, 2], "t": [0.5]})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    roots = [k for k, s in make_plan(validate(raw)).steps.items() if not s.inputs]
    store = Store(str(storage))
    assert roots and all(store.acquire_lease(k, "test-holder", 3600) for k in roots)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "tscray.cli", "sweep", str(spec_path)]
    logs = [tmp_path / f"driver{i}.out" for i in (1, 2)]
    drivers = [subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
               for log in logs]
    try:
        deadline = time.time() + 600
        while not all("waiting for another driver" in log.read_text() for log in logs):
            assert time.time() < deadline and all(d.poll() is None for d in drivers), \
                "\n".join(log.read_text() for log in logs)
            time.sleep(1)
        for k in roots:
            store.release_lease(k, "test-holder")
        rcs = [d.wait(timeout=900) for d in drivers]
    finally:
        for d in drivers:
            d.kill()
    outs = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n".join(outs)
    assert all("waited for another driver on this storage" in out for out in outs), "\n".join(outs)
    check_complete(storage, raw)  # every step computed once, one MLflow parent, one run per trial


def test_ctrl_c_releases_the_drivers_step_leases(tmp_path):
    """Issue 14: a sweep stopped with Ctrl-C left its step leases behind, so the restarted sweep waited up to a
    minute (their ttl) before computing those steps again. The driver drops them as it stops."""
    storage = tmp_path / "run"
    raw = tiny(storage, epochs=30)  # long steps: the interrupt lands mid-step
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "driver.out"
    driver = subprocess.Popen([sys.executable, "-m", "tscray.cli", "sweep", str(spec_path)], env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    store = Store(str(storage))
    leases = lambda: [n for n in store.listdir("leases") if n.endswith(".json")]  # noqa: E731
    try:
        deadline = time.time() + 300
        while not leases():
            assert time.time() < deadline and driver.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(2)
        os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        try:
            driver.wait(timeout=120)
        except subprocess.TimeoutExpired:  # Tune asks for a second Ctrl-C to force the stop
            os.killpg(driver.pid, signal.SIGINT)
            driver.wait(timeout=120)
    finally:
        driver.kill()
    assert leases() == [], log.read_text()
    assert "run the same command again to resume" in log.read_text()  # not "finished"
    assert driver.returncode == 130  # a stop, as the shell reports Ctrl-C (1 means trials errored)


def test_idle_workers_compute_later_trials_backdoored_models_ahead(tmp_path):
    """Issue 13: one trial at a time on two workers. The second attack's backdoored model was computed
    only once its trial started, after the whole first trial, while a worker idled; an idle worker now
    computes it ahead, so the two models are trained at the same time (and still once each)."""
    from tscray.sweep import run_sweep

    raw = tiny(tmp_path / "run", epochs=2, attack=["badnets", "blended"])
    raw["grid"].update({"defense": ["tsc"], "rounds": [1], "t": [0.5]})
    raw["resources"] = {"workers": 2, "max_concurrent_trials": 1}
    summary = run_sweep(validate(raw))
    assert summary["done"] == summary["trials"] == 2
    store = Store(str(tmp_path / "run"))
    spans = sorted((e["at"] - e["seconds"], e["at"]) for e in
                   (store.read_json(f"events/{n}") for n in store.listdir("events") if n.endswith(".json"))
                   if e["kind"] == "backdoor")
    assert len(spans) == 2 and spans[1][0] < spans[0][1], spans  # the two trainings overlapped
    assert summary["stats"]["ahead"] >= 1
    check_complete(tmp_path / "run", raw)


def test_a_step_kind_given_more_threads_holds_that_many_workers_and_records_its_threads(tmp_path):
    """Issue 13, the critical path on CPU: ``step_threads: {backdoor: 2}`` trains each backdoored model with
    two torch threads while it holds both workers (no other step runs beside it, so no core is shared), and
    every manifest records the threads its step ran with (a result never depends on what else ran)."""
    from tscray.sweep import run_sweep

    raw = tiny(tmp_path / "run", epochs=2, attack=["badnets", "blended"])
    raw["grid"].update({"defense": ["tsc"], "rounds": [1], "t": [0.5]})
    raw["resources"] = {"workers": 2, "threads": 1, "step_threads": {"backdoor": 2}}
    summary = run_sweep(validate(raw))
    assert summary["done"] == summary["trials"] == 2
    store = Store(str(tmp_path / "run"))
    events = [store.read_json(f"events/{n}") for n in store.listdir("events") if n.endswith(".json")]
    spans = {e["key"]: (e["at"] - e["seconds"], e["at"]) for e in events}
    backdoors = [e["key"] for e in events if e["kind"] == "backdoor"]
    assert len(backdoors) == 2
    for key, (start, end) in spans.items():
        threads = store.manifest(next(e["kind"] for e in events if e["key"] == key), key)["threads"]
        assert threads == (2 if key in backdoors else 1), key
        for bd in backdoors:  # nothing overlapped a backdoor training, not even the other one
            if key != bd:
                assert end <= spans[bd][0] + 0.05 or start >= spans[bd][1] - 0.05, (key, bd, spans)
    check_complete(tmp_path / "run", raw)


def test_a_finished_trial_whose_settings_changed_runs_again_instead_of_keeping_its_old_numbers(tmp_path, capsys):
    """A trial id names a grid point; its settings live in its steps' keys. Rerunning a storage with another
    ``train.epochs`` used to count every trial as finished (its results file exists) and report the old
    model's numbers under the new spec. Now a trial is finished only if its file holds its planned final step."""
    import pandas as pd

    from tscray.sweep import run_sweep

    raw = tiny(tmp_path / "run", epochs=1, attack=["badnets"])
    raw["grid"].update({"defense": ["none"]})
    raw["resources"] = {"workers": 1}
    first = run_sweep(validate(raw))
    assert first["ran"] == first["trials"] == 1
    raw["train"]["epochs"] = 2
    (trial,) = make_plan(validate(raw)).trials
    second = run_sweep(validate(raw))
    assert second["ran"] == 1, "the trial trained with 1 epoch passed for the 2-epoch spec's"
    assert "1 finished trial(s) ran with other settings" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "run" / "results-stale")) == 1  # the old numbers, kept aside
    table = pd.read_parquet(tmp_path / "run" / "results")
    assert set(table.step_key) == {trial.final.key}  # its file was rewritten, not added to
    assert second["results"] == str(tmp_path / "run" / "results.parquet")  # (what the summary names)
    combined = pd.read_parquet(tmp_path / "run" / "results.parquet")  # the whole storage in one file
    assert set(combined.step_key) == {trial.final.key} and len(combined) == len(table)
    third = run_sweep(validate(raw))
    assert third["ran"] == 0  # and now it is finished


def test_a_sweep_survives_losing_a_node_mid_step(tmp_path):
    """Issue 14: a preempted spot node. A real multi-node Ray cluster on this machine (a head and two
    worker nodes, each its own raylet); shard workers cannot fit on the head, so steps run on the worker
    nodes; one worker node is removed while a step runs on it. The sweep completes: every trial has its
    rows once, and no step that had finished is computed again."""
    import threading

    from ray.cluster_utils import Cluster

    from tscray.sweep import run_sweep

    raw = tiny(tmp_path / "run", epochs=3)
    raw["resources"] = {"workers": 2, "cpus_per_step": 1, "memory_gb_per_step": 0.5, "memory_gb_per_trial": 0.05}
    spec = validate(raw)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    store = Store(str(tmp_path / "run"))
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(summary=run_sweep(spec, address=cluster.address)))
    try:
        runner.start()
        deadline = time.time() + 300
        leased = lambda: [n for n in store.listdir("leases") if n.endswith(".json")]  # noqa: E731
        while time.time() < deadline and not (len(leased()) >= 2 and sum(map(len, store.step_keys().values()))):
            time.sleep(0.1)  # a step finished, and both workers (one per node) are computing one each
        finished = {k for v in store.step_keys().values() for k in v}
        assert finished and len(leased()) >= 2, "the sweep finished before a node could be removed"
        import ray  # the sweep's thread connected this process to the cluster

        from tscray.cluster import NAMESPACE
        from tscray.sweep import sweep_id

        prefix = f"tscray-coordinator-{sweep_id(str(tmp_path / 'run'))}-"  # (the driver's own: one per driver)
        name, = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        coord = ray.get_actor(name, namespace=NAMESPACE)
        busy = set(ray.get(coord.worker_nodes.remote()))  # both workers are computing a step
        victim = next(n for n in nodes if n.node_id in busy)
        cluster.remove_node(victim)  # the raylet and every worker on it die, as on a reclaimed spot node
        cluster.add_node(num_cpus=1)  # the autoscaler's replacement
        runner.join(timeout=900)
    finally:
        runner.join(timeout=60)
        cluster.shutdown()
    summary = box["summary"]
    assert summary["done"] == summary["trials"] == 7
    plan, table, counts = check_complete(tmp_path / "run", raw)  # rows once each, every step computed once
    assert all(counts[k] == 1 for k in finished)


def test_chaos_kills_then_the_same_rows_bitwise(tmp_path):
    """Issue 14's chaos proof: seeded, the driver (SIGKILL to its whole process group) or a shard worker
    (SIGKILL to its process) is killed at random moments, several times, then the sweep is finished. Its
    rows equal an uninterrupted run's bitwise (timings aside), and no step was computed twice. (Losing a
    whole node is the multi-node test above.)"""
    import random

    import pandas as pd

    rng = random.Random(20261129)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}

    def spec_file(name):
        raw = tiny(tmp_path / name, epochs=3)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return raw, path

    ref_raw, ref_path = spec_file("ref")
    assert _run_cli(ref_path, env).returncode == 0
    raw, path = spec_file("chaos")
    store = Store(str(tmp_path / "chaos"))
    faults = []
    for _ in range(3):
        before = set(_ray_processes())
        proc = subprocess.Popen([sys.executable, "-m", "tscray.cli", "sweep", str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        done = sum(map(len, store.step_keys().values()))
        deadline = time.time() + 300
        while time.time() < deadline and sum(map(len, store.step_keys().values())) <= done and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 4.0))  # a random moment after some progress
        if proc.poll() is not None:
            break
        if rng.random() < 0.5:
            faults.append("driver")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _wait_for_ray_to_die(before)
        else:
            workers = subprocess.run(["pgrep", "-f", "ray::ShardWorker"], capture_output=True, text=True).stdout.split()
            if workers:
                faults.append("worker")
                os.kill(int(rng.choice(workers)), signal.SIGKILL)
            assert proc.wait(timeout=900) == 0  # the coordinator replaced the worker and retried its step
    assert faults, "the sweep finished before any fault"
    assert _run_cli(path, env).returncode == 0

    keys = ["trial_id", "round", "stage", "t_curve", "step_key"]
    timing = ["sweep", "sweep_id", "seconds", "defense_seconds"]

    def rows(name):
        df = pd.read_parquet(tmp_path / name / "results").drop(columns=timing)
        return df.sort_values(keys, na_position="first").reset_index(drop=True)

    pd.testing.assert_frame_equal(rows("chaos"), rows("ref"), check_exact=True)
    check_complete(tmp_path / "chaos", raw)  # every step computed once, one MLflow run per trial


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sweep_on_s3_tracked_by_an_mlflow_server_survives_a_kill(tmp_path):
    """Issue 14, cluster storage and tracking for real: `storage` on an S3-protocol server (moto's, on
    127.0.0.1, reached through pyarrow's S3FileSystem with the endpoint in $AWS_ENDPOINT_URL, the way users
    reach MinIO) and `mlflow_uri` on an `mlflow server` process. The driver is killed mid-sweep, the same
    command resumes it: every trial has its rows once, no step computed twice, one MLflow run per trial."""
    pytest.importorskip("moto")
    import urllib.request

    import boto3
    from mlflow.tracking import MlflowClient
    from moto.server import ThreadedMotoServer

    from tscray import results

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    mport = _free_port()
    mlflow_uri = f"http://127.0.0.1:{mport}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mport),
                               "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    old_env = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    try:
        boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"]).create_bucket(Bucket="tscray")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{mlflow_uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        raw = tiny("s3://tscray/sweeps/tiny", epochs=3)
        raw["mlflow_uri"] = mlflow_uri
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **aws}
        store = Store("s3://tscray/sweeps/tiny")
        before = set(_ray_processes())
        proc = subprocess.Popen([sys.executable, "-m", "tscray.cli", "sweep", str(spec_path)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and sum(map(len, store.step_keys().values())) < 2:
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for_ray_to_die(before)
        finished = {k for v in store.step_keys().values() for k in v}

        r = subprocess.run([sys.executable, "-m", "tscray.cli", "sweep", str(spec_path)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        plan = make_plan(validate(raw))
        table = results.read(store).to_pandas()
        assert set(table.trial_id) == {t.id for t in plan.trials}
        assert not table.duplicated(["trial_id", "round", "stage", "t_curve", "step_key"]).any()
        counts = store.computations()
        assert all(n == 1 for n in counts.values()) and finished <= set(counts)
        client = MlflowClient(mlflow_uri)
        exp = client.get_experiment_by_name("tscray/tiny")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert len([r for r in runs if r.data.tags.get("tscray_kind") == "sweep"]) == 1
        trials = sorted(r.data.tags["tscray_trial_id"] for r in runs if r.data.tags.get("tscray_kind") == "trial")
        assert trials == sorted(t.id for t in plan.trials)
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its web workers may ignore SIGTERM for a while
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        s3.stop()


def test_workers_killed_for_memory_stop_the_sweep_with_one_resumable_message(tmp_path, monkeypatch):
    """Ray's memory monitor killing every worker (another process had taken 19 GB) reached the driver as
    Tune's RuntimeError("Caught unexpected exception: ...") from the OutOfMemoryError: a traceback and no
    word on resuming. It is the sweep's stop: one message, the advice, the store kept."""
    import ray.exceptions
    from ray import tune

    from tscray.sweep import SweepStopped, run_sweep

    def fit(self):
        try:
            raise ray.exceptions.OutOfMemoryError("10 worker(s) were killed due to the node running low on memory.")
        except ray.exceptions.OutOfMemoryError as err:
            raise RuntimeError(f"Caught unexpected exception: {err}") from err
    monkeypatch.setattr(tune.Tuner, "fit", fit)
    raw = tiny(tmp_path / "run", defense=["none"])
    with pytest.raises(SweepStopped) as stopped:
        run_sweep(validate(raw))
    msg = str(stopped.value)
    assert msg.startswith("Ray stopped the sweep (OutOfMemoryError: 10 worker(s) were killed")
    assert "lower resources.workers" in msg and "rerun the same command to resume" in msg


def test_a_trial_error_prints_its_cause_under_the_summary(tmp_path, capsys):
    """A trial error read only "1 trial(s) errored: run the same command again to retry"; its cause (here
    2×2 images, too small for the cnn) was in tune/.../error.txt, and a retry fails the same way."""
    from tscray.sweep import run_sweep

    raw = tiny(tmp_path / "run", epochs=1, attack=["badnets"])
    raw["grid"].update({"defense": ["none"]})
    raw["resources"] = {"workers": 1}
    raw["data_kw"] = {"fashion-mnist-embedded": {"image_size": 2}}
    summary = run_sweep(validate(raw))
    assert summary["errors"] == 1
    out = capsys.readouterr().out
    assert "1 trial(s) errored" in out
    (line,) = [s for s in out.splitlines() if s.startswith("  error   : ")]
    assert "RuntimeError" in line and "Output size is too small" in line, line

