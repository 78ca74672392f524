"""Sweep results: one Parquet row per evaluated model, one file per trial, rewritten whole.

A trial's file is replaced atomically each time the trial finishes, so retries and resumes never
duplicate rows. Trial files carry only the field axes that apply to them, so pandas reading the folder
takes the first file's columns (an axis missing from it is dropped, values of an axis' other type fail):
:func:`read` merges them, and :func:`write_combined` writes ``<storage>/results.parquet``, every row of
the storage's trials under one schema, at the end of each sweep run (``pandas.read_parquet`` opens it
whole). An unreadable file never hides the others: readers skip and name it, and
:func:`set_aside_damaged` moves it to ``<storage>/results-damaged/`` so its trial's rows are rebuilt from
the step manifests (the next run, or ``tscray verify --repair``).
"""

from __future__ import annotations

import io
import time
from typing import Any, Collection, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from tscray.plan import Trial
from tscray.store import Store

METRICS = ("acc", "asr", "clean_loss", "poison_loss", "knn_acc", "knn_asr")
BASE_FIELDS = [
    ("sweep", pa.string()), ("sweep_id", pa.string()), ("trial_id", pa.string()),
    ("dataset", pa.string()), ("method", pa.string()), ("arch", pa.string()), ("attack", pa.string()), ("poison_rate", pa.float64()),
    ("seed", pa.int64()), ("defense", pa.string()), ("e_tsc", pa.int64()), ("t", pa.float64()),
    ("round", pa.int64()), ("stage", pa.string()), ("t_curve", pa.float64()),
    ("acc", pa.float64()), ("asr", pa.float64()), ("clean_loss", pa.float64()), ("poison_loss", pa.float64()),
    ("knn_acc", pa.float64()), ("knn_asr", pa.float64()),
    ("step_kind", pa.string()), ("step_key", pa.string()), ("seconds", pa.float64()), ("device", pa.string()),
    ("precision", pa.string()), ("channels_last", pa.bool_()),
    ("defense_config", pa.string()), ("defense_seconds", pa.float64()),
]
_ARROW = {"int": pa.int64(), "float": pa.float64(), "string": pa.string()}


def defense_columns() -> dict[str, pa.DataType]:
    """The result columns the registered defenses declare (NC's flagged classes, FP's pruned units...)."""
    from tscray.defenses import DEFENSES

    out: dict[str, pa.DataType] = {}
    for d in DEFENSES.values():
        for name, kind in d.columns.items():
            out[name] = _ARROW[kind]
    return out


def schema() -> pa.Schema:
    """The result schema: the base columns, then every registered defense's own columns."""
    return pa.schema(BASE_FIELDS + sorted(defense_columns().items()))


def trial_rows(sweep: str, trial: Trial, manifests: dict[str, dict[str, Any]],
               sweep_id: str | None = None) -> list[dict[str, Any]]:
    """Rows of one trial from its steps' manifests, plus a ``final`` row for its output model.

    Every row carries the defense's resolved settings (``defense_config``, JSON) and the seconds its
    steps took (``defense_seconds``: every step after the backdoored model, shared ones counted whole)."""
    p = trial.params
    extra = list(defense_columns())
    seen: set[str] = set()
    spent = 0.0
    for stage in trial.chain:
        if stage.round >= 1 and stage.step.key not in seen:
            seen.add(stage.step.key)
            spent += float(manifests[stage.step.key]["seconds"])
    base = {"sweep": sweep, "sweep_id": sweep_id, "trial_id": trial.id, "dataset": p["dataset"],
            "method": p.get("method", "supervised"), "arch": p["arch"],
            "attack": p["attack"], "poison_rate": p["poison_rate"], "seed": p["seed"], "defense": p["defense"],
            "e_tsc": p.get("rounds"), "t": p.get("t"), "defense_config": trial.settings,
            "defense_seconds": spent if p["defense"] != "none" else None,
            **{k: _axis_value(v) for k, v in p.items() if "." in k}}  # field axes, under their dotted paths
    rows: list[dict[str, Any]] = []
    for stage in trial.chain:
        m = manifests[stage.step.key]
        for rec in m["records"]:
            rows.append({**base, "round": rec.get("round", stage.round), "stage": rec["stage"],
                         "t_curve": rec.get("t_curve"), **{k: rec.get(k) for k in METRICS},
                         **{k: rec[k] for k in extra if k in rec},
                         "step_kind": stage.step.kind, "step_key": stage.step.key, "seconds": m["seconds"],
                         "device": m["device"], "precision": m.get("precision"),
                         "channels_last": m.get("channels_last")})
    if not any(r["stage"] == "final" and r["step_key"] == trial.final.key for r in rows):
        rows.append({**final_record(trial, rows), "stage": "final"})
    return rows


def final_record(trial: Trial, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row that evaluates the trial's output model: the first of its final step's records whose
    stage comes first in the plan's preference order."""
    for want in trial.final.stages:
        for r in reversed(rows):
            if r["step_key"] == trial.final.key and r["stage"] == want:
                return dict(r)
    raise KeyError(f"trial {trial.id}: no record of its final model in step {trial.final.key}")


def _axis_value(v: Any) -> Any:
    """A field axis' value as a column holds it: scalars as they are, mappings, lists and null as JSON. A
    null cell is left for trials the axis does not apply to (it is absent from their params), so a null
    value (``curve_t_max: [null, 50]``) is the text ``null``, and such an axis reads as text."""
    import json

    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)


def _axis_type(v: Any) -> pa.DataType:
    # None is a null column, which reads as the other trials' type (an axis [null, 50] is int64 then)
    return (pa.null() if v is None else pa.bool_() if isinstance(v, bool) else pa.int64() if isinstance(v, int)
            else pa.float64() if isinstance(v, float) else pa.string())


def _concat(tables: list[pa.Table]) -> pa.Table:
    """The tables as one: missing columns read as nulls and numbers as the wider type; an axis whose trials
    hold values of unrelated types (a number in one, text in another: ``[auto, 50]``) is read as text."""
    types: dict[str, set[pa.DataType]] = {}
    for t in tables:
        for f in t.schema:
            if "." in f.name and not pa.types.is_null(f.type):
                types.setdefault(f.name, set()).add(f.type)
    mixed = {c for c, ts in types.items()
             if len(ts) > 1 and not all(pa.types.is_integer(x) or pa.types.is_floating(x) for x in ts)}
    if mixed:
        tables = [t.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in mixed else f for f in t.schema]))
                  for t in tables]
    return pa.concat_tables(tables, promote_options="permissive")


def write_trial(store: Store, trial_id: str, rows: list[dict[str, Any]]) -> None:
    """Atomically replace the trial's Parquet file (the schema's columns, then the trial's field axes)."""
    axes = [(k, _axis_type(v)) for k, v in rows[0].items() if "." in k] if rows else []
    table = pa.Table.from_pylist(rows, schema=pa.schema(list(schema()) + axes))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(f"results/trial-{trial_id}.parquet", buf.getvalue())


DAMAGED_DIR = "results-damaged"


def _names(store: Store) -> list[str]:
    return [n for n in store.files("results") if n.endswith(".parquet")]


def _trial_id(name: str) -> str:
    return name[len("trial-"):-len(".parquet")]


def _parquet(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's table from its bytes. The reader's last reference can be dropped by a task on pyarrow's
    thread pool after the call returns; when it wrapped Python bytes, a release during interpreter shutdown
    needs the GIL and aborts the process ("terminate called without an active exception", exit 134:
    `tscray status` about one run in eight). The bytes are copied into arrow's memory first."""
    buf = pa.allocate_buffer(len(data))  # arrow's own memory: no Python object for a late release to touch
    memoryview(buf).cast("B")[:] = data
    return pq.read_table(pa.BufferReader(buf), columns=columns, pre_buffer=False, use_threads=False)


# what every result file has had since the first tscray: without them rows cannot be told apart or placed
REQUIRED = ("trial_id", "defense", "attack", "seed", "round", "stage", "acc", "asr", "step_key")


def _read_file(store: Store, name: str) -> pa.Table:
    """A trial's rows. A file missing a core column, or holding rows of another trial than its name says (a
    copy such as ``trial-<id> (1).parquet``), is damaged: read as it stands, it counted a trial twice or
    read a missing ASR as no value."""
    raw = _parquet(store.read_bytes(f"results/{name}"))
    missing = [c for c in REQUIRED if c not in raw.column_names]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)}")
    if raw.num_rows == 0:
        raise ValueError("no rows")
    ids = set(raw.column("trial_id").to_pylist())
    if ids != {_trial_id(name)}:
        raise ValueError(f"rows of trial(s) {', '.join(sorted(map(str, ids)))[:80]} in the file of trial {_trial_id(name)}")
    return _conform(raw)


def done_trials(store: Store, check: bool = False) -> set[str]:
    """Ids of trials whose results are written (``check``: and readable)."""
    names = _names(store)
    if check:
        bad = set(damaged(store))
        names = [n for n in names if f"results/{n}" not in bad]
    return {_trial_id(n) for n in names}


def finished_steps(store: Store) -> dict[str, frozenset[str]]:
    """For each trial with a readable results file, the step keys its rows came from. A trial is finished
    for a plan only if its planned final step is among them (:func:`is_finished`): trial ids name grid
    points, and a file written under other settings holds another spec's numbers."""
    out: dict[str, frozenset[str]] = {}
    for name in _names(store):
        keys = _step_keys(store, name)
        if keys is not None:  # (unreadable: not finished; set_aside_damaged's business)
            out[_trial_id(name)] = keys
    return out


def _step_keys(store: Store, name: str) -> frozenset[str] | None:
    """The step keys of the rows of ``results/name``; None if it is damaged (:func:`_read_file`'s rule, which
    every reader shares: a dry run counted a copied or incomplete file as a finished trial)."""
    try:
        keys = _read_file(store, name)
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    return frozenset(keys.column("step_key").to_pylist())


def is_finished(done: Mapping[str, Collection[str]] | Collection[str], trial: Any) -> bool:
    """Whether planned ``trial`` is finished: by id when ``done`` is a set of ids (:func:`done_trials`), and
    by id and final step when it maps ids to their rows' step keys (:func:`finished_steps`)."""
    if isinstance(done, Mapping):
        keys = done.get(trial.id)
        return keys is not None and trial.final.key in keys
    return trial.id in done


def damaged(store: Store) -> list[str]:
    """Result files that cannot be read as this sweep's rows."""
    bad: list[str] = []
    read(store, bad)
    return bad


def read(store: Store, damaged: list[str] | None = None, planned: Collection[str] | None = None,
         foreign: list[str] | None = None) -> pa.Table:
    """All readable result rows of a sweep (an empty table with the schema when there are none); the
    paths of unreadable files are appended to ``damaged``. With ``planned`` (the trial ids the storage's
    recorded specs plan), readable files of other trials (copied in from another sweep) are left out and their
    paths appended to ``foreign``."""
    tables = []
    for n in _names(store):
        try:
            table = _read_file(store, n)
        except (OSError, ValueError, KeyError, pa.ArrowException):
            if damaged is not None:
                damaged.append(f"results/{n}")
            continue
        # (damage first: a copy 'trial-<id> (1).parquet' is damaged for every command, not foreign for some)
        if planned is not None and _trial_id(n) not in planned:
            if foreign is not None:
                foreign.append(f"results/{n}")
            continue
        tables.append(table)
    # trials of different field-axis values or blocks may carry different axis columns and types
    return _concat(tables) if tables else schema().empty_table()


COMBINED = "results.parquet"


def write_combined(store: Store, planned: Collection[str] | None = None, table: pa.Table | None = None) -> int:
    """Write :data:`COMBINED`: the rows of the storage's trials (``table`` as :func:`read` gave it, else read
    now: those ``planned``, every readable file without) as one file under one schema, atomically. Returns
    its row count."""
    table = read(store, planned=planned) if table is None else table
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(COMBINED, buf.getvalue())
    return table.num_rows


def set_aside_damaged(store: Store) -> list[str]:
    """Move unreadable result files to ``results-damaged/`` (their trials then count as not done, and rerun
    from the stored steps); returns the trial ids moved."""
    moved = []
    for rel in damaged(store):
        name = rel.split("/", 1)[1]
        _move_aside(store, name, DAMAGED_DIR)
        moved.append(_trial_id(name))
    return moved


def _move_aside(store: Store, name: str, folder: str) -> None:
    """Move ``results/name`` into ``folder``, time-stamped."""
    store.fs.create_dir(store.path(folder), recursive=True)
    store.fs.move(store.path(f"results/{name}"), store.path(f"{folder}/{name}.{time.strftime('%Y%m%d-%H%M%S')}"))


STALE_DIR = "results-stale"


def set_aside_stale(store: Store, trials: Iterable[Any]) -> list[str]:
    """Move the result files of ``trials`` (planned :class:`~tscray.plan.Trial`) that ran with other settings to
    ``results-stale/``; returns their ids. Trial ids name grid points only: a file without a row of the trial's
    planned final step (the same point with another ``curve_epochs``, say) holds another spec's numbers. Moved
    before the sweep starts, they never pass for this spec's, even if it stops before the trial runs again."""
    names = set(_names(store))
    moved = []
    for t in trials:
        name = f"trial-{t.id}.parquet"
        if name not in names:
            continue
        keys = _step_keys(store, name)
        if keys is not None and t.final.key not in keys:  # (unreadable: set_aside_damaged's business)
            _move_aside(store, name, STALE_DIR)
            moved.append(t.id)
    return moved


def _conform(table: pa.Table) -> pa.Table:
    """Files written by an older tscray may lack newer columns: add them as nulls, in schema order."""
    target = pa.schema(list(schema()) + [f for f in table.schema if "." in f.name])  # + its field axes
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in target]
    return pa.Table.from_arrays(cols, schema=target)
