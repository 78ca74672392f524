"""Fast checks of the defenses' contracts on a tiny setting (the ASR proof is in test_tsc_e2e.py)."""

import dataclasses

import pytest
import torch

from tscray import defenses
from tscray.data import clean_subset
from tscray.defenses import CleanData
from tscray.defenses.tsc import stage1_curve
from tscray.methods import build as method
from tscray.models import build

TINY = dict(curve_epochs=2, finetune_epochs=1, batch_size=50)


@pytest.fixture
def setting(embedded):
    torch.manual_seed(0)
    model = build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16))
    clean = CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.2, 0)), embedded.prep)
    return model, clean


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_round_r_of_one_run_is_exactly_an_e_tsc_r_run(setting, preset):
    model, clean = setting
    tsc = defenses.get("tsc")
    two = tsc.run(model, clean, method("supervised"), tsc.make_config(preset, rounds=2, **TINY))
    one = tsc.run(model, clean, method("supervised"), tsc.make_config(preset, rounds=1, **TINY))
    assert len(two.outputs) == 2 and two.model is two.outputs[-1]
    assert {(1, "stage1"), (1, "stage2"), (2, "stage1"), (2, "stage2")} <= set(two.points)
    for k, v in one.model.state_dict().items():
        assert torch.equal(two.outputs[0].state_dict()[k], v), k
    assert not torch.equal(two.outputs[1].convs[0].weight, two.outputs[0].convs[0].weight)


def test_stage_one_curve_does_not_depend_on_t(setting):
    model, clean = setting
    cfg = defenses.get("tsc").make_config("paper", **TINY)
    a = stage1_curve(model, clean, method("supervised"), dataclasses.replace(cfg, t=0.2))
    b = stage1_curve(model, clean, method("supervised"), dataclasses.replace(cfg, t=0.7))
    assert all(torch.equal(p, q) for p, q in zip(a.bend, b.bend))


def test_records_cover_stages_and_curve_points(setting, embedded):
    model, clean = setting
    tsc = defenses.get("tsc")
    from tscray.attacks import build as attack, evaluator
    ev = evaluator(embedded, attack("badnets"), 0)
    res = tsc.run(model, clean, method("supervised"), tsc.make_config("paper", rounds=1, eval_ts=(0.0, 0.5, 1.0), **TINY), ev)
    stages = [r["stage"] for r in res.records]
    assert stages.count("curve1") == 3 and stages.count("curve2") == 3
    assert {"stage1", "stage2", "finetune", "output"} <= set(stages)
    assert all(0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100 for r in res.records)
    out = [r for r in res.records if r["stage"] == "output"][0]
    assert out["acc"] == ev(res.model)["acc"]


@pytest.mark.parametrize("finetune_last", [True, False])
def test_a_round_evaluates_each_distinct_model_once(setting, embedded, finetune_last):
    """The output is the stage-2 point or its fine-tuned successor: its row reuses that evaluation."""
    model, clean = setting
    tsc = defenses.get("tsc")
    from tscray.attacks import build as attack, evaluator
    ev = evaluator(embedded, attack("badnets"), 0)
    seen: list[int] = []

    def counting(m):
        seen.append(id(m))
        return ev(m)

    cfg = tsc.make_config("paper", rounds=2, finetune_last=finetune_last, **TINY)
    res = tsc.run(model, clean, method("supervised"), cfg, counting)
    assert len(seen) == len(set(seen))
    by = {(r["round"], r["stage"]): r for r in res.records}
    for rnd in (1, 2):
        tuned = finetune_last or rnd < 2
        assert (rnd, "finetune") in by if tuned else (rnd, "finetune") not in by
        same = by[(rnd, "finetune" if tuned and finetune_last else "stage2")]
        assert by[(rnd, "output")]["acc"] == same["acc"] and by[(rnd, "output")]["asr"] == same["asr"]
    assert len(seen) == 2 * 3 - (0 if finetune_last else 1)


@pytest.mark.parametrize("name", ["mcr", "finetune"])
def test_baselines_run_and_return_a_model(setting, name):
    model, clean = setting
    d = defenses.get(name)
    overrides = {"epochs": 1, "batch_size": 50} if name == "finetune" else TINY
    res = d.run(model, clean, method("supervised"), d.make_config("paper", **overrides))
    assert isinstance(res.model, torch.nn.Module) and len(res.outputs) == 1
    assert not torch.equal(res.model.convs[0].weight, model.convs[0].weight)


@pytest.mark.parametrize("field,value,msg", [("t", 1.0, "strictly between"), ("t", 0.0, "strictly between"),
                                             ("rounds", 0, ">= 1"), ("bogus", 1, "unknown tsc setting"),
                                             ("probes", "post", "probes must be one of auto, raw, relu"),
                                             ("probes", 3, "probes must be one of"),
                                             ("probes", {"c0": [{"module": "convs.0"}]}, "probes must be one of")])
def test_bad_settings_are_refused_naming_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        defenses.get("tsc").make_config("paper", **{field: value})


def test_presets_differ_where_the_paper_and_released_code_differ():
    tsc = defenses.get("tsc")
    paper, released = tsc.make_config("paper"), tsc.make_config("released")
    assert (paper.rounds, paper.t, paper.curve_epochs, paper.curve_optim.lr) == (3, 0.4, 200, 0.02)
    assert (paper.finetune_epochs, paper.finetune_optim.lr, paper.finetune_last) == (5, 1e-4, True)
    assert (released.curve_optim.period(200), released.curve_optim.l2, released.finetune_epochs,
            released.finetune_last, released.match_batch_size) == (100, 1e-4, 10, False, 128)
    # the released schedule restarts half-way at any budget (a fixed T_max of 100 lost it at 100 epochs)
    assert released.curve_optim.period(100) == 50 and paper.curve_optim.period(100) == 100
    with pytest.raises(ValueError, match="unknown TSC preset"):
        tsc.make_config("nope")


# --- the curve budget in steps, and the batch sizes of its parts (issue 11: docs/fidelity, items 1-3) --------

@pytest.mark.parametrize("steps,batches,epochs", [(2000, 1, 2000), (2000, 8, 250), (2000, 3, 667), (5, 40, 1)])
def test_a_step_budget_gives_enough_epochs_for_that_many_updates(steps, batches, epochs):
    from tscray.defenses.tsc import curve_epochs
    cfg = defenses.get("tsc").make_config("paper", curve_steps=steps)
    assert curve_epochs(cfg, batches) == epochs and (epochs - 1) * batches < steps <= epochs * batches
    assert curve_epochs(defenses.get("tsc").make_config("paper", curve_epochs=7), batches) == 7


def test_a_curve_fit_makes_curve_steps_updates_at_curve_batch_size(setting, monkeypatch):
    from tscray import curves
    model, clean = setting
    seen = []
    real = curves.fit_epochs

    def spy(curve, loader, method_, epochs, optim, seed=0, progress=None):
        seen.append((epochs, len(loader), loader.batch_size))
        return real(curve, loader, method_, 0, optim, seed, progress)
    monkeypatch.setattr(curves, "fit_epochs", spy)
    cfg = defenses.get("tsc").make_config("paper", curve_steps=10, curve_batch_size=64, batch_size=50)
    stage1_curve(model, clean, method("supervised"), cfg)
    batches = -(-len(clean.data) // 64)
    assert batches > 1 and seen == [(-(-10 // batches), batches, 64)]


def test_matching_reads_batches_of_match_batch_size(setting, monkeypatch):
    from tscray.defenses import tsc as tsc_mod
    model, clean = setting
    sizes = []
    monkeypatch.setattr(tsc_mod, "match", lambda a, b, loader, *rest: sizes.append(loader.batch_size) or
                        __import__("tscray.symmetry", fromlist=["match"]).match(a, b, loader, *rest))
    cfg = defenses.get("tsc").make_config("paper", curve_epochs=0, match_batch_size=32, batch_size=50)
    stage1_curve(model, clean, method("supervised"), cfg)
    assert sizes == [32]


@pytest.mark.parametrize("field", ["curve_steps", "curve_batch_size", "match_batch_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_budgets_and_batch_sizes_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        defenses.get("tsc").make_config("paper", **{field: value})


def test_one_cosine_period_setting_replaces_the_other():
    from tscray.defenses.base import resolve_config
    tsc = defenses.get("tsc")
    cfg = resolve_config(tsc, "released", {"curve_t_max": 30})
    assert (cfg.curve_optim.t_max, cfg.curve_optim.t_max_ratio, cfg.curve_optim.period(200)) == (30, None, 30)
    cfg = resolve_config(tsc, "paper", {"curve_optim": {"t_max_ratio": 0.25}})
    assert cfg.curve_optim.period(200) == 50
    with pytest.raises(ValueError, match="one period"):
        resolve_config(tsc, "paper", {"curve_t_max": 30, "curve_t_max_ratio": 0.5})
    with pytest.raises(ValueError, match="t_max_ratio"):
        resolve_config(tsc, "paper", {"curve_t_max_ratio": 1.5})


def test_settings_added_later_stay_out_of_step_keys_while_unset():
    """Stored steps (docs/table1_small/results, users' runs) were keyed before these fields existed."""
    from tscray.defenses.base import config_to_dict
    d = config_to_dict(defenses.get("tsc").make_config("paper"))
    assert set(d) == {"rounds", "t", "curve_epochs", "curve_optim", "batch_size", "finetune_epochs",
                      "finetune_optim", "finetune_last", "match_batches", "probes", "eval_ts", "seed"}
    assert set(d["curve_optim"]) == {"name", "lr", "momentum", "weight_decay", "schedule", "t_max", "l2"}
    d = config_to_dict(defenses.get("tsc").make_config("paper", curve_steps=2000))
    assert d["curve_steps"] == 2000 and "curve_batch_size" not in d


def test_the_small_preset_buys_paper_scale_bend_updates_for_a_few_hundred_images():
    from tscray.defenses.tsc import curve_epochs
    small = defenses.get("tsc").make_config("small")
    # E_TSC 4: three rounds left SBL-Blended (cnn) and Blended (ResNet-18 at width 8) at 26-29% ASR from
    # 200 clean images, a fourth took them to 13.2 and 3.0 (docs/fidelity/README.md)
    assert (small.t, small.rounds, small.curve_steps, small.batch_size) == (0.5, 4, 2000, 64)
    assert curve_epochs(small, -(-200 // 64)) * -(-200 // 64) >= 2000  # 200 images: 500 epochs of 4 batches
    paper = defenses.get("tsc").make_config("paper")
    assert curve_epochs(paper, -(-200 // paper.batch_size)) == 200  # the paper's budget there: 200 updates


def test_a_sweep_may_name_the_small_preset_and_other_defenses_keep_their_paper_recipe():
    from tscray.config import validate
    raw = {"name": "s", "grid": {"dataset": ["fashion-mnist-embedded"], "arch": ["cnn"], "attack": ["badnets"],
                                 "defense": ["tsc", "fp"], "rounds": [3], "t": [0.5]},
           "train": {"epochs": 1}, "defense": {"preset": "small"}}
    spec = validate(raw)
    assert spec.defense.config("tsc").curve_steps == 2000
    assert spec.defense.config("fp") == defenses.get("fp").make_config("paper")


@pytest.mark.parametrize("preset, rounds, t", [("small", 4, 0.5), ("ssl", 2, 0.25), ("paper", 3, 0.4)])
def test_a_sweep_without_rounds_or_t_runs_its_presets_not_the_papers(preset, rounds, t):
    """``defense.preset: small`` alone used to run E_TSC 3 at t 0.4 (the grid's defaults), the setting
    that failed on small clean sets; the grid's axes now default to the preset's recipe."""
    from tscray import plan
    from tscray.config import validate
    grid = {"dataset": ["fashion-mnist-embedded"], "arch": ["cnn"], "attack": ["badnets"], "defense": ["tsc"]}
    raw = {"name": "s", "grid": grid, "train": {"epochs": 1}, "defense": {"preset": preset}}
    if preset == "ssl":
        grid |= {"arch": ["simclr-cnn"], "attack": ["badencoder"]}
        raw["train"] |= {"method": "simclr"}
    spec = validate(raw)
    assert (spec.grid.rounds, spec.grid.t) == ((rounds,), (t,))
    assert [(p["rounds"], p["t"]) for p in plan.grid_points(spec)] == [(rounds, t)]
    blocks = validate({**raw, "grid": [{**grid, "t": [0.3]}, {**grid, "rounds": [1]}]}).grids
    assert [(b.rounds, b.t) for b in blocks] == [((rounds,), (0.3,)), ((1,), (t,))]  # a named axis is kept


def test_curve_epochs_given_over_the_small_preset_are_used_not_ignored():
    from tscray.defenses.base import resolve_config
    tsc = defenses.get("tsc")
    assert resolve_config(tsc, "small", {"curve_epochs": 50}).curve_steps is None
    assert resolve_config(tsc, "small", {}, curve_epochs=50).curve_steps is None  # a grid axis
    both = resolve_config(tsc, "small", {"curve_epochs": 50, "curve_steps": 300})
    assert (both.curve_epochs, both.curve_steps) == (50, 300)
    assert resolve_config(tsc, "small", {"t": 0.3}).curve_steps == 2000
