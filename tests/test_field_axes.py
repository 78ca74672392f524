"""Any spec field as a grid axis (issue 11, §1): ``grid: {defense.clean_ratio: [...], train.epochs: [...]}``.

Validated like the field itself and reported at the axis; part of the trial id, the result rows (a column
under the dotted path), MLflow params and the report's grouping; shared steps are still computed once."""

import json

import pytest
import torch

from tscray import results
from tscray.config import SpecError, validate
from tscray.plan import make_plan
from tscray.steps import Context, run_local
from tscray.store import Store


def raw_of(**grid):
    base = {"dataset": ["fashion-mnist-embedded"], "arch": ["cnn"], "attack": ["badnets"], "defense": ["tsc"],
            "rounds": [1], "t": [0.4]}
    return {"name": "t", "grid": {**base, **grid},
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.05, "arch_kw": {"widths": [8, 8, 8, 8]}},
            "defense": {"clean_ratio": 0.02, "tsc": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100},
                        "mcr": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100}}}


def problems(raw):
    with pytest.raises(SpecError) as err:
        validate(raw)
    return err.value.problems


def by_kind(plan):
    out = {}
    for s in plan.steps.values():
        out.setdefault(s.kind, []).append(s)
    return out


# --- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis,values,want", [
    ("defense.clean_ratio", [0.02, 2], "grid.defense.clean_ratio[1]: 2 is outside (0, 1]"),
    ("defense.tsc.curve_epochs", [-1, 5, "x"], "grid.defense.tsc.curve_epochs[0]: -1 is outside [0, ∞)"),
    ("defense.tsc.curve_epochs", [-1, 5, "x"], "grid.defense.tsc.curve_epochs[2]: 'x' is not an integer"),
    ("train.epoch", [1, 2], "grid.train.epoch: unknown key; allowed: epochs,"),
    ("train.optimizer", ["sgd", "rmsprop"], "grid.train.optimizer[1]: unknown optimizer 'rmsprop'"),
    ("defense.tsc.nope", [1], "grid.defense.tsc.nope: unknown tsc setting(s) ['nope']"),
    ("resources.workers", [1, 2], "grid.resources.workers: not a field axis"),
    ("train.method", ["simclr"], "grid.train.method: train.method is one per sweep"),
    ("defense.tsc.t", [0.3], "grid.defense.tsc.t: set through the grid axis t"),
    ("defense.tsc.rounds", [2], "grid.defense.tsc.rounds: set through the grid axis rounds"),
    ("train.epochs", [], "grid.train.epochs: empty list"),
    ("train.epochs", [1, 1], "grid.train.epochs: duplicate values [1, 1]"),
    ("defense.clean_ratio.x", [1], "grid.defense.clean_ratio.x: defense.clean_ratio is 0.02, not a mapping"),
    ("train.arch_kw", [{"widths": [8, 8, 8, 8]}, {"depth": 3}], "grid.train.arch_kw[1]: "),
])
def test_a_bad_field_axis_is_named_at_the_axis(axis, values, want):
    found = problems(raw_of(**{axis: values}))
    assert any(p.startswith(want) for p in found), found


def test_field_axis_problems_come_with_the_specs_other_problems():
    raw = raw_of(**{"defense.clean_ratio": [0.02, 3]})
    raw["train"]["epochs"] = -1
    found = problems(raw)
    assert "train.epochs: -1 is outside [0, ∞)" in found
    assert "grid.defense.clean_ratio[1]: 3 is outside (0, 1]" in found
    assert len(found) == 2  # the section's problem is not repeated at the axis


def test_field_axes_in_grid_blocks_are_named_by_block():
    raw = raw_of()
    raw["grid"] = [raw["grid"], {**raw["grid"], "train.epochs": [1, 0.5]}]
    assert problems(raw) == ["grid[1].train.epochs[1]: 0.5 is not an integer"]


def test_a_spec_with_field_axes_round_trips_through_its_stored_form():
    """``sweep.json`` holds ``spec.to_dict()``; ``tscray verify`` plans from it again."""
    spec = validate(raw_of(**{"defense.clean_ratio": [0.02, 0.05], "train.epochs": [1, 2]}))
    stored = json.loads(json.dumps(spec.to_dict()))
    stored.pop("ssl")  # as tscray verify reads it back (a supervised sweep's unused SSL defaults)
    again = validate(stored, check_data=False)
    assert again.grid == spec.grid
    assert [t.id for t in make_plan(again).trials] == [t.id for t in make_plan(spec).trials]


# --- planning: ids, and what is shared ------------------------------------------------------------------

def test_sweeps_without_field_axes_keep_their_trial_ids():
    plain = make_plan(validate(raw_of(defense=["tsc", "none"])))
    assert all("." not in k for t in plain.trials for k in t.params)
    axis = make_plan(validate(raw_of(defense=["tsc", "none"], **{"defense.clean_ratio": [0.02]})))
    tsc = [t for t in axis.trials if t.params["defense"] == "tsc"][0]
    assert tsc.params["defense.clean_ratio"] == 0.02
    assert tsc.id not in {t.id for t in plain.trials}  # the axis is part of the id
    none = [t for t in axis.trials if t.params["defense"] == "none"][0]
    assert none.id in {t.id for t in plain.trials}  # the undefended model has no clean set


def test_a_clean_ratio_axis_shares_the_backdoored_model_and_nothing_after_it():
    plan = make_plan(validate(raw_of(defense=["tsc", "mcr", "none"],
                                     **{"defense.clean_ratio": [0.02, 0.05, 0.1]})))
    assert sorted(t.params["defense"] for t in plan.trials) == ["mcr"] * 3 + ["none"] + ["tsc"] * 3
    kinds = by_kind(plan)
    assert len(kinds["backdoor"]) == 1
    assert len(kinds["tsc_stage1"]) == len(kinds["mcr_curve"]) == 3
    ratios = sorted(s.params["clean_ratio"] for s in kinds["tsc_stage1"])
    assert ratios == [0.02, 0.05, 0.1]


def test_a_curve_epochs_axis_does_not_share_curves_and_leaves_other_defenses_alone():
    plan = make_plan(validate(raw_of(defense=["tsc", "mcr"], **{"defense.tsc.curve_epochs": [1, 3]})))
    tsc = [t for t in plan.trials if t.params["defense"] == "tsc"]
    mcr = [t for t in plan.trials if t.params["defense"] == "mcr"]
    assert len(tsc) == 2 and len(mcr) == 1 and "defense.tsc.curve_epochs" not in mcr[0].params
    kinds = by_kind(plan)
    assert len(kinds["backdoor"]) == 1 and len(kinds["tsc_stage1"]) == 2
    assert sorted(t.settings.count('"curve_epochs":3') for t in tsc) == [0, 1]


def test_a_curve_steps_axis_is_validated_and_makes_its_own_curves():
    assert problems(raw_of(**{"defense.tsc.curve_steps": [100, 0]}))
    plan = make_plan(validate(raw_of(**{"defense.tsc.curve_steps": [100, 400]})))
    kinds = by_kind(plan)
    assert len(plan.trials) == 2 and len(kinds["backdoor"]) == 1 and len(kinds["tsc_stage1"]) == 2
    assert sorted(s.params["config"]["curve_steps"] for s in kinds["tsc_stage1"]) == [100, 400]


def test_a_training_axis_makes_its_own_backdoored_models():
    plan = make_plan(validate(raw_of(defense=["tsc", "none"], **{"train.epochs": [1, 2], "train.target": [0, 7]})))
    assert len(plan.trials) == 8
    bds = by_kind(plan)["backdoor"]
    assert sorted((s.params["epochs"], s.params["target"]) for s in bds) == [(1, 0), (1, 7), (2, 0), (2, 7)]


def test_blocks_can_sweep_different_fields():
    raw = raw_of()
    raw["grid"] = [{**raw["grid"], "defense.clean_ratio": [0.02, 0.05]},
                   {**raw["grid"], "attack": ["blended"], "train.epochs": [2]}]
    plan = make_plan(validate(raw))
    got = sorted((t.params["attack"], t.params.get("defense.clean_ratio"), t.params.get("train.epochs"))
                 for t in plan.trials)
    assert got == [("badnets", 0.02, None), ("badnets", 0.05, None), ("blended", None, 2)]


# --- results ---------------------------------------------------------------------------------------------

def test_result_rows_carry_field_axes_as_columns(tmp_path):
    """Two trials of a clean-ratio axis computed locally: each row names its ratio under the dotted path,
    pandas reads the column, and a trial of an older sweep (no such column) reads as null there."""
    torch.set_num_threads(1)
    spec = validate(raw_of(defense=["finetune", "none"], **{"defense.clean_ratio": [0.01, 0.02]},
                           seed=[0]) | {"defense": {"clean_ratio": 0.02, "finetune": {"epochs": 1, "batch_size": 100}}})
    plan = make_plan(spec)
    ctx = Context(Store(str(tmp_path)))
    for trial in plan.trials:
        rows = results.trial_rows("t", trial, run_local(trial.steps, ctx))
        results.write_trial(ctx.store, trial.id, rows)
    df = results.read(ctx.store).to_pandas()
    final = df[df.stage == "final"].set_index("defense")
    assert sorted(final.loc["finetune", "defense.clean_ratio"].tolist()) == [0.01, 0.02]
    assert final.loc["none", "defense.clean_ratio"] != final.loc["none", "defense.clean_ratio"]  # NaN
    defended = df[df.defense == "finetune"]
    assert set(defended.groupby("defense.clean_ratio").trial_id.nunique()) == {1}


def test_axis_columns_of_different_types_and_blocks_read_together(tmp_path):
    store = Store(str(tmp_path))
    row = {"sweep": "t", "trial_id": "a", "stage": "final", "defense": "tsc", "acc": 90.0, "asr": 3.0}
    results.write_trial(store, "a", [{**row, "defense.tsc.curve_epochs": 5}])
    results.write_trial(store, "b", [{**row, "trial_id": "b", "defense.tsc.curve_epochs": 2.5}])
    results.write_trial(store, "c", [{**row, "trial_id": "c", "train.attack_kw": results._axis_value({"k": 4})}])
    df = results.read(store).to_pandas().set_index("trial_id")
    assert df.loc["a", "defense.tsc.curve_epochs"] == 5 and df.loc["b", "defense.tsc.curve_epochs"] == 2.5
    assert df.loc["c", "train.attack_kw"] == '{"k": 4}' and df["train.attack_kw"].isna().sum() == 2


def test_the_combined_results_file_opens_whole_in_pandas_where_the_folder_does_not(tmp_path):
    """The README said ``pandas.read_parquet(<storage>/results)``: pandas takes the first file's columns, so
    an axis the first trial lacks (the undefended model has no clean ratio) vanished from every row, and an
    axis holding 50 in one file and 0.5 in another failed to read. ``results.parquet`` holds every row under
    one schema; a trial no spec plans is left out."""
    import pandas as pd

    store = Store(str(tmp_path))
    row = {"sweep": "t", "stage": "final", "acc": 90.0, "asr": 3.0}
    results.write_trial(store, "a", [{**row, "trial_id": "a", "defense": "none"}])
    results.write_trial(store, "b", [{**row, "trial_id": "b", "defense": "tsc", "defense.clean_ratio": 0.02,
                                      "defense.tsc.curve_epochs": 50}])
    results.write_trial(store, "c", [{**row, "trial_id": "c", "defense": "tsc", "defense.clean_ratio": 0.25,
                                      "defense.tsc.curve_epochs": 0.5}])
    assert "defense.clean_ratio" not in pd.read_parquet(tmp_path / "results").columns  # (why it exists)
    assert results.write_combined(store, planned={"a", "b", "c"}) == 3
    df = pd.read_parquet(tmp_path / results.COMBINED).set_index("trial_id")
    assert df.loc["b", "defense.clean_ratio"] == 0.02 and df.loc["c", "defense.tsc.curve_epochs"] == 0.5
    assert pd.isna(df.loc["a", "defense.clean_ratio"])
    assert results.write_combined(store, planned={"a", "b"}) == 2  # (another sweep's file copied in: left out)
    assert set(pd.read_parquet(tmp_path / results.COMBINED).trial_id) == {"a", "b"}


def test_tscray_results_prints_settings_exactly_and_measures_to_two_places(tmp_path, capsys):
    """The table printed every float to two places: table1.yaml's poison rates 0.01 and 0.005 both read 0.01,
    clean ratios 0.004 and 0.001 both 0.00, and t 0.125 read 0.12."""
    from tscray.cli import main

    store = Store(str(tmp_path))
    store.write_json("sweep.json", {"spec": {"name": "t", "grid": "?"}, "sweep_id": "s", "trials": 2, "steps": 2})
    row = {"sweep": "t", "stage": "final", "defense": "tsc", "attack": "sapa", "seed": 0, "round": 3, "e_tsc": 3,
           "step_key": "k", "acc": 88.123, "asr": 4.5678}
    for tid, rate, ratio, t in (("a", 0.01, 0.004, 0.125), ("b", 0.005, 0.001, 0.12)):
        results.write_trial(store, tid, [{**row, "trial_id": tid, "poison_rate": rate, "t": t,
                                          "defense.clean_ratio": ratio}])
    assert main(["results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [line.split() for line in lines[1:]]
    assert sorted((c[3], c[7], c[8]) for c in cells) == [("0.005", "0.12", "0.001"), ("0.01", "0.125", "0.004")]
    assert all(c[-2:] == ["88.12", "4.57"] for c in cells)


def test_an_axis_with_a_null_or_values_of_unrelated_types_reads_together(tmp_path):
    """``curve_t_max: [null, 50]`` wrote a text column for null and an integer one for 50, and every read
    (status, verify, results, report, the sweep's end) failed on the mix with a pyarrow traceback."""
    store = Store(str(tmp_path))
    row = {"sweep": "t", "stage": "final", "defense": "tsc", "acc": 90.0, "asr": 3.0}
    results.write_trial(store, "a", [{**row, "trial_id": "a", "defense.tsc.curve_t_max": None, "x.y": 1}])
    results.write_trial(store, "n", [{**row, "trial_id": "n", "defense": "none"}])  # not an axis of none
    results.write_trial(store, "b", [{**row, "trial_id": "b", "defense.tsc.curve_t_max": 50, "x.y": "auto"}])
    results.write_trial(store, "c", [{**row, "trial_id": "c", "defense.tsc.curve_t_max": 70, "x.y": 2.5}])
    df = results.read(store).to_pandas().set_index("trial_id")
    assert df["defense.tsc.curve_t_max"].isna()["n"] and df.loc["b", "defense.tsc.curve_t_max"] == 50
    assert df["x.y"].drop("n").to_dict() == {"a": "1", "b": "auto", "c": "2.5"} and df["x.y"].isna()["n"]


def test_a_null_axis_value_is_a_value_not_a_trial_the_axis_misses():
    """Trials an axis does not apply to hold null in its column; a trial at the value null must not read
    the same (the report then left No defense out of that value's rows and labelled it as unswept)."""
    plan = make_plan(validate(raw_of(defense=["tsc", "none"], **{"defense.tsc.curve_t_max": [None, 50]})))
    rows = {(t.params["defense"], results.trial_rows("t", t, _fake_manifests(t))[0].get("defense.tsc.curve_t_max"))
            for t in plan.trials}
    assert ("tsc", "null") in rows and ("tsc", 50) in rows and ("none", None) in rows, rows


def _fake_manifests(trial):
    """Each step of the trial's chain as a manifest recording its final stages (no training)."""
    return {st.step.key: {"seconds": 1.0, "device": "cpu", "records": [{"stage": s, "round": st.round, "acc": 90.0, "asr": 1.0}
                                                       for s in (*st.report, *trial.final.stages)]}
            for st in trial.chain}


def test_a_preset_axis_takes_each_presets_rounds_and_t_where_the_block_names_none():
    """``defense.preset: [paper, small]`` without ``rounds``/``t``: the small trial runs E_TSC 4 at t 0.5, as
    ``defense: {preset: small}`` does (it ran the paper's 3 and 0.4 under the small preset's other fields)."""
    raw = raw_of(**{"defense.preset": ["paper", "small"]})
    del raw["grid"]["rounds"], raw["grid"]["t"]
    spec = validate(raw)
    got = sorted((t.params["defense.preset"], t.params["rounds"], t.params["t"]) for t in make_plan(spec).trials)
    assert got == [("paper", 3, 0.4), ("small", 4, 0.5)]
    alone = dict(raw, defense={**raw["defense"], "preset": "small"})
    alone["grid"] = {k: v for k, v in raw["grid"].items() if k != "defense.preset"}
    assert [(t.params["rounds"], t.params["t"]) for t in make_plan(validate(alone)).trials] == [(4, 0.5)]
    stored = json.loads(json.dumps(spec.to_dict()))
    stored.pop("ssl")
    again = validate(stored, check_data=False)
    assert [t.id for t in make_plan(again).trials] == [t.id for t in make_plan(spec).trials]
    raw["grid"]["t"] = [0.3]  # a named axis holds for every preset
    got = sorted((t.params["defense.preset"], t.params["rounds"], t.params["t"]) for t in make_plan(validate(raw)).trials)
    assert got == [("paper", 3, 0.3), ("small", 4, 0.3)]
    bad = raw_of(**{"defense.preset": ["paper", "fast"]})
    assert any(p.startswith("grid.defense.preset[1]") for p in problems(bad)), problems(bad)


def test_an_integer_written_for_a_float_setting_is_the_same_trial():
    """``defense.clean_ratio: [1]`` and ``[1.0]`` are one setting: they had two trial ids (so a study resumed
    from a spec written either way recomputed it), as named axes (``poison_rate: [1]``) never did."""
    def ids(**axis):
        return [t.id for t in make_plan(validate(raw_of(**axis))).trials]
    assert ids(**{"defense.clean_ratio": [1]}) == ids(**{"defense.clean_ratio": [1.0]})
    assert ids(**{"defense.tsc.curve_lr": [1, 0.5]}) == ids(**{"defense.tsc.curve_lr": [1.0, 0.5]})
    assert ids(**{"train.lr": [1]}) == ids(**{"train.lr": [1.0]})
    spec = validate(raw_of(**{"defense.tsc.curve_epochs": [2]}))  # an integer setting keeps its integers
    assert type(make_plan(spec).trials[0].params["defense.tsc.curve_epochs"]) is int


def test_a_setting_named_like_an_axis_is_a_field_axis_for_a_defense_without_that_axis():
    """i-bau has a rounds setting but not TSC's rounds axis: ``defense.i-bau.rounds: [2, 5]`` was refused
    with 'set through the grid axis rounds', an axis i-bau ignores."""
    raw = raw_of(defense=["i-bau"], **{"defense.i-bau.rounds": [1, 2]})
    del raw["grid"]["rounds"], raw["grid"]["t"]
    trials = make_plan(validate(raw)).trials
    assert sorted(t.params["defense.i-bau.rounds"] for t in trials) == [1, 2]
    assert sorted(t.settings.count('"rounds":2') for t in trials) == [0, 1]
    assert "set through the grid axis rounds" in "\n".join(problems(raw_of(**{"defense.tsc.rounds": [2]})))


def test_a_whole_defense_mapping_axis_applies_to_that_defense_only():
    """``defense.tsc: [{...}, {...}]`` beside mcr made two identical MCR trials."""
    trials = make_plan(validate(raw_of(defense=["tsc", "mcr"], **{"defense.tsc": [{"curve_epochs": 1},
                                                                                  {"curve_epochs": 2}]}))).trials
    assert sorted(t.params["defense"] for t in trials) == ["mcr", "tsc", "tsc"]
    assert "grid.defense.mcr: a setting of mcr, which is not a defense of this block" in "\n".join(
        problems(raw_of(**{"defense.mcr": [{"curve_epochs": 1}]})))


def test_per_attack_and_per_architecture_option_axes_apply_to_their_own_trials_only():
    """``train.attack_kw.wanet.k: [3, 4]`` made two identical trials of every other attack of the block
    (one backdoored model, two ids); in a block without wanet it applied to no trial and is refused."""
    plan = make_plan(validate(raw_of(attack=["badnets", "wanet"], defense=["tsc", "none"],
                                     **{"train.attack_kw.wanet.k": [3, 4]})))
    got = sorted((t.params["attack"], t.params["defense"], t.params.get("train.attack_kw.wanet.k"))
                 for t in plan.trials)
    assert got == [("badnets", "none", None), ("badnets", "tsc", None), ("wanet", "none", 3), ("wanet", "none", 4),
                   ("wanet", "tsc", 3), ("wanet", "tsc", 4)]
    assert len(by_kind(plan)["backdoor"]) == 3
    assert "grid.train.attack_kw.wanet.k: options of attack wanet, which is not in this block" in "\n".join(
        problems(raw_of(**{"train.attack_kw.wanet.k": [3, 4]})))
    assert "grid.train.arch_kw.resnet18.width: options of architecture resnet18" in "\n".join(
        problems(raw_of(**{"train.arch_kw.resnet18.width": [4, 8]})))


def test_a_block_without_tsc_takes_t_from_its_own_defenses_recipe():
    """MCR alone under ``preset: small`` ran at TSC's small t 0.5 (MCR has no small preset: its paper t is
    0.4); under ``ssl`` it keeps MCR's own 0.25; beside TSC the block's shared t is TSC's."""
    def points(preset, defs):
        raw = {"name": "x", "defense": {"preset": preset}, "grid": {"defense": defs}}
        return sorted({(t.params["defense"], t.params["t"]) for t in make_plan(validate(raw)).trials})
    assert points("small", ["mcr"]) == [("mcr", 0.4)]
    assert points("ssl", ["mcr"]) == [("mcr", 0.25)]
    assert points("small", ["tsc", "mcr"]) == [("mcr", 0.5), ("tsc", 0.5)]
