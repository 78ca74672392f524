import pytest
import torch

from tscray import data, defenses, methods
from tscray.config import validate
from tscray.plan import Plan, make_plan
from tscray.steps import Context, run_local
from tscray.store import Store


def spec_of(arch_kw=None, **grid):
    base = {"dataset": ["fashion-mnist-embedded"], "arch": ["cnn"], "attack": ["badnets"], "defense": ["tsc"]}
    return validate({"name": "t", "grid": {**base, **grid},
                     "train": {"epochs": 1, "batch_size": 256, "lr": 0.05,
                               "arch_kw": arch_kw or {"widths": [8, 8, 8, 8]}},
                     "defense": {"clean_ratio": 0.02, "tsc": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100},
                                 "mcr": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 100},
                                 "finetune": {"epochs": 1, "batch_size": 100}}})


def test_step_keys_are_stable_and_distinct():
    a, b = make_plan(spec_of(t=[0.3, 0.4])), make_plan(spec_of(t=[0.3, 0.4]))
    assert list(a.steps) == list(b.steps)
    c = make_plan(spec_of(t=[0.3, 0.4], seed=[1]))
    assert not set(a.steps) & set(c.steps)
    keys = [s.key for s in a.steps.values()]
    assert len(keys) == len(set(keys))


def test_figure5_grid_shares_rounds_and_the_first_curve():
    plan = make_plan(spec_of(t=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], rounds=[1, 2, 3]))
    assert len(plan.trials) == 27
    assert Plan.curve_fits(plan.count_by_kind()) == 46
    assert Plan.curve_fits(plan.naive_count_by_kind()) == 108
    assert plan.count_by_kind()["backdoor"] == 1


def test_t_only_trials_share_round_one_stage_one_and_e_trials_share_rounds():
    spec = spec_of(t=[0.3, 0.5], rounds=[1, 3])
    by = {(t.params["t"], t.params["rounds"]): t for t in make_plan(spec).trials}

    def s1(tr, r):
        return [s.step.key for s in tr.chain if s.step.kind == "tsc_stage1" and s.round == r][0]

    def rd(tr, r):
        return [s.step.key for s in tr.chain if s.step.kind == "tsc_round" and s.round == r][0]

    assert s1(by[0.3, 1], 1) == s1(by[0.5, 1], 1)
    assert rd(by[0.3, 1], 1) != rd(by[0.5, 1], 1)
    assert rd(by[0.3, 1], 1) == rd(by[0.3, 3], 1)
    assert s1(by[0.3, 3], 2) != s1(by[0.5, 3], 2)


def test_defenses_share_the_backdoored_model_and_irrelevant_axes_collapse():
    plan = make_plan(spec_of(defense=["tsc", "mcr", "finetune", "none"], t=[0.3, 0.4], rounds=[1, 2]))
    kinds = [t.params["defense"] for t in plan.trials]
    assert kinds.count("tsc") == 4 and kinds.count("mcr") == 2 and kinds.count("finetune") == 1 and kinds.count("none") == 1
    assert plan.count_by_kind()["backdoor"] == 1 and plan.count_by_kind()["mcr_curve"] == 1


def test_local_run_of_a_planned_trial_equals_the_library_defense(tmp_path):
    """The step graph computes exactly what tsc.run computes (same seeds, same models)."""
    torch.set_num_threads(1)
    spec = spec_of(t=[0.4], rounds=[2])
    trial = make_plan(spec).trials[0]
    ctx = Context(Store(str(tmp_path)))
    manifests = run_local(trial.steps, ctx)
    assert len(ctx.store.computations()) == len(manifests) == 5
    key, artifact = trial.final.key, trial.final.artifact
    final = ctx.store.load_tensors([s for s in trial.steps if s.key == key][0].kind, key, artifact)

    ds = data.load("fashion-mnist-embedded")
    bd_step = trial.steps[0]
    bd = ctx.load_model(bd_step, "model")
    clean = ctx.clean({"dataset": ds.name}, 0.02, 0)
    tsc = defenses.get("tsc")
    cfg = tsc.make_config("paper", rounds=2, t=0.4, curve_epochs=1, finetune_epochs=1, batch_size=100)
    res = tsc.run(bd, clean, methods.build("supervised"), cfg)
    for k, v in res.model.state_dict().items():
        assert torch.equal(final[k], v), k
    # and a second run reuses everything
    run_local(trial.steps, ctx)
    assert set(ctx.store.computations().values()) == {1}


# --- attack resources ------------------------------------------------------------------------------------

def test_attack_resource_is_one_shared_step(pattern_attack):
    plan = make_plan(spec_of(attack=["test-pattern", "badnets"], poison_rate=[0.05, 0.1], arch=["cnn", "mlp"],
                             defense=["none"], arch_kw={"cnn": {"widths": [8, 8, 8, 8]}, "mlp": {"hidden": [16]}}))
    counts = plan.count_by_kind()
    assert counts["attack_resource"] == 1  # shared across rates and architectures (it depends on neither)
    assert counts["backdoor"] == 8
    res = [s for s in plan.steps.values() if s.kind == "attack_resource"][0]
    users = [s for s in plan.steps.values() if s.kind == "backdoor" and res in s.inputs]
    assert len(users) == 4 and all(s.params["attack"] == "test-pattern" for s in users)
    other = make_plan(spec_of(attack=["test-pattern"], seed=[1], defense=["none"]))
    assert not {s.key for s in other.steps.values() if s.kind == "attack_resource"} & {res.key}


def test_local_run_computes_the_resource_once_and_poisons_with_it(pattern_attack, tmp_path):
    torch.set_num_threads(1)
    spec = spec_of(attack=["test-pattern"], poison_rate=[0.05, 0.1], defense=["none"])
    plan = make_plan(spec)
    ctx = Context(Store(str(tmp_path)))
    manifests = run_local([t.steps[-1] for t in plan.trials], ctx)
    assert pattern_attack.made == 1
    res = [s for s in plan.steps.values() if s.kind == "attack_resource"][0]
    patch = ctx.store.load_tensors(res.kind, res.key, "resource")["patch"]
    atk = ctx.attack(plan.trials[0].steps[0])
    assert torch.equal(atk.patch, patch)
    ds = data.load("fashion-mnist-embedded")
    ev = ctx.evaluator(plan.trials[0].steps[0])
    assert torch.all(ev.poisoned.x[:, :, :4, :4] == patch)  # the triggered test set uses the stored patch
    for t in plan.trials:
        rec = manifests[t.steps[-1].key]["records"][0]
        assert rec["stage"] == "backdoored" and 0 <= rec["asr"] <= 100
    # a fresh context (another worker) loads the same resource instead of recomputing it
    ctx2 = Context(Store(str(tmp_path)))
    assert torch.equal(ctx2.attack(plan.trials[1].steps[0]).patch, patch) and pattern_attack.made == 1
    assert len(ds.train) == 10000


def test_attack_without_its_resource_refuses_to_poison(pattern_attack, embedded):
    from tscray.attacks import build, poison_test, poison_train
    atk = build("test-pattern")
    with pytest.raises(RuntimeError, match="resource"):
        poison_train(embedded.train, atk, 0.1, 0)
    with pytest.raises(RuntimeError, match="resource"):
        poison_test(embedded.test, atk, 0)
    atk.prepare(embedded, 0.1, 0, seed=3)
    assert atk.ready and pattern_attack.made == 1
    atk.prepare(embedded, 0.1, 0, seed=3)
    assert pattern_attack.made == 1


def test_data_kw_reaches_the_steps_and_leaves_other_keys_alone(tmp_path):
    torch.set_num_threads(1)
    plain = make_plan(spec_of(defense=["none"]))
    raw_spec = spec_of(defense=["none"])
    import dataclasses
    small = dataclasses.replace(raw_spec, data_kw={"fashion-mnist-embedded": {"train_per_class": 50,
                                                                             "test_per_class": 10}})
    plan = make_plan(small)
    (bd,) = [s for s in plan.steps.values() if s.kind == "backdoor"]
    assert bd.params["data_kw"] == {"train_per_class": 50, "test_per_class": 10}
    assert "data_kw" not in [s for s in plain.steps.values() if s.kind == "backdoor"][0].params
    ctx = Context(Store(str(tmp_path)))
    run_local([bd], ctx)
    ev = ctx.evaluator(bd)
    assert len(ev.clean) == 100  # the 10-per-class test set was used


# --- defenses as plug-ins ---------------------------------------------------------------------------------

def test_default_plan_runs_a_defense_as_one_step_equal_to_its_library_run(tmp_path):
    """finetune declares no planner: its trial is one ``defense`` step computing exactly ``finetune.run``."""
    torch.set_num_threads(1)
    trial = make_plan(spec_of(defense=["finetune"])).trials[0]
    assert [s.step.kind for s in trial.chain] == ["backdoor", "defense"]
    ctx = Context(Store(str(tmp_path)))
    run_local(trial.steps, ctx)
    final = ctx.store.load_tensors("defense", trial.final.key, "model")
    bd = ctx.load_model(trial.steps[0], "model")
    ft = defenses.get("finetune")
    res = ft.run(bd, ctx.clean({"dataset": "fashion-mnist-embedded"}, 0.02, 0), methods.build("supervised"),
                 ft.make_config("paper", epochs=1, batch_size=100))
    for k, v in res.model.state_dict().items():
        assert torch.equal(final[k], v), k


@pytest.fixture
def plugin_defense():
    """A defense written as one would add a new one: a config with a preset, a run, a result column, a
    model check. Nothing else in tscray knows it."""
    import copy
    from dataclasses import dataclass

    from tscray.defenses.base import DEFENSES, Defense, DefenseResult
    from tscray.defenses.layers import UnsupportedModel, classifier

    @dataclass(frozen=True)
    class ZeroHeadConfig:
        scale: float = 0.0
        seed: int = 0

        def __post_init__(self):
            if self.scale < 0:
                raise ValueError(f"scale must be >= 0, got {self.scale}")

        @classmethod
        def preset(cls, name="paper"):
            return cls()

    def run(model, clean, method, cfg, evaluate=None, log=None):
        out = copy.deepcopy(model)
        with torch.no_grad():
            classifier(out).module.weight.mul_(cfg.scale)
        rec = {"stage": "final", "round": 1, "zh_scaled": 1, **(evaluate(out) if evaluate else {})}
        return DefenseResult(out, [out], [rec])

    def check(model):
        if model.__class__.__name__ == "MLP":
            raise UnsupportedModel("zero-head refuses the mlp (test)")

    DEFENSES.register("zero-head")(Defense("zero-head", ZeroHeadConfig, run, columns={"zh_scaled": "int"},
                                           check_model=check, summary="test plug-in"))
    yield
    del DEFENSES._items["zero-head"]


def test_a_defense_added_in_one_place_is_validated_planned_computed_and_reported(plugin_defense, tmp_path):
    from tscray import results
    from tscray.config import SpecError
    from tscray.plan import Trial

    with pytest.raises(SpecError, match=r"defense.zero-head: scale must be >= 0"):
        validate({"name": "t", "grid": {"defense": ["zero-head"]}, "defense": {"zero-head": {"scale": -1.0}}})
    with pytest.raises(SpecError, match=r"grid.defense\[0\]: zero-head cannot purify arch 'mlp'"):
        validate({"name": "t", "grid": {"defense": ["zero-head"], "arch": ["mlp"]}})
    spec = validate({"name": "t", "grid": {"defense": ["zero-head", "none"], "t": [0.3, 0.4], "rounds": [1, 2]},
                     "train": {"epochs": 1, "batch_size": 256, "arch_kw": {"widths": [8, 8, 8, 8]}},
                     "defense": {"clean_ratio": 0.02, "zero-head": {"scale": 0.5}}})
    plan = make_plan(spec)
    assert sorted(t.params["defense"] for t in plan.trials) == ["none", "zero-head"]  # t, rounds collapse
    trial = [t for t in plan.trials if t.params["defense"] == "zero-head"][0]
    assert Trial.from_dict(trial.to_dict()) == trial
    ctx = Context(Store(str(tmp_path)))
    manifests = run_local(trial.steps, ctx)
    rows = results.trial_rows("t", trial, manifests)
    final = [r for r in rows if r["stage"] == "final"]
    assert len(final) == 1 and final[0]["zh_scaled"] == 1 and final[0]["defense"] == "zero-head"
    assert '"scale":0.5' in final[0]["defense_config"] and final[0]["defense_seconds"] >= 0
    results.write_trial(ctx.store, trial.id, rows)
    table = results.read(ctx.store)
    assert "zh_scaled" in table.column_names and table.num_rows == len(rows)


def _reference_points(spec):
    """Grid points the plain way: the whole product of each block, irrelevant axes dropped, the first
    occurrence of each point kept (a set of every point seen)."""
    import itertools

    from tscray.config import DEFENSE_AXES, GRID_AXES
    from tscray.defenses import DEFENSES
    from tscray.plan import axis_applies

    seen, out = set(), []
    for g in spec.grids or (spec.grid,):
        names = (*GRID_AXES, *(p for p, _ in g.field_axes))
        for combo in itertools.product(*[getattr(g, a) for a in GRID_AXES], *[vs for _, vs in g.field_axes]):
            d = combo[names.index("defense")]
            used = DEFENSES.get(d).axes if d != "none" else ()
            kept = tuple((a, v) for a, v in zip(names, combo)
                         if not ((a in DEFENSE_AXES and a not in used) or ("." in a and not axis_applies(a, d))))
            if kept not in seen:
                seen.add(kept)
                out.append(dict(kept))
    return out


SHAPES = {
    "field axes": {"grid": {"attack": ["badnets", "lc"], "defense": ["none", "tsc", "mcr", "fp", "finetune"],
                            "rounds": [1, 2], "t": [0.3, 0.5], "seed": [0, 1], "defense.clean_ratio": [0.05, 0.1],
                            "train.epochs": [2, 3], "defense.tsc.curve_epochs": [3, 4]}},
    "overlapping blocks": {"grid": [
        {"attack": ["badnets"], "defense": ["none", "tsc"], "rounds": [1], "t": [0.5], "train.epochs": [2, 3]},
        {"attack": ["badnets"], "defense": ["none", "fp"], "train.epochs": [3, 4], "defense.clean_ratio": [0.05, 0.1]},
        {"attack": ["badnets", "blended"], "defense": ["fp", "tsc"], "defense.clean_ratio": [0.05, 0.1],
         "rounds": [1, 2], "t": [0.5, 0.3]}]},
    "figure 5": {"grid": {"attack": ["badnets", "blended"], "defense": ["tsc"], "rounds": [1, 2, 3],
                          "t": [0.1, 0.3, 0.5], "seed": [0, 1, 2]}},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_points_skip_collapsed_and_repeated_points_without_keeping_them(shape):
    spec = validate({"name": "s", **SHAPES[shape]}, check_data=False)
    from tscray.plan import grid_points, iter_points

    assert grid_points(spec) == _reference_points(spec)
    assert sorted(map(repr, iter_points(spec, root_major=True))) == sorted(map(repr, grid_points(spec)))


SHAPES["a group's first point in an earlier block"] = {  # (a group must start at its first point kept)
    "grid": [{"defense": ["none", "tsc"], "seed": [0, 1, 2, 3], "rounds": [1], "t": [0.5]},
             {"defense": ["none", "fp"], "seed": [0, 1, 2, 3]}]}
SHAPES["shared resources"] = {  # LC's resource is shared by poison rates and seeds: above several backdoor steps
    "grid": {"attack": ["lc", "narcissus", "badnets"], "poison_rate": [0.05, 0.1], "seed": [0, 1, 2],
             "defense": ["none", "tsc", "nc"], "rounds": [1, 2], "t": [0.3, 0.5], "train.epochs": [2, 3]}}


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_streaming_dry_run_counts_what_the_full_plan_holds(shape, workers):
    """`--dry-run` plans trial by trial, dropping its caches between backdoored models, split over forked
    workers by backdoor step: its counts must equal the materialised plan's (distinct steps by key, naive
    per-trial steps, finished trials)."""
    from tscray.plan import summarize
    from tscray.sweep import describe_plan

    spec = validate({"name": "s", **SHAPES[shape]}, check_data=False)
    plan = make_plan(spec)
    done = {t.id for t in plan.trials[::3]} | {"not-a-trial"}
    assert summarize(spec, done, workers=workers) == plan.summary(done)
    assert summarize(spec, workers=workers).finished is None
    assert describe_plan(summarize(spec, done, workers=workers)) == describe_plan(plan, done)
    assert summarize(spec).counts == plan.count_by_kind() and sum(plan.count_by_kind().values()) == len(plan.steps)


def test_a_trials_settings_are_its_resolved_defense_config():
    import json

    spec = validate({"name": "s", **SHAPES["field axes"]}, check_data=False)
    for trial in make_plan(spec).trials:
        p = trial.params
        if p["defense"] == "none":
            continue
        cfg = spec.with_fields({k: v for k, v in p.items() if "." in k}).defense.config(
            p["defense"], seed=p["seed"], **{a: p[a] for a in defenses.get(p["defense"]).axes})
        from tscray.defenses.base import config_to_dict
        assert json.loads(trial.settings) == json.loads(json.dumps(config_to_dict(cfg)))


@pytest.mark.parametrize("sweep,digest", [("quickstart", "1afd26b2a735ccdb"), ("table1_small", "d13715efc745baca"),
                                          ("ablation", "e795041bea38a28c")])
def test_shipped_sweeps_keep_their_step_keys_and_trial_ids(sweep, digest):
    """Keys and ids are how a store is resumed: a planning change that alters them silently recomputes every
    user's finished work. Changing them on purpose means bumping STEP_VERSION (every step) or a defense's or
    attack's ``version`` (its steps and what depends on them), and these digests."""
    import hashlib
    from pathlib import Path

    from tscray.config import load_spec

    plan = make_plan(load_spec(str(Path(__file__).parents[1] / "sweeps" / f"{sweep}.yaml"), check_data=False))
    text = "\n".join(sorted(plan.steps)) + "|" + "\n".join(sorted(t.id for t in plan.trials))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest


def _keys_by_kind(plan):
    out = {}
    for k, step in plan.steps.items():
        out.setdefault(step.kind, set()).add(k)
    return out


def test_a_plugin_version_recomputes_its_own_steps_and_what_depends_on_them_only(monkeypatch):
    """A defense's or attack's ``version`` above 1 enters its steps' keys: a store upgraded across a change
    of what TSC computes recomputes TSC's steps, not the backdoored models or the other defenses'."""
    import dataclasses
    from pathlib import Path

    from tscray import attacks
    from tscray.config import load_spec

    spec = load_spec(str(Path(__file__).parents[1] / "sweeps" / "quickstart.yaml"), check_data=False)
    before = _keys_by_kind(make_plan(spec))
    tsc = defenses.DEFENSES.get("tsc")
    monkeypatch.setitem(defenses.DEFENSES._items, "tsc", dataclasses.replace(tsc, version=tsc.version + 1))
    after = _keys_by_kind(make_plan(spec))
    assert after["backdoor"] == before["backdoor"] and after["mcr_curve"] == before["mcr_curve"]
    assert after["mcr_point"] == before["mcr_point"]
    for kind in ("tsc_stage1", "tsc_round"):
        assert len(after[kind]) == len(before[kind]) and not after[kind] & before[kind], kind
    monkeypatch.setattr(attacks.ATTACKS.get("badnets"), "version", 2)
    bumped = _keys_by_kind(make_plan(spec))
    assert all(not bumped[k] & after[k] for k in after), "every step sits on the backdoored model"


def _two_trial_spec(tmp_path):
    """A two-trial spec (TSC and none) written to disk, its plan, and the store its storage names."""
    import yaml

    from tscray.config import load_spec

    raw = {"name": "t", "storage": str(tmp_path / "s"), "grid": {"defense": ["tsc", "none"], "rounds": [1], "t": [0.4]},
           "defense": {"tsc": {"curve_epochs": 2}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path, make_plan(load_spec(str(path), check_data=False)), Store(str(tmp_path / "s"))


def test_the_dry_run_counts_a_trial_finished_only_with_its_planned_final_step(tmp_path, capsys):
    """A results file written under other settings (same grid point, other curve_epochs) is not finished for
    this spec: ``--dry-run`` said so before the sweep set it aside, and counted it finished."""
    import yaml

    from tscray import results
    from tscray.cli import main
    from tscray.config import load_spec

    raw, path, plan, store = _two_trial_spec(tmp_path)
    store.write_json("sweep.json", {"spec": raw, "sweep_id": "x", "trials": 2, "steps": 3})
    for t in plan.trials:
        results.write_trial(store, t.id, [{"trial_id": t.id, "step_key": t.final.key, "stage": "final"}])

    def finished() -> str:
        assert main(["sweep", str(path), "--dry-run"]) == 0
        return capsys.readouterr().out.splitlines()[0]

    assert finished() == "sweep t: 2 trials (2 already finished)"
    raw["defense"]["tsc"]["curve_epochs"] = 3  # TSC's trial now plans other steps; the undefended one is unchanged
    path.write_text(yaml.safe_dump(raw))
    assert finished() == "sweep t: 2 trials (1 already finished)"
    fresh = make_plan(load_spec(str(path), check_data=False))
    assert sum(results.is_finished(results.finished_steps(store), t) for t in fresh.trials) == 1
    assert sum(results.is_finished(results.done_trials(store), t) for t in fresh.trials) == 2  # by id alone


def test_the_dry_run_counts_result_files_copied_into_a_storage_without_a_sweep_json(tmp_path, capsys):
    """docs/fidelity ships each study's result files to copy into a fresh storage before resuming; the sweep
    then skips those trials, but ``--dry-run`` counted none finished until a sweep had written sweep.json."""
    from tscray import results
    from tscray.cli import main

    _, path, plan, store = _two_trial_spec(tmp_path)
    t = plan.trials[0]
    results.write_trial(store, t.id, [{"trial_id": t.id, "step_key": t.final.key, "stage": "final"}])
    assert not store.exists("sweep.json")
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "sweep t: 2 trials (1 already finished)"
    assert not store.exists("sweep.json")  # a dry run writes nothing


# --- planning at scale: the fast paths make what the plain ones make ------------------------------------

def test_steps_over_a_shared_base_have_the_keys_of_their_plain_params():
    """Step.make over a ``base`` dict (a precomputed template while planning) gives the params JSON and
    key that serialising ``{**base, **own}`` gives, whatever the own values' types and whichever base
    keys they override."""
    import random

    from tscray.plan import Step, _planning

    rng = random.Random(0)
    values = [0, 1, -7, True, False, None, 0.5, -0.0, 1e-300, float("nan"), float("inf"), "x", 'q"u\\o\u00e9', "",
              [1, "a"], (2.5,), {"z": 1, "a": [None]}, {}, 10**30]
    inputs = (Step("backdoor", '{"seed":0}'), Step("attack_resource", "{}"))
    for _ in range(300):
        base = {k: rng.choice(values) for k in rng.sample(["a", "config", "m", "round", "zz", "é"], rng.randint(0, 6))}
        own = {k: rng.choice(values) for k in rng.sample(["a", "b", "input", "round", "t", "zzz"], rng.randint(0, 4))}
        ins = inputs[: rng.randint(0, 2)]
        plain = Step("k", Step.make("k", {**base, **own}).params_json, ins)
        with _planning():
            fast = Step.make("k", own, ins, base=base)
            again = Step.make("k", dict(own), ins, base=base)
        assert fast.params_json == plain.params_json and fast.key == plain.key, (base, own)
        assert again is fast


def test_configs_convert_to_the_dicts_dataclasses_asdict_gives():
    import dataclasses

    from tscray.defenses import DEFENSES
    from tscray.defenses.base import config_to_dict

    def asdict_keyed(obj):  # asdict, less the fields a config added later while they are unset
        late = getattr(type(obj), "LATE_FIELDS", ())
        return {f.name: (asdict_keyed(v) if dataclasses.is_dataclass(v) else dataclasses.asdict(obj)[f.name])
                for f in dataclasses.fields(obj) if (v := getattr(obj, f.name)) is not None or f.name not in late}

    for name in DEFENSES:
        for preset in ("paper", "released") if name == "tsc" else ("paper",):
            cfg = DEFENSES.get(name).make_config(preset)
            out = config_to_dict(cfg)
            assert out == asdict_keyed(cfg) and repr(out) == repr(asdict_keyed(cfg)), name

    # a plugin's config may hold any container asdict handles: namedtuples, container subclasses
    import collections

    @dataclasses.dataclass(frozen=True)
    class Inner:
        x: int = 1

    class Names(list):
        pass
    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass(frozen=True)
    class Plugin:
        pair: Pair = Pair(Inner(), (Inner(), 2.5))
        ordered: collections.OrderedDict = dataclasses.field(
            default_factory=lambda: collections.OrderedDict(z=Inner(), a=[Inner()]))
        names: Names = dataclasses.field(default_factory=lambda: Names([Inner(), "n"]))
        other: frozenset = frozenset({1, 2})
    out, ref = config_to_dict(Plugin()), dataclasses.asdict(Plugin())
    assert out == ref and repr(out) == repr(ref) and type(out["names"]) is Names
