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
    assert (released.curve_optim.t_max, released.curve_optim.l2, released.finetune_epochs,
            released.finetune_last) == (100, 1e-4, 10, False)
    with pytest.raises(ValueError, match="unknown TSC preset"):
        tsc.make_config("nope")
