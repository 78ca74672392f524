"""Self-supervised sweeps: the spec, the plan (a shared clean encoder) and a tiny trial computed step by step."""

import pytest
import torch

from tscray import results
from tscray.config import SpecError, validate
from tscray.plan import make_plan
from tscray.steps import Context, run_local
from tscray.store import Store


def ssl_raw(**grid):
    base = {"dataset": ["fashion-mnist-embedded"], "arch": ["simclr-cnn"], "attack": ["badencoder", "ctrl"],
            "defense": ["tsc", "mcr", "none"], "rounds": [1], "t": [0.25], "poison_rate": [0.005]}
    return {"name": "s", "grid": {**base, **grid},
            "train": {"method": "simclr", "optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-6, "epochs": 1,
                      "batch_size": 128, "arch_kw": {"widths": [8, 8, 8, 8], "proj_dim": 16},
                      "attack_kw": {"badencoder": {"epochs": 1, "batch_size": 64, "shadow_ratio": 0.02, "patch": 4}}},
            "ssl": {"probe_epochs": 2, "knn_k": 20},
            "defense": {"preset": "ssl", "clean_ratio": 0.02,
                        "tsc": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100},
                        "mcr": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100}}}


def problems(raw):
    with pytest.raises(SpecError) as e:
        validate(raw)
    return e.value.problems


def test_ssl_spec_names_attacks_and_architectures_that_do_not_fit_the_method():
    raw = ssl_raw(attack=["badencoder", "badnets"], arch=["cnn"])
    got = problems(raw)
    assert any(p.startswith("grid.attack[1]: 'badnets' is not a self-supervised attack") for p in got)
    assert any(p.startswith("grid.arch[0]: 'cnn' is not an encoder") for p in got)
    sup = {"name": "x", "grid": {"attack": ["badencoder"]}, "ssl": {"knn_k": 5}}
    got = problems(sup)
    assert any(p.startswith("grid.attack[0]: 'badencoder' is not a supervised attack") for p in got)
    assert "ssl: applies only with train.method: simclr" in got
    bad = ssl_raw()
    bad["ssl"] = {"downstream": "mnist-of-doom", "probe_epochs": 0}
    got = problems(bad)
    assert any(p.startswith("ssl.downstream: unknown dataset 'mnist-of-doom'") for p in got)
    assert any(p.startswith("ssl.probe_epochs: 0 is outside") for p in got)
    bad = ssl_raw()
    bad["train"]["method"] = "byol"
    assert any(p.startswith("train.method: unknown training method 'byol'") for p in problems(bad))


def test_ssl_plan_shares_one_clean_encoder_among_badencoder_trials():
    plan = make_plan(validate(ssl_raw(t=[0.15, 0.25], rounds=[1, 2])))
    counts = plan.count_by_kind()
    assert counts["ssl_pretrain"] == 1  # only BadEncoder fine-tunes a clean encoder; CTRL pre-trains poisoned
    assert counts["backdoor"] == 2
    bds = {s.params["attack"]: s for s in plan.steps.values() if s.kind == "backdoor"}
    assert [i.kind for i in bds["badencoder"].inputs] == ["ssl_pretrain"] and bds["ctrl"].inputs == ()
    assert all(t.params["method"] == "simclr" for t in plan.trials)
    supervised = make_plan(validate({"name": "x", "grid": {"t": [0.4]}}))
    assert all("method" not in t.params for t in supervised.trials)  # supervised trial ids are unchanged


def test_tiny_ssl_trials_run_step_by_step_and_write_probe_rows(tmp_path):
    torch.set_num_threads(1)
    spec = validate(ssl_raw(attack=["badencoder"]))
    plan = make_plan(spec)
    ctx = Context(Store(str(tmp_path)))
    for trial in plan.trials:
        manifests = run_local(trial.steps, ctx)
        rows = results.trial_rows("s", trial, manifests)
        final = [r for r in rows if r["stage"] == "final"]
        assert len(final) == 1 and final[0]["method"] == "simclr"
        for r in rows:
            if r["stage"] in ("backdoored", "final"):
                assert 0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100 and r["knn_acc"] is not None
    pre = [s for s in plan.steps.values() if s.kind == "ssl_pretrain"][0]
    bd = [s for s in plan.steps.values() if s.kind == "backdoor"][0]
    clean = ctx.store.load_tensors(pre.kind, pre.key, "model")
    backdoored = ctx.store.load_tensors(bd.kind, bd.key, "model")
    assert set(clean) == set(backdoored)
    assert any(not torch.equal(clean[k], backdoored[k]) for k in clean)  # BadEncoder fine-tuned the encoder
    assert all(n == 1 for n in ctx.store.computations().values())  # every step computed once across trials
    assert len(ctx.store.step_keys()["ssl_pretrain"]) == 1
