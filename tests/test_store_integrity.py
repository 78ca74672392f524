"""A damaged store (issue 14, rows 7-8): truncated, altered or deleted step artifacts and unreadable result
files are detected, named, set aside and recomputed or rebuilt; nothing else is lost or recomputed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from tscray import results
from tscray.cli import main
from tscray.config import validate
from tscray.plan import make_plan
from tscray.steps import Context, run_local
from tscray.store import CorruptArtifact, Store
from tscray.verify import verify_store

STATE = {"w": torch.arange(12.0).reshape(3, 4), "n": torch.tensor(7)}


def damage(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "flipped":  # same size, one byte of the tensor data changed
        path.write_bytes(blob[:-3] + bytes([blob[-3] ^ 0xFF]) + blob[-2:])
    elif how == "deleted":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00" * len(blob))


@pytest.mark.parametrize("kind", ["local", "object"])
def test_manifests_record_size_and_hash_and_loads_check_them(tmp_path, kind):
    store = Store(str(tmp_path / "s")) if kind == "local" else Store("bucket/s", pafs._MockFileSystem())
    m = store.put_step("backdoor", "k", {"model": STATE}, {"records": []})
    assert m["files"]["model"]["bytes"] > 0 and len(m["files"]["model"]["sha256"]) == 64
    assert store.check_step("backdoor", "k") is None
    rel = "steps/backdoor/k/model.safetensors"
    blob = store.read_bytes(rel)
    store.write_bytes(rel, blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:])
    with pytest.raises(CorruptArtifact, match=r"model\.safetensors does not match the SHA-256"):
        store.load_tensors("backdoor", "k", "model")
    assert "SHA-256" in store.check_step("backdoor", "k")
    assert store.check_step("backdoor", "k", deep=False) is None  # same size: only the hash tells


@pytest.mark.parametrize("how, message", [("truncated", "bytes, its manifest recorded"),
                                          ("deleted", "is missing"), ("flipped", "SHA-256")])
def test_every_kind_of_damage_is_named(tmp_path, how, message):
    store = Store(str(tmp_path))
    store.put_step("tsc_round", "k", {"point": STATE}, {"records": []})
    damage(tmp_path / "steps/tsc_round/k/point.safetensors", how)
    assert message in store.check_step("tsc_round", "k")
    with pytest.raises(CorruptArtifact, match=message if how != "truncated" else "bytes"):
        store.load_tensors("tsc_round", "k", "point")


def test_a_manifest_that_is_not_json_is_damage_not_a_traceback(tmp_path):
    store = Store(str(tmp_path))
    store.put_step("backdoor", "k", {"model": STATE}, {"records": []})
    (tmp_path / "steps/backdoor/k/manifest.json").write_text("{not json")
    assert store.check_step("backdoor", "k") == "manifest.json is not valid JSON"


@pytest.mark.parametrize("files", [[], {"model": 5}, "x"])
def test_a_manifest_with_a_malformed_file_table_is_damage_not_a_traceback(tmp_path, files):
    """`files` not a mapping of mappings raised AttributeError out of check_step: verify ended in a traceback
    and the coordinator could neither reuse nor quarantine the step."""
    store = Store(str(tmp_path))
    store.put_step("backdoor", "k", {"model": STATE}, {"records": []})
    path = tmp_path / "steps/backdoor/k/manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "files": files}))
    assert store.check_step("backdoor", "k") == "manifest.json has a malformed artifact list or file table"


def test_a_step_stored_intact_is_not_written_over(tmp_path):
    """When two drivers computed one step (a lapsed lease, an object store's race), the second wrote its bytes
    over the first's while the first's manifest stood: a reader saw one driver's manifest over the other's
    artifact (a hash mismatch, and the step quarantined under the driver about to write its manifest)."""
    store = Store(str(tmp_path))
    first = store.put_step("backdoor", "k", {"model": STATE}, {"records": [{"stage": "a"}]})
    blob = (tmp_path / "steps/backdoor/k/model.safetensors").read_bytes()
    second = store.put_step("backdoor", "k", {"model": {"w": torch.ones(3)}}, {"records": [{"stage": "b"}]})
    assert second == first and (tmp_path / "steps/backdoor/k/model.safetensors").read_bytes() == blob
    assert store.check_step("backdoor", "k") is None


def test_legacy_manifests_without_hashes_are_checked_by_parsing(tmp_path):
    store = Store(str(tmp_path))
    store.put_step("backdoor", "k", {"model": STATE}, {"records": []})
    mpath = tmp_path / "steps/backdoor/k/manifest.json"
    manifest = json.loads(mpath.read_text())
    del manifest["files"]
    mpath.write_text(json.dumps(manifest))
    assert store.check_step("backdoor", "k") is None
    damage(tmp_path / "steps/backdoor/k/model.safetensors", "garbage")
    assert "not a readable safetensors file" in store.check_step("backdoor", "k")


def tiny_spec(storage: Path) -> dict:
    return {"name": "dmg", "storage": str(storage),
            "grid": {"defense": ["tsc", "none"], "rounds": [1], "t": [0.5]},
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.05, "arch_kw": {"widths": [8, 8, 8, 8]}},
            "defense": {"clean_ratio": 0.02, "tsc": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100}}}


def run_all(store: Store, raw: dict) -> list:
    """What a sweep does, without Ray: compute every trial's steps, write its rows."""
    spec = validate(raw)
    plan = make_plan(spec)
    store.write_json("sweep.json", {"spec": spec.to_dict(), "sweep_id": "x", "trials": len(plan.trials),
                                    "steps": len(plan.steps)})
    ctx = Context(store)
    for trial in plan.trials:
        manifests = run_local(trial.steps, ctx)
        results.write_trial(store, trial.id, results.trial_rows(spec.name, trial, manifests, "x"))
    return plan.trials


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finished")
    trials = run_all(Store(str(root)), tiny_spec(root))
    return root, trials


def copy_store(src: Path, dst: Path) -> Store:
    import shutil

    shutil.copytree(src, dst)
    return Store(str(dst))


@pytest.mark.parametrize("how", ["truncated", "flipped", "deleted"])
def test_a_damaged_step_is_set_aside_and_recomputed_bitwise_equal_alone(finished, tmp_path, how):
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    tsc = next(t for t in trials if t.params["defense"] == "tsc")
    victim = next(s for s in tsc.steps if s.key == tsc.final.key)  # the step of the trial's output model
    artifact = tsc.final.artifact
    good = store.load_tensors(victim.kind, victim.key, artifact)
    before = dict(store.computations())
    damage(tmp_path / "s" / "steps" / victim.kind / victim.key / f"{artifact}.safetensors", how)

    run_local(tsc.steps, Context(store))
    after = store.computations()
    assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)} == {victim.key: 1}
    again = store.load_tensors(victim.kind, victim.key, artifact)
    assert all(torch.equal(again[k], v) for k, v in good.items())
    quarantined = list((tmp_path / "s" / "quarantine" / victim.kind).iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(victim.key)
    assert json.loads((quarantined[0] / "why.json").read_text())["why"]


def test_verify_finds_damage_and_repair_makes_the_next_run_recompute_only_it(finished, tmp_path, capsys):
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    bd = trials[0].steps[0]
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert "store is intact" in capsys.readouterr().out
    damage(tmp_path / "s" / "steps" / bd.kind / bd.key / "model.safetensors", "flipped")
    assert main(["verify", str(tmp_path / "s"), "--quick"]) == 0  # sizes only: a flipped byte passes
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert f"damaged step backdoor/{bd.key}: model.safetensors does not match the SHA-256" in out
    assert main(["status", str(tmp_path / "s")]) == 0
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    assert "moved 1 damaged step(s) to quarantine/" in capsys.readouterr().out
    assert not store.has_step(bd.kind, bd.key)
    before = dict(store.computations())
    run_local(trials[0].steps, Context(store))
    assert {k for k, n in store.computations().items() if n != before.get(k, 0)} == {bd.key}


def test_an_unreadable_result_file_hides_no_rows_and_is_rebuilt_from_the_manifests(finished, tmp_path, capsys):
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    good = results.read(store).to_pandas()
    victim = tmp_path / "s" / "results" / f"trial-{trials[0].id}.parquet"
    expected = pq.read_table(victim).to_pandas()
    damage(victim, "truncated")

    bad: list[str] = []
    table = results.read(store, bad)  # one bad file never hides the others
    assert bad == [f"results/trial-{trials[0].id}.parquet"]
    assert table.num_rows == len(good) - len(expected)
    assert main(["results", str(tmp_path / "s")]) == 0
    assert "skipped 1 unreadable result file(s)" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "s")]) == 0
    assert f"trials: {len(trials) - 1}/{len(trials)} finished (1 unreadable" in capsys.readouterr().out

    before = dict(store.computations())
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    assert "rebuilt the rows of 1 trial(s)" in capsys.readouterr().out
    assert store.computations() == before  # rebuilt, nothing recomputed
    rebuilt = pq.read_table(victim).to_pandas()
    assert rebuilt.drop(columns=[]).equals(expected)
    assert len(list((tmp_path / "s" / results.DAMAGED_DIR).iterdir())) == 1
    import pandas as pd
    assert len(pd.read_parquet(tmp_path / "s" / "results")) == len(good)  # pandas reads the folder again


def test_set_aside_moves_only_unreadable_files(tmp_path):
    store = Store(str(tmp_path))
    buf = io.BytesIO()
    pq.write_table(pa.table({c: ["a" if c == "trial_id" else None] for c in results.REQUIRED}), buf)
    store.write_bytes("results/trial-a.parquet", buf.getvalue())
    store.write_bytes("results/trial-b.parquet", b"PAR1 not really")
    store.write_bytes("results/trial-c.parquet", b"")
    assert sorted(results.set_aside_damaged(store)) == ["b", "c"]
    assert results.done_trials(store) == {"a"}


def test_verify_refuses_a_folder_that_is_no_sweep(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a tscray sweep directory" in capsys.readouterr().err
    report = verify_store(Store(str(tmp_path)))
    assert report.clean and report.steps == 0


@pytest.mark.parametrize("content", [b'{"spec": ', b"[1, 2]", b'{"spec": {"name": "s"}}'])
def test_a_damaged_sweep_json_is_named_by_verify_report_and_status(finished, tmp_path, capsys, content):
    """verify used to call a store with an unreadable sweep.json intact, and report failed with a bare JSON
    error (truncated file) or a traceback (valid JSON of the wrong shape)."""
    src, _ = finished
    copy_store(src, tmp_path / "s")
    (tmp_path / "s" / "sweep.json").write_bytes(content)
    for argv, rc in ((["verify"], 1), (["verify", "--repair"], 1), (["status"], 2),
                     (["report", "--out", str(tmp_path / "r")], 2)):
        assert main([argv[0], str(tmp_path / "s"), *argv[1:]]) == rc, argv
        out = capsys.readouterr()
        assert "sweep.json is damaged" in out.out + out.err and "Traceback" not in out.err, argv
    assert not (tmp_path / "r").exists()
    # the spec may be lost with it: without MLflow the rows are still reported, the damage named
    assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert "note: " in out.err and "sweep.json is damaged" in out.err and "Every readable result file" in out.err
    index = (tmp_path / "r" / "index.html").read_text()
    assert "tscray sweep s" in index and "sweep.json is damaged" in index


def test_report_out_refuses_a_folder_of_the_users_own_files_and_rewrites_its_own(finished, tmp_path, capsys):
    """`tscray report --out site` replaced the user's index.html and table1.csv without a word (and --out
    naming the storage itself wrote the report among sweep.json and results/)."""
    src, _ = finished
    copy_store(src, tmp_path / "s")
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>my site</h1>")
    (site / "table1.csv").write_text("my,data\n")
    for out in (site, tmp_path / "s"):
        assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(out)]) == 2
        assert "holds files that are not a tscray report" in capsys.readouterr().err
    assert (site / "index.html").read_text() == "<h1>my site</h1>" and (site / "table1.csv").read_text() == "my,data\n"
    assert not (tmp_path / "s" / "index.html").exists()
    rep = tmp_path / "rep"
    for _ in range(2):  # a new folder, then the same report's folder again
        assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(rep)]) == 0
    (rep / "stale.png").write_bytes(b"")
    assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(rep)]) == 0  # (still a report's)


def test_a_slice_run_on_the_storage_keeps_the_other_trials_rebuildable_and_counted(finished, tmp_path, capsys):
    """A study run in slices (same name and settings, fewer grid values) used to leave only the last slice's
    spec in sweep.json: `tscray status` then counted that slice's trials as the whole sweep (2/1 finished), and
    `verify --repair` could not rebuild a damaged result file of a trial outside the slice (it asked for a rerun
    the slice would never do)."""
    from tscray import sweep_record

    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    raw = tiny_spec(tmp_path / "s")
    raw["grid"] = {**raw["grid"], "defense": ["none"]}  # the slice: the undefended trial only
    spec = validate(raw)
    sweep_record.write(store, spec, "x", make_plan(spec))
    assert main(["status", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"trials: {len(trials)}/{len(trials)} finished" in out and "2 specs ran on it" in out
    tsc = next(t for t in trials if t.params["defense"] == "tsc")
    victim = tmp_path / "s" / "results" / f"trial-{tsc.id}.parquet"
    expected = pq.read_table(victim).to_pandas()
    damage(victim, "truncated")
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    assert "rebuilt the rows of 1 trial(s)" in capsys.readouterr().out
    assert pq.read_table(victim).to_pandas().equals(expected)


def test_import_steps_copies_verified_steps_once_and_skips_damaged_ones(tmp_path, capsys):
    src = Store(str(tmp_path / "src"))
    src.put_step("backdoor", "good", {"model": STATE}, {"records": []})
    src.put_step("tsc_round", "bad", {"model": STATE}, {"records": []})
    damage(tmp_path / "src/steps/tsc_round/bad/model.safetensors", "flipped")  # same size: only the hash tells
    assert main(["import-steps", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    cap = capsys.readouterr()
    assert "copied 1 step(s)" in cap.out and "(backdoor 1)" in cap.out and "1 damaged in the source" in cap.out
    assert "not copied: tsc_round/bad: model.safetensors does not match the SHA-256" in cap.err
    dst = Store(str(tmp_path / "dst"))
    assert dst.step_keys() == {"backdoor": ["good"]}
    assert all(torch.equal(dst.load_tensors("backdoor", "good", "model")[k], v) for k, v in STATE.items())
    assert dst.manifest("backdoor", "good") == src.manifest("backdoor", "good")
    assert not (tmp_path / "dst/steps/tsc_round/bad").exists()  # nothing of a damaged step is written
    assert main(["import-steps", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    assert "copied 0 step(s) into" in (out := capsys.readouterr().out) and "; 1 already there" in out
    assert main(["import-steps", str(tmp_path / "empty"), str(tmp_path / "dst")]) == 2
    assert "no stored steps" in capsys.readouterr().err


def test_import_steps_with_a_spec_copies_only_that_sweeps_steps_and_its_run_then_computes_nothing(
        finished, tmp_path, capsys):
    src, trials = finished
    raw = tiny_spec(tmp_path / "new")
    raw["grid"] = {**raw["grid"], "defense": ["none"]}  # a new sweep needing only the backdoored model
    spec_file = tmp_path / "slice.yaml"
    import yaml
    spec_file.write_text(yaml.safe_dump(raw))
    assert main(["import-steps", str(src), str(tmp_path / "new"), "--spec", str(spec_file)]) == 0
    assert "copied 1 step(s)" in capsys.readouterr().out
    new = Store(str(tmp_path / "new"))
    plan = make_plan(validate(raw))
    assert {k: set(v) for k, v in new.step_keys().items()} == {"backdoor": {s.key for s in plan.steps.values()}}
    before = dict(new.computations())
    run_local(plan.trials[0].steps, Context(new))
    assert new.computations() == before  # the imported model was reused, not trained again



def test_stray_files_among_steps_and_a_folder_among_results_are_ignored(finished, tmp_path, capsys):
    """A desktop's `steps/.DS_Store` stopped status, verify and import-steps ('Cannot list directory'); a folder
    named `results/x.parquet` made verify --repair ask for a rerun of a trial with an empty id."""
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    (tmp_path / "s" / "steps" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "s" / "results" / "x.parquet").mkdir()
    assert main(["status", str(tmp_path / "s")]) == 0
    assert f"trials: {len(trials)}/{len(trials)} finished" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    assert "store is intact" in capsys.readouterr().out
    assert main(["import-steps", str(tmp_path / "s"), str(tmp_path / "t")]) == 0
    assert Store(str(tmp_path / "t")).step_keys() == store.step_keys()


def test_results_with_a_stage_the_rows_do_not_have_names_the_stages(finished, capsys):
    """`tscray results DIR --stage FINAL` printed 'no result rows yet' and exited 0 on a storage full of rows."""
    src, _ = finished
    assert main(["results", str(src), "--stage", "FINAL"]) == 2
    err = capsys.readouterr().err
    assert "no rows of stage 'FINAL'" in err and "final" in err and "stage2" in err
    assert main(["results", str(src), "--stage", "stage2"]) == 0


def test_status_counts_only_planned_trials_and_names_foreign_result_files(finished, tmp_path, capsys):
    """A result file copied in from another sweep read as 'trials: 2/1 finished'."""
    src, trials = finished
    copy_store(src, tmp_path / "s")
    results.write_trial(Store(str(tmp_path / "s")), "0123456789ab", [{"sweep": "other", "trial_id": "0123456789ab",
                                                                      "stage": "final", "acc": 1.0, "asr": 1.0}])
    assert main(["status", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"trials: {len(trials)}/{len(trials)} finished; 1 result file(s) of trials no recorded spec plans" in out


def test_a_copied_or_incomplete_result_file_is_damage_not_rows_counted_again(finished, tmp_path, capsys):
    """A copy of a trial's file ('trial-<id> (1).parquet', as a file manager names it) was read as more rows of
    that trial: the report averaged it in twice. A file missing a core column read it as nulls: a trial without
    its ASR still counted as a run. Both are damaged files now: skipped, named, and set aside by --repair."""
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    good = results.read(store).to_pandas()
    folder = tmp_path / "s" / "results"
    victim = folder / f"trial-{trials[0].id}.parquet"
    (folder / f"trial-{trials[0].id} (1).parquet").write_bytes(victim.read_bytes())
    other = folder / f"trial-{trials[1].id}.parquet"
    expected = pq.read_table(other)
    pq.write_table(expected.drop_columns(["asr"]), other)

    bad: list[str] = []
    table = results.read(store, bad).to_pandas()
    assert sorted(bad) == sorted([f"results/trial-{trials[0].id} (1).parquet", f"results/trial-{trials[1].id}.parquet"])
    assert len(table) == len(good) - expected.num_rows  # the copy adds nothing; the incomplete file is left out
    assert table.trial_id.nunique() == len(trials) - 1
    with pytest.raises(ValueError, match=r"missing column\(s\) asr"):
        results._read_file(store, other.name)
    with pytest.raises(ValueError, match=f"rows of trial\\(s\\) {trials[0].id} in the file of trial {trials[0].id} \\(1\\)"):
        results._read_file(store, f"trial-{trials[0].id} (1).parquet")
    capsys.readouterr()
    for cmd in ("status", "results"):  # damaged for every command (results called the copy another sweep's)
        main([cmd, str(tmp_path / "s")])
        said = capsys.readouterr()
        assert "2 unreadable" in said.out + said.err and "no recorded spec" not in said.out + said.err, said
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec(tmp_path / "s")))
    assert main(["sweep", str(tmp_path / "spec.json"), "--dry-run"]) == 0
    assert f"({len(trials) - 1} already finished)" in capsys.readouterr().out  # it counted the incomplete file
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    said = capsys.readouterr().out
    assert "need a rerun" not in said, said  # no rerun writes 'trial-<id> (1)': verify said one would
    assert f"set aside 1 result file(s) of no trial a recorded spec plans (a copy, or another sweep's) " \
           f"in results-damaged/: {trials[0].id} (1)" in said, said
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"trial-{t.id}.parquet" for t in trials)
    assert pq.read_table(other).to_pandas().equals(expected.to_pandas())  # rebuilt from the manifests
    assert results.read(store).num_rows == len(good)


def test_report_and_results_leave_out_another_sweeps_result_files(finished, tmp_path, capsys):
    """A result file copied in from another sweep was averaged into this sweep's Table 1 (status already said
    it was no trial of this storage). The report and `tscray results` leave it out and name it."""
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(tmp_path / "before")]) == 0
    theirs = [{**r, "sweep": "other", "trial_id": "0123456789ab", "asr": 99.0}
              for r in results.read(store).to_pylist() if r["trial_id"] == trials[0].id]
    results.write_trial(store, "0123456789ab", theirs)
    assert main(["results", str(tmp_path / "s"), "--csv", str(tmp_path / "rows.csv")]) == 0
    err = capsys.readouterr().err
    assert "left out 1 result file(s) of trials no recorded spec of this storage plans" in err
    assert "trial-0123456789ab.parquet" in err
    import pandas as pd
    assert set(pd.read_csv(tmp_path / "rows.csv").trial_id) == {t.id for t in trials}
    assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(tmp_path / "rep")]) == 0
    assert "left out 1 result file(s)" in capsys.readouterr().err
    for name in ("table1.csv", "table1_long.csv", "tsc_grid.csv"):  # the same numbers as before the copy came in
        assert (tmp_path / "rep" / name).read_text() == (tmp_path / "before" / name).read_text(), name
    # the status count and the rows agree: every planned trial, none of the other sweep's
    assert main(["status", str(tmp_path / "s")]) == 0
    assert f"trials: {len(trials)}/{len(trials)} finished; 1 result file(s)" in capsys.readouterr().out


def test_verify_names_deleted_result_files_and_repair_rebuilds_them(finished, tmp_path, capsys):
    """With every result file deleted, `status` read 0 finished while `verify` called the store intact, and
    --repair rebuilt nothing though every step was stored. Trials whose steps are all stored but whose rows are
    gone are named, and --repair writes their rows again without computing anything."""
    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    expected = results.read(store).to_pandas().sort_values(["trial_id", "step_key", "stage", "round"])
    for f in (tmp_path / "s" / "results").iterdir():
        f.unlink()
    assert main(["verify", str(tmp_path / "s"), "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"results: 0 files, 0 unreadable, {len(trials)} missing" in out and "store is intact" not in out
    before = dict(store.computations())
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    assert f"rebuilt the rows of {len(trials)} trial(s)" in capsys.readouterr().out
    assert store.computations() == before
    again = results.read(store).to_pandas().sort_values(["trial_id", "step_key", "stage", "round"])
    assert again.reset_index(drop=True).equals(expected.reset_index(drop=True))
    assert main(["verify", str(tmp_path / "s")]) == 0 and "store is intact" in capsys.readouterr().out
    # a trial whose steps are not all stored is unfinished, not missing: the next run computes it
    victim = trials[0].chain[-1].step
    import shutil
    shutil.rmtree(tmp_path / "s" / "steps" / victim.kind / victim.key)
    (tmp_path / "s" / "results" / f"trial-{trials[0].id}.parquet").unlink()
    assert main(["verify", str(tmp_path / "s"), "--quick"]) == 0


def test_report_says_what_a_reader_must_know_and_refuses_outputs_it_cannot_write(finished, tmp_path, capsys):
    """`--tsc-setting 5,0.9` on rows without it was replaced with exit 0 and a word only in a table caption; a
    report over 1 of 2 planned trials read as complete; `--out FILE` and `--csv FOLDER` ended in
    FileExistsError / IsADirectoryError (exit 1), naming no option."""
    src, trials = finished
    copy_store(src, tmp_path / "s")
    s = str(tmp_path / "s")
    assert main(["report", s, "--no-mlflow", "--out", str(tmp_path / "r"), "--tsc-setting", "5,0.9"]) == 0
    err = capsys.readouterr().err
    assert "note: supervised: TSC at E_TSC 1, t 0.5: the requested E_TSC 5, t 0.9 is not in these rows" in err
    assert "the requested E_TSC 5, t 0.9 is not in these rows" in (tmp_path / "r" / "index.html").read_text()
    assert "planned trials have results" not in err
    (tmp_path / "s" / "results" / f"trial-{trials[0].id}.parquet").unlink()
    assert main(["report", s, "--no-mlflow", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"note: {len(trials) - 1} of the {len(trials)} planned trials have results: the sweep is unfinished" in err
    assert "the sweep is unfinished" in (tmp_path / "r" / "index.html").read_text()

    (tmp_path / "afile").write_text("x")
    for argv, msg in ((["report", s, "--out", str(tmp_path / "afile")], "--out: "),
                      (["report", s, "--out", str(tmp_path / "afile" / "sub")], "--out: "),
                      (["results", s, "--csv", str(tmp_path)], "--csv: "),
                      (["results", s, "--csv", str(tmp_path / "no" / "rows.csv")], "--csv: folder")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and "Errno" not in err, (argv, err)


def test_a_report_after_the_grid_shrank_does_not_ask_for_a_rerun_that_cannot_finish_it(finished, tmp_path, capsys):
    """A trial dropped from the grid before it ran stays planned by the earlier spec in sweep.json: every report
    said 'the sweep is unfinished (run it again to resume)', which rerunning the current spec never cleared."""
    from tscray import sweep_record

    src, trials = finished
    store = copy_store(src, tmp_path / "s")
    dropped = next(t for t in trials if t.params["defense"] == "none")
    (tmp_path / "s" / "results" / f"trial-{dropped.id}.parquet").unlink()
    raw = tiny_spec(tmp_path / "s")
    raw["grid"] = {**raw["grid"], "defense": ["tsc"]}
    spec = validate(raw)
    sweep_record.write(store, spec, "x", make_plan(spec))
    assert main(["report", str(tmp_path / "s"), "--no-mlflow", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"{len(trials) - 1} of the {len(trials)} planned trials have results: the current spec's trials are " \
           "all finished; the others were planned by earlier specs" in err and "run it again" not in err, err


def test_repair_asks_for_a_rerun_when_a_manifest_lacks_the_trials_final_record(finished, tmp_path, capsys):
    """A deleted result file whose final step's manifest holds no record of the final model (an edited or
    foreign manifest) ended verify --repair in a KeyError traceback; the step is damaged, and set aside."""
    src, trials = finished
    copy_store(src, tmp_path / "s")
    tsc = next(t for t in trials if t.params["defense"] == "tsc")
    (tmp_path / "s" / "results" / f"trial-{tsc.id}.parquet").unlink()
    kind = next(st.step.kind for st in tsc.chain if st.step.key == tsc.final.key)
    path = tmp_path / "s" / "steps" / kind / tsc.final.key / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "records": []}))
    assert main(["verify", str(tmp_path / "s"), "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"1 trial(s) need a rerun of the sweep to finish: {tsc.id}" in out, out
    assert "moved 1 damaged step(s) to quarantine/" in out and not path.exists()  # so the rerun recomputes it


def test_results_sort_numbers_as_numbers_and_status_prints_no_empty_parentheses(finished, tmp_path, capsys):
    """`tscray results` sorted by text (seed 10 before seed 2, poison rate 0.1 before 0.05 in some orders); a
    storage with no steps yet printed 'computed ()'."""
    import shutil

    from tscray.cli import _sort_key

    assert sorted([10, 2, None, "b", 0.05, "a", 1], key=_sort_key) == [0.05, 1, 2, 10, "a", "b", None]
    src, _ = finished
    copy_store(src, tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "steps")
    (tmp_path / "s" / "steps").mkdir()
    assert main(["status", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "steps : 0/" in out and "()" not in out, out
