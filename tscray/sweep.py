"""The sweep driver: plan, skip finished trials, run the rest as light Ray Tune trials, log.

Resume is "run the same command again": the store is the truth, so finished trials are skipped,
finished steps are reused, and only missing work runs. Adding a grid value runs only new trials.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from tscray.config import SweepSpec
from tscray.plan import Done, Plan, PlanSummary, Step, Trial, cost_class, make_plan, step_work
from tscray.store import Store

Print = Callable[[str], None]


def sweep_id(storage: str) -> str:
    return hashlib.sha256(storage.encode()).hexdigest()[:12]


def recorded_sweep_id(store: Store, uri: str) -> str:
    """The sweep's id: the one its ``sweep.json`` records, else (a new storage) one derived from its path. A
    storage moved or copied keeps its id, so its rows, its status and its MLflow parent run still agree (the
    path's hash gave a moved storage a second parent run, and its new rows another id than the old)."""
    from tscray import sweep_record

    if not store.exists(sweep_record.NAME):
        return sweep_id(uri)
    try:  # (a transient read error on a remote storage is raised: falling back would rewrite the id)
        return str(sweep_record.read(store)["sweep_id"])
    except ValueError:  # damaged: the run rewrites it
        return sweep_id(uri)


def error_lines(errors: Sequence[BaseException], most: int = 5) -> list[tuple[int, str]]:
    """The distinct causes of failed trials, most frequent first, as (count, one line): the last line of each
    error's text, which ends the innermost traceback (``TypeError: ...``). A trial error had read only "run the
    same command again to retry", its cause left in tune/.../error.txt."""
    counts: dict[str, int] = {}
    for err in errors:
        lines = [s.strip() for s in str(err).splitlines() if s.strip()]
        line = (lines[-1] if lines else type(err).__name__)[:300]
        counts[line] = counts.get(line, 0) + 1
    return sorted(((n, line) for line, n in counts.items()), key=lambda x: -x[0])[:most]


def describe_plan(plan: Plan | PlanSummary, done: Done | None = None) -> str:
    """The --dry-run text: trials, distinct steps by kind, and what a naive per-trial run would execute."""
    s = plan.summary(done) if isinstance(plan, Plan) else plan
    counts, naive = s.counts, s.naive
    lines = [f"sweep {s.name}: {s.trials} trials" + (f" ({s.finished} already finished)" if s.finished is not None else ""),
             f"{'step kind':<16}{'distinct':>10}{'naive':>10}"]
    order = {k: i for i, k in enumerate(("attack_resource", "ssl_pretrain", "backdoor"))}
    for kind in sorted(naive, key=lambda k: (order.get(k, len(order)), k)):
        lines.append(f"{kind:<16}{counts.get(kind, 0):>10}{naive[kind]:>10}")
    lines.append(f"{'all steps':<16}{sum(counts.values()):>10}{sum(naive.values()):>10}")
    lines.append(f"{'curve fits':<16}{Plan.curve_fits(counts):>10}{Plan.curve_fits(naive):>10}")
    lines.append("trials by defense: " + ", ".join(f"{k} {v}" for k, v in sorted(s.by_defense.items())))
    return "\n".join(lines)


# ------------------------------------------------------------------ the trial (runs in a Ray worker)

def run_trial(config: dict[str, Any]) -> None:
    """A light Tune trial: ask the coordinator for each step of the chain, report rounds, write rows."""
    import ray
    from ray import tune

    from tscray import results
    from tscray.cluster import NAMESPACE

    # Any: ActorHandle types method access as Never (ray's stubs), which made mypy skip the rest as unreachable
    coord: Any = ray.get_actor(config["coordinator"], namespace=NAMESPACE)
    trial = Trial.from_dict(config["trial"])
    store = Store(config["storage"])
    manifests: dict[str, dict[str, Any]] = {}
    for stage in trial.chain:
        manifests[stage.step.key] = ray.get(coord.request.remote(stage.step.to_dict()))
        if stage.report:
            # ("done" is a reserved Tune key that ends the trial: never report it)
            tune.report({"round": stage.round, **_round_metrics(manifests[stage.step.key], stage.report)})
    rows = results.trial_rows(config["sweep"], trial, manifests, config.get("sweep_id"))
    results.write_trial(store, trial.id, rows)


def _round_metrics(manifest: dict[str, Any], want: tuple[str, ...]) -> dict[str, float]:
    for stage in want:
        for r in manifest["records"]:
            if r["stage"] == stage:
                return {k: r[k] for k in ("acc", "asr") if r.get(k) is not None}
    return {}


# ------------------------------------------------------------------ progress

@dataclass
class TrialCounts:
    """Trial counters fed by a Tune callback, printed with step counters by a ticker thread."""

    total: int
    done: int = 0
    failed: int = 0
    running: set = field(default_factory=set)
    start: float = field(default_factory=time.time)


def _make_progress_callback(progress: TrialCounts):
    from ray import tune

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.running.add(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.running.discard(trial.trial_id)
            progress.done += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.running.discard(trial.trial_id)
            progress.failed += 1
    return ProgressCallback()


Work = dict[str, tuple[int, float]]  # cost class (a step kind) -> (steps, their summed step_work)


def progress_line(progress: TrialCounts, stats: dict[str, Any], todo: Work, elapsed: float) -> str:
    """One progress line. A trial Tune has started may wait for a worker or for a step another trial
    shares, so trials are counted as "started"; the steps say what runs: ``computing`` on ``busy`` of
    the ``workers``, the rest of those in flight waiting for their inputs or a free worker."""
    done = stats["computed"]
    to_compute = sum(n for n, _ in todo.values())
    eta = estimate_eta(todo, stats.get("work", {}), elapsed)
    computing, other_driver = stats.get("computing", 0), stats.get("waiting", 0)
    queued = max(0, stats["inflight"] - computing - other_driver)
    return (f"trials {progress.done}/{progress.total} done, {len(progress.running)} started, "
            f"{progress.failed} failed | steps {done}/{to_compute} computed, {stats['reused']} reused, "
            f"{computing} computing on {stats.get('busy', 0)}/{stats.get('workers', 0)} workers, {queued} queued"
            + (f", {other_driver} waiting for another driver" if other_driver else "")
            + f" | {elapsed:5.0f}s"
            + (f", ETA {eta:4.0f}s" if eta == eta else ""))


def estimate_eta(todo: Work, done: dict[str, list[float]], elapsed: float) -> float:
    """Seconds left: each cost class's remaining work at its measured seconds per unit of work (a class not yet
    measured at the mean seconds of a computed step), scaled by the wall time the measured seconds took (which
    folds in how many workers ran at once). NaN until a step has been computed. Counting steps alike swung
    the clean-scale study's ETA between 13,000 and 85,000 s: its 2,500-image rounds cost 10x its 200-image ones."""
    spent = sum(s for _, _, s in done.values())
    steps = sum(n for n, _, _ in done.values())
    if not steps or spent <= 0:
        return float("nan")
    left = 0.0
    for kind, (n, work) in todo.items():
        dn, dwork, dsec = done.get(kind, (0, 0.0, 0.0))
        if dn and dwork > 0:
            left += max(0.0, work - dwork) * dsec / dwork
        else:
            left += max(0, n - dn) * spent / steps
    return elapsed * left / spent


def steps_to_compute(pending: list[Trial], stored: Callable[[Step], bool]) -> Work:
    """The distinct steps the ``pending`` trials still need computed, by :func:`cost_class` (count and
    :func:`step_work`): their chains' steps and the inputs of those not ``stored``. A stored step's inputs are
    never read again, and steps only finished trials need (a study resumed from copied result files) are never
    computed, so neither counts toward the progress line."""
    seen: set[str] = set()
    todo = [stage.step for t in pending for stage in t.chain]
    out: dict[str, tuple[int, float]] = {}
    while todo:
        step = todo.pop()
        if step.key in seen:
            continue
        seen.add(step.key)
        if stored(step):
            continue
        n, work = out.get(cost_class(step), (0, 0.0))
        out[cost_class(step)] = (n + 1, work + step_work(step))
        todo.extend(step.inputs)
    return out


def _ticker(progress: TrialCounts, coord: Any, to_compute: Work, out: TextIO, stop: threading.Event) -> None:
    import ray

    tty = out.isatty()
    while not stop.wait(2.0 if tty else 15.0):
        try:
            s = ray.get(coord.get_stats.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress must never break the sweep
            continue
        line = progress_line(progress, s, to_compute, time.time() - progress.start)
        out.write(("\r" + line.ljust(110)) if tty else line + "\n")
        out.flush()
    if tty:
        out.write("\n")


# ------------------------------------------------------------------ driver

def _trial_name(trial: Any) -> str:
    return f"trial-{trial.config['trial']['id']}"


def _quiet_ray_logging(log_dir: Path) -> Path:
    """Send Ray's logging, and the raylet messages Ray prints straight to the terminal, to a log file."""
    import ray._private.worker as ray_worker

    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "ray.log"
    handler = logging.FileHandler(path)
    original = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)

    def to_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            logging.getLogger("ray").warning("(raylet) %s", " ".join(map(str, data.get("lines", []))))
        else:
            original(data, ignore_prefix)
    to_log.__wrapped__ = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_log
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    return path


class SweepStopped(RuntimeError):
    """The sweep could not go on (its Ray actors died past their restarts); the store stays resumable."""


def _check_gpus(need: float, address: str | None, out: TextIO) -> None:
    """A step asking more GPUs than any node has never starts: on this machine's own Ray that is an error
    (before any compute); on a cluster, which an autoscaler may grow, one line says what it waits for."""
    import ray

    if not need:
        return
    most = max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if most >= need:
        return
    if not address:
        raise ValueError(f"resources.gpus_per_step: each step asks {need:g} GPU(s), but this machine has "
                         f"{most:g}; set gpus_per_step: 0 to run on CPU, or pass --address of a cluster with GPUs")
    print(f"waiting for a node with {need:g} GPU(s) per step: the largest node of this cluster has {most:g} now "
          "(an autoscaler may add one; otherwise lower resources.gpus_per_step)", file=out, flush=True)


def _check_memory(res: Any, address: str | None, out: TextIO) -> None:
    """A worker (and a trial) asking more memory than any node has never starts: same rule as GPUs."""
    import ray

    need = (res.memory_gb_per_step + res.memory_gb_per_trial) * 2**30
    if not need:
        return
    most = max((float(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if most >= need:
        return
    msg = (f"resources.memory_gb_per_step: a step and a trial ask {need / 2**30:.2f} GiB together, but the largest "
           f"node offers Ray {most / 2**30:.1f} GiB")
    if not address:
        raise ValueError(msg + "; lower memory_gb_per_step (0 declares nothing)")
    print(f"waiting: {msg} (an autoscaler may add a larger node)", file=out, flush=True)


def run_sweep(spec: SweepSpec, storage: str | None = None, address: str | None = None,
              out: TextIO | None = None, fault_kill_at: int = 0, fault_die_at: int = 0) -> dict[str, Any]:
    """Run (or resume) a sweep; returns a summary with paths and counts."""
    out = out if out is not None else sys.stdout  # resolved per call: sys.stdout may have been swapped
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray: no token-auth warning
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100000")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ray
    from ray import tune

    from tscray import cluster, data_record, results, sweep_record
    from tscray.tracking import MLflowCallback, Tracker, default_uri

    uri = spec.storage_path(storage)
    store = Store(uri)
    recorded_now = data_record.check(store, data_record.spec_inputs(spec), uri)  # (before anything is written)
    if recorded_now and any(store.subdirs(f"steps/{kind}") for kind in store.subdirs("steps")):
        print(f"recorded the content of {', '.join(recorded_now)} in {uri}/{data_record.NAME}; the steps already here "
              "were computed before it was recorded, and are taken to be of this data", file=out, flush=True)
    sid = recorded_sweep_id(store, uri)
    plan = make_plan(spec)
    sweep_record.write(store, spec, sid, plan)
    moved = results.set_aside_damaged(store)
    if moved:
        print(f"set aside {len(moved)} unreadable result file(s) in {uri}/{results.DAMAGED_DIR}: their trials "
              f"run again from the stored steps", file=out, flush=True)
    stale = results.set_aside_stale(store, plan.trials)
    if stale:
        print(f"{len(stale)} finished trial(s) ran with other settings (their final step differs from this "
              f"spec's): their results moved to {uri}/{results.STALE_DIR}; they run again", file=out, flush=True)
    done = results.done_trials(store)
    pending = [t for t in plan.trials if t.id not in done]
    local_dir = Path(uri) if "://" not in uri else Path.cwd() / f".tscray-{sid}"
    ray_log = _quiet_ray_logging(local_dir / "logs")
    print(f"sweep {spec.name} ({sid}) at {uri}: {len(plan.trials)} trials, {len(pending)} to run, "
          f"{len(plan.steps)} distinct steps; Ray log: {ray_log}", file=out, flush=True)
    mlflow_uri = spec.mlflow_uri or default_uri(uri)
    summary: dict[str, Any] = {"storage": uri, "results": f"{uri}/{results.COMBINED}", "mlflow_uri": mlflow_uri,
                               "trials": len(plan.trials), "ran": len(pending), "sweep_id": sid}
    if not pending:
        print("every trial is already finished; nothing to run", file=out)
        _finish(Tracker(mlflow_uri, spec.name, sid, uri, spec.to_dict()), uri, store, summary, out,
                {t.id for t in plan.trials})
        return summary

    # MLflow's store (a new SQLite schema alone takes ~3 s) is set up while Ray starts and the workers
    # begin the backdoored models; Tune, which logs to it, starts once both are ready. (mlflow is imported
    # here first: two threads importing libraries that share dependencies can see half-made modules.
    # A failure of the store surfaces at tracking.result(), after Ray has started; nothing is lost.)
    import mlflow.entities  # noqa: F401
    import mlflow.tracking  # noqa: F401

    pool = ThreadPoolExecutor(1, thread_name_prefix="tscray-mlflow")
    tracking = pool.submit(Tracker, mlflow_uri, spec.name, sid, uri, spec.to_dict())
    pool.shutdown(wait=False)
    try:
        ray.init(address=address, namespace=cluster.NAMESPACE, log_to_driver=False, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}})
    except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its node does not come up
        tracking.cancel()
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SweepStopped(
            f"Ray could not start{f' at {address}' if address else ' on this machine'}: {first[:300]} (its logs: "
            f"{ray_log} and /tmp/ray/session_latest/logs; a memory limit such as `ulimit -v` can keep its object "
            "store from starting). Nothing was computed; run the same command again once Ray starts") from None
    stop = threading.Event()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # of this driver's step leases
    try:
        res = spec.resources
        _check_gpus(res.gpus_per_step, address, out)
        _check_memory(res, address, out)
        coord, n_workers = cluster.start(uri, sid, {
            "gpus_per_step": res.gpus_per_step, "cpus_per_step": res.cpus_per_step, "threads": res.threads,
            "workers": res.workers, "precision": res.precision, "channels_last": res.channels_last,
            "step_retries": res.step_retries, "memory_gb_per_step": res.memory_gb_per_step,
            "step_threads": dict(res.step_threads),
            "lease_owner": owner}, spec.data_root, spec.eval.batch_size, fault_kill_at, fault_die_at,
            str(local_dir / "logs" / "fault-coordinator-died") if fault_die_at else "")
        print(f"{n_workers} shard worker(s), {res.threads} thread(s) each"
              + (f", {res.gpus_per_step} GPU each" if res.gpus_per_step else "")
              + "".join(f"; {k} steps {n} threads" for k, n in sorted(res.step_threads.items())), file=out, flush=True)
        # idle workers compute the pending trials' backdoored models ahead, in trial order, instead of
        # waiting for Tune to start those trials (the first attack's model otherwise gates every early trial)
        roots = {t.chain[0].step.key: t.chain[0].step for t in pending}
        coord.compute_ahead.remote([s.to_dict() for s in roots.values() if not store.has_step(s.kind, s.key)])
        tracker = tracking.result()
        progress = TrialCounts(total=len(pending))
        to_compute = steps_to_compute(pending, lambda s: store.has_step(s.kind, s.key))
        ticker = threading.Thread(target=_ticker, args=(progress, coord, to_compute, out, stop), daemon=True)
        ticker.start()
        trial_res: dict[str, float] = {"cpu": cluster.TRIAL_CPU}
        if res.memory_gb_per_trial:
            trial_res["memory"] = float(int(res.memory_gb_per_trial * 2**30))
        trainable = tune.with_resources(run_trial, trial_res)
        tuner = tune.Tuner(
            trainable,
            param_space={"coordinator": cluster.coordinator_name(sid, owner), "storage": uri, "sweep": spec.name,
                         "sweep_id": sid,
                         "trial": tune.grid_search([t.to_dict() for t in pending])},
            tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent_trials,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=f"run-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=f"{uri}/tune" if "://" in uri
                else str(Path(uri) / "tune"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=res.max_failures),
                callbacks=[MLflowCallback(tracker), _make_progress_callback(progress)]),
        )
        try:
            grid = tuner.fit()
            stop.set()
            ticker.join(timeout=5)
            summary["stats"] = ray.get(coord.get_stats.remote())
        except (ray.exceptions.RayError, RuntimeError) as err:
            # Tune wraps some of Ray's errors (workers killed for memory) as RuntimeError("Caught unexpected ...")
            cause = err if isinstance(err, ray.exceptions.RayError) else err.__cause__
            if not isinstance(cause, ray.exceptions.RayError):
                raise
            hint = (" The node ran out of memory (this sweep's or another process's): lower resources.workers or "
                    "set resources.memory_gb_per_step." if isinstance(cause, ray.exceptions.OutOfMemoryError) else "")
            raise SweepStopped(f"Ray stopped the sweep ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})."
                               f"{hint} Every finished step and trial is in {uri}: rerun the same command to "
                               "resume") from None
        failed = [e for e in (grid[i].error for i in range(len(grid))) if e is not None]
        summary["errors"] = len(failed)
        summary["error_lines"] = error_lines(failed)
    finally:
        stop.set()
        ray.shutdown()
        try:  # steps cut short (Ctrl-C, an error) leave leases a restart would otherwise wait out
            store.release_leases(owner)
        except OSError as err:
            print(f"tscray: could not release this driver's step leases ({err}); they expire "
                  "within a minute", file=sys.stderr)
    _finish(tracker, uri, store, summary, out, {t.id for t in plan.trials})
    return summary


def report_sweep(store: Store, out: Path, fmt: str = "png", mlflow: bool = True, tracker: Any = None,
                 tsc_setting: tuple[int, float] | None = None, damaged: list[str] | None = None,
                 foreign: list[str] | None = None, info: dict[str, Any] | None = None, table: Any = None):
    """Write the sweep's report and log it (and the Parquet) to the sweep's MLflow parent run. Only trials the
    storage's recorded specs plan are reported: result files copied in from another sweep are named in
    ``foreign`` (their rows had been averaged into this sweep's cells).
    ``info`` and ``table``: the storage's ``sweep.json`` record and its planned trials' rows, when the caller
    has read them already (the end of a sweep), so they are not read and planned again."""
    from tscray import results, sweep_record
    from tscray.report import make_report

    notes = []
    try:
        info = sweep_record.read(store) if info is None else info
    except ValueError as err:
        # its spec may be lost with it: without MLflow (which needs its run), report every readable row
        if mlflow:
            raise ValueError(f"{err}; without MLflow (tscray report --no-mlflow) every readable result "
                             "file is reported") from None
        info = None
        notes.append(f"{err}. Every readable result file is reported, including any copied in from another "
                     "sweep")
    planned = sweep_record.planned_ids(info) if info is not None else None
    rows = (results.read(store, damaged, planned, foreign) if table is None else table).to_pandas()
    have = set(rows.trial_id) if not rows.empty else set()
    if info is not None and planned and have and len(have) < len(planned):
        current = sweep_record.current_ids(info)
        todo = current - have
        why = (f"the sweep is unfinished ({len(todo)} of the current spec's trials have none: run it again to "
               "resume)" if todo or not current else
               "the current spec's trials are all finished; the others were planned by earlier specs run on this "
               "storage (run those to finish them)")
        notes.append(f"{len(have)} of the {len(planned)} planned trials have results: {why}, so cells may hold "
                     "fewer seeds or settings than planned")
    name = info["spec"]["name"] if info is not None else Path(store.uri.rstrip("/")).name
    rep = make_report(rows, out, fmt, title=f"tscray sweep {name}", tsc_setting=tsc_setting, notes=notes)
    if mlflow and info is not None:
        if tracker is None:
            from tscray.tracking import Tracker, default_uri

            spec = info["spec"]
            tracker = Tracker(spec.get("mlflow_uri") or default_uri(store.uri), spec["name"], info["sweep_id"],
                              store.uri, spec)
        tracker.log_files([p for p in (*rep.figures, *rep.tables, rep.index) if p is not None], "report")
    return rep


def _finish(tracker: Any, uri: str, store: Store, summary: dict[str, Any], out: TextIO,
            trial_ids: set[str]) -> None:
    from tscray import results, sweep_record

    try:
        info: dict[str, Any] | None = sweep_record.read(store)
    except (ValueError, OSError):  # (damaged or gone since the start: every readable file)
        info = None
    # the rows of every recorded spec's trials, read once: for the summary, results.parquet and the report
    table = results.read(store, planned=sweep_record.planned_ids(info) if info is not None else None)
    summary["rows"] = table.num_rows
    # this spec's trials only: a storage may also hold other slices' or specs' results
    done = results.done_trials(store) & trial_ids
    summary["done"] = len(done)
    try:  # every recorded spec's trials in one file under one schema (the per-trial files differ in their axes)
        results.write_combined(store, table=table)
    except Exception as err:  # noqa: BLE001 - the trials' own files hold every row: this must not fail a sweep
        print(f"{results.COMBINED} not written: {err} (the rows are in results/)", file=out)
    if "://" not in uri:
        tracker.log_artifacts(str(Path(uri) / "results"), "results")
    if table.num_rows:
        try:
            local = Path(uri) / "report" if "://" not in uri else Path.cwd() / f"tscray-report-{summary['sweep_id']}"
            rep = report_sweep(store, local, tracker=tracker, info=info, table=table if info is not None else None)
            summary["figures"] = str(rep.index)
        except Exception as err:  # noqa: BLE001 - a failed plot must not fail a finished sweep
            print(f"report not written: {err} (run `tscray report {uri}`)", file=out)
    errors = summary.get("errors", 0)
    unrun = summary["trials"] - summary["done"] - errors  # a stop (Ctrl-C) before they ran
    tracker.close("FAILED" if errors else "KILLED" if unrun > 0 else "FINISHED")
    stats = summary.get("stats", {})
    print(f"\n{'stopped' if unrun > 0 else 'finished'}: {summary['done']}/{summary['trials']} trials have results "
          f"({table.num_rows} rows); "
          f"steps computed {stats.get('computed', 0)}, reused {stats.get('reused', 0)}"
          + (f", {stats['waited']} waited for another driver on this storage" if stats.get("waited") else "")
          + (f", {stats['repaired']} damaged and recomputed" if stats.get("repaired") else "")
          + (f"; {summary['errors']} trial(s) errored: run the same command again to retry (an error below that "
             "is not a lost worker or node will recur: fix its cause first)" if summary.get("errors") else "")
          + (f"; {unrun} trial(s) not run: run the same command again to resume" if unrun > 0 else ""), file=out)
    for n, line in summary.get("error_lines", []):
        print(f"  error   : {line}" + (f"  ({n} trials)" if n > 1 else ""), file=out)
    print(f"  Parquet : {summary['results']}  (pandas.read_parquet; one file per trial in results/)\n"
          f"  MLflow  : {summary['mlflow_uri']}  (mlflow ui --backend-store-uri {summary['mlflow_uri']})", file=out)
    if "figures" in summary:
        print(f"  Figures : {summary['figures']}", file=out)
    out.flush()
