"""Checking a sweep's store whole (``tscray verify DIR [--repair]``): every step's artifacts against the sizes
and SHA-256 hashes their manifests recorded, every result file readable.

Repair moves damaged steps to ``quarantine/`` (the next run recomputes them; their dependents keep their
own verified artifacts) and unreadable result files to ``results-damaged/``, then rebuilds those trials'
rows from the step manifests when all their steps are intact (else the next run does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tscray import results, sweep_record
from tscray.store import Store


@dataclass
class VerifyReport:
    """What ``verify_store`` found and did."""

    steps: int = 0
    damaged_steps: dict[str, str] = field(default_factory=dict)  # "kind/key" -> why
    incomplete: list[str] = field(default_factory=list)  # step folders without a manifest (interrupted writes)
    result_files: int = 0
    damaged_results: list[str] = field(default_factory=list)
    missing_results: list[str] = field(default_factory=list)  # trial ids with every step stored but no rows
    quarantined: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)  # trial ids whose rows were rebuilt
    to_rerun: list[str] = field(default_factory=list)  # trial ids the next run must finish
    unplanned: list[str] = field(default_factory=list)  # set-aside files of no trial a recorded spec plans
    record_problem: str | None = None  # sweep.json unreadable: status, report and row rebuilds need it

    @property
    def clean(self) -> bool:
        return (not self.damaged_steps and not self.damaged_results and not self.missing_results
                and self.record_problem is None)

    def lines(self) -> list[str]:
        out = [f"steps  : {self.steps} checked, {len(self.damaged_steps)} damaged"
               + (f", {len(self.incomplete)} interrupted writes (no manifest; harmless)" if self.incomplete else ""),
               f"results: {self.result_files} files, {len(self.damaged_results)} unreadable"
               + (f", {len(self.missing_results)} missing (trials with every step stored but no result file: "
                  "--repair rebuilds their rows)" if self.missing_results else "")]
        out += [f"  damaged step {k}: {why}" for k, why in sorted(self.damaged_steps.items())]
        out += [f"  unreadable result file {p}" for p in self.damaged_results]
        if self.record_problem:
            out.append(f"record : {self.record_problem}")
        if self.quarantined:
            out.append(f"moved {len(self.quarantined)} damaged step(s) to quarantine/: the next run recomputes them")
        if self.rebuilt:
            out.append(f"rebuilt the rows of {len(self.rebuilt)} trial(s) from their step manifests")
        if self.unplanned:
            out.append(f"set aside {len(self.unplanned)} result file(s) of no trial a recorded spec plans (a copy, or "
                       f"another sweep's) in {results.DAMAGED_DIR}/: {', '.join(self.unplanned[:5])}"
                       + (" ..." if len(self.unplanned) > 5 else ""))
        if self.to_rerun:
            out.append(f"{len(self.to_rerun)} trial(s) need a rerun of the sweep to finish: {', '.join(self.to_rerun[:5])}"
                       + (" ..." if len(self.to_rerun) > 5 else ""))
        return out


def verify_store(store: Store, repair: bool = False, deep: bool = True) -> VerifyReport:
    """Check (and with ``repair`` fix) a sweep store; ``deep=False`` checks sizes only, not hashes."""
    rep = VerifyReport()
    intact: set[tuple[str, str]] = set()
    for kind in store.subdirs("steps"):
        for key in store.subdirs(f"steps/{kind}"):
            if not store.has_step(kind, key):
                rep.incomplete.append(f"{kind}/{key}")
                continue
            rep.steps += 1
            problem = store.check_step(kind, key, deep=deep)
            if problem is not None:
                rep.damaged_steps[f"{kind}/{key}"] = problem
            else:
                intact.add((kind, key))
    bad: list[str] = []
    results.read(store, bad)
    rep.result_files = len([n for n in store.files("results") if n.endswith(".parquet")])
    rep.damaged_results = bad
    info: dict[str, Any] | None = None
    trials: dict[str, Any] = {}  # every spec that ran here: a slice's record knows the others' trials
    if store.exists(sweep_record.NAME):  # (the CLI refuses a folder without one before this)
        try:
            info = sweep_record.read(store)
        except ValueError as err:
            rep.record_problem = str(err)
        else:
            trials = sweep_record.trials(info)
            # (a trial with an unreadable file is damaged, not missing)
            rep.missing_results = _missing_rows(trials, results.done_trials(store), intact)
    if not repair:
        return rep
    for name, why in rep.damaged_steps.items():
        kind, key = name.split("/", 1)
        rep.quarantined.append(store.quarantine_step(kind, key, why))
    moved = results.set_aside_damaged(store)
    if moved or rep.missing_results:
        _rebuild(store, moved + rep.missing_results, rep, info, trials)
    return rep


def _missing_rows(trials: dict[str, Any], done: set[str], intact: set[tuple[str, str]]) -> list[str]:
    """Trials a recorded spec plans that have no result file although every step of theirs is stored
    intact: their file was deleted or lost (a finished trial writes it right after its last step)."""
    return sorted(tid for tid, trial in trials.items()
                  if tid not in done and {(s.step.kind, s.step.key) for s in trial.chain} <= intact)


def _rebuild(store: Store, trial_ids: list[str], rep: VerifyReport, info: dict[str, Any] | None,
             trials: dict[str, Any]) -> None:
    """Write the rows of ``trial_ids`` again from their steps' manifests (as a finished trial would)."""
    if info is None:
        rep.to_rerun.extend(trial_ids)
        return
    for tid in trial_ids:
        trial = trials.get(tid)
        if trial is None:  # no rerun writes it: e.g. 'trial-<id> (1).parquet'
            rep.unplanned.append(tid)
            continue
        manifests: dict[str, dict[str, Any]] = {}
        ok = trial is not None
        for stage in trial.chain if trial is not None else ():
            if stage.step.key in manifests:
                continue
            if not store.has_step(stage.step.kind, stage.step.key) or \
                    store.check_step(stage.step.kind, stage.step.key, deep=False) is not None:
                ok = False
                break
            manifests[stage.step.key] = store.manifest(stage.step.kind, stage.step.key)
        rows = None
        if ok and trial is not None:
            try:
                rows = results.trial_rows(info["spec"]["name"], trial, manifests, info.get("sweep_id"))
            except KeyError:  # the final step's manifest lacks its model's record: damaged, so the rerun redoes it
                kind, why = next(st.step.kind for st in trial.chain if st.step.key == trial.final.key), \
                    "manifest.json holds no record of its model"
                rep.damaged_steps[f"{kind}/{trial.final.key}"] = why
                rep.quarantined.append(store.quarantine_step(kind, trial.final.key, why))
        if rows is not None:
            results.write_trial(store, tid, rows)
            rep.rebuilt.append(tid)
        else:
            rep.to_rerun.append(tid)
