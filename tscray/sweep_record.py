"""``sweep.json``: what a storage records of the specs that ran on it.

A study is often run in slices (copies of one spec with fewer grid values, same name and settings, so the same
trial ids) or grown by editing its grid. Each run writes its own spec as ``spec``; the specs that ran before stay
in ``history``, so ``tscray status`` counts, and ``tscray verify --repair`` rebuilds, every trial the storage
holds rather than only the last slice's.
"""

from __future__ import annotations

import json
from typing import Any

from tscray.config import SpecError, SweepSpec, validate
from tscray.plan import Plan, Trial, make_plan
from tscray.store import Store

NAME = "sweep.json"
HISTORY_MAX = 200  # earlier specs kept; a storage that saw more has been reused for unrelated work


def write(store: Store, spec: SweepSpec, sid: str, plan: Plan) -> None:
    """Record ``spec`` as the storage's current spec, keeping the earlier ones (an unreadable old record is
    replaced: it holds nothing the results and steps do not)."""
    entry = spec.to_dict()
    history: list[dict[str, Any]] = []
    if store.exists(NAME):
        try:
            old = store.read_json(NAME)
            history = [h for h in old.get("history", []) if isinstance(h, dict)]
            if isinstance(old.get("spec"), dict):
                history.append(old["spec"])
        except (ValueError, UnicodeDecodeError, AttributeError):
            history = []
    seen, kept = {_canonical(entry)}, []
    for h in reversed(history):  # newest first, so the cap drops the oldest
        c = _canonical(h)
        if c not in seen:
            seen.add(c)
            kept.append(h)
    store.write_json(NAME, {"spec": entry, "sweep_id": sid, "trials": len(plan.trials), "steps": len(plan.steps),
                            "history": list(reversed(kept[:HISTORY_MAX]))})


def read(store: Store) -> dict[str, Any]:
    """The record, or one line naming it when it is unreadable."""
    try:
        info = store.read_json(NAME)
        info["spec"]["name"], info["sweep_id"], info["trials"], info["steps"]  # noqa: B018 (the fields every command reads)
        return info
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{store.path(NAME)} is damaged ({type(err).__name__}); rerun the sweep's "
                         f"spec on this storage to rewrite it") from None


def plans(info: dict[str, Any]) -> list[Plan]:
    """The plans of the current spec and the earlier ones, newest first. A recorded spec this tscray no longer
    accepts is skipped."""
    out = [_plan(raw) for raw in [info.get("spec")] + list(reversed(info.get("history", [])))]
    return [p for p in out if p is not None]


def current_ids(info: dict[str, Any]) -> set[str]:
    """The ids of the current spec's trials (those a rerun of the last spec run here finishes); empty when
    this tscray does not read it."""
    plan = _plan(info.get("spec"))
    return {t.id for t in plan.trials} if plan is not None else set()


def _plan(raw: Any) -> Plan | None:
    if not isinstance(raw, dict):
        return None
    raw = dict(raw)
    if raw.get("train", {}).get("method", "supervised") == "supervised":
        raw.pop("ssl", None)  # to_dict() writes the (unused) SSL defaults, which validation refuses here
    try:
        return make_plan(validate(raw, NAME, check_data=False))
    except (SpecError, ValueError, KeyError, TypeError):
        return None


def planned_ids(info: dict[str, Any]) -> set[str] | None:
    """The ids of every recorded spec's trials; None when no recorded spec is one this tscray reads (then a
    reader cannot tell this storage's result files from copied-in ones, and takes them all)."""
    return set(trials(info)) or None


def trials(info: dict[str, Any]) -> dict[str, Trial]:
    """Every recorded spec's trials by id; where specs share an id, the newest spec's trial."""
    found: dict[str, Trial] = {}
    for plan in plans(info):
        for t in plan.trials:
            found.setdefault(t.id, t)
    return found


def _canonical(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)
