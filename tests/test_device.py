"""Device-sensitive code on the device ``--device`` names (cpu by default, so CI exercises every path;
`pytest --device cuda -m device` is the CUDA test mode, and skips cleanly without CUDA). Needs neither Ray
nor MLflow: this is what `benchmarks/gpu_check.sh` runs on a GPU machine.

Covers: every architecture's forward/backward and exact permutation invariance, a derived spec, matching,
curves (endpoints, a bf16 autocast fit step, BatchNorm refresh), the clean loader, every attack's trigger on
device tensors, a tiny backdoor + TSC run, and every defense on a tiny model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCH, randomize

from tscray import attacks, defenses, models
from tscray.curves import BezierCurve, fit_epochs
from tscray.defenses import CleanData
from tscray.methods import build as method
from tscray.optim import OptimConfig
from tscray.symmetry import compose, match, permute, random_permutation

pytestmark = pytest.mark.device

ARCHS = ["mlp", "cnn", "preactresnet18", "resnet18", "vgg19_bn", "simclr-cnn", "torchvision:mobilenet_v2"]
KW = {**TINY_ARCH, "resnet18": {}, "simclr-cnn": {"widths": (8, 8, 16, 16)},
      "torchvision:mobilenet_v2": {"width_mult": 0.25}}


def tol(device: torch.device) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if device.type == "cpu" else {"rtol": 1e-3, "atol": 1e-3}


def tiny(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build(name, 10, in_channels=1, input_hw=(28, 28), **KW.get(name, {}))
    return randomize(model).to(device)


@pytest.mark.parametrize("name", ARCHS)
def test_architectures_train_and_permute_exactly(name: str, device: torch.device) -> None:
    model = tiny(name, device)
    x = torch.randn(4, 1, 28, 28, device=device)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.device.type == device.type for p in model.parameters() if p.requires_grad)
    model.eval()
    moved = permute(model, random_permutation(model, torch.Generator().manual_seed(1))).eval()
    assert next(moved.parameters()).device.type == device.type
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), **tol(device))


def test_matching_recovers_a_permutation(device: torch.device, embedded) -> None:
    torch.manual_seed(0)
    model = models.build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16)).to(device).eval()
    perm = random_permutation(model, torch.Generator().manual_seed(2))
    moved = permute(model, perm)
    loader = CleanData(embedded.train.subset(torch.arange(256)), embedded.prep, device).loader(64, 0, shuffle=False)
    found = match(model, moved, loader, "align")
    back = compose(perm, found)  # the identity where the matching found each unit again
    hits = sum(int((p.cpu() == torch.arange(len(p))).sum()) for p in back.values())
    assert hits == sum(len(p) for p in back.values())


def test_curves_fit_in_bf16_and_refresh_batchnorm(device: torch.device, embedded) -> None:
    a, b = tiny("cnn", device), tiny("cnn", device)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    curve = BezierCurve(a, b).to(device)
    clean = CleanData(embedded.train.subset(torch.arange(64)), embedded.prep, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        losses = fit_epochs(curve, clean.loader(16, 0), method("supervised"), 1, OptimConfig(lr=0.01))
    assert len(losses) == 1 and losses[0] == losses[0]
    start = curve.point(0.0, clean.loader(16, 1, shuffle=False, augment=False))
    for (k, v), w in zip(start.state_dict().items(), a.state_dict().values()):
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, w), k  # the curve's endpoint is the model
    mid = curve.point(0.5, clean.loader(16, 1, shuffle=False, augment=False))
    bn = next(m for m in mid.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.device.type == device.type and torch.isfinite(bn.running_var).all()


def test_the_clean_loader_yields_batches_on_the_device(device: torch.device, embedded) -> None:
    clean = CleanData(embedded.train.subset(torch.arange(40)), embedded.prep, device)
    x, y = next(iter(clean.loader(16, 0)))
    assert x.device.type == y.device.type == device.type and x.shape == (16, 1, 28, 28)


def _resource_free() -> list[str]:
    return [n for n in attacks.ATTACKS.names() if attacks.build(n).resource_params(0.1) is None]


@pytest.mark.parametrize("name", _resource_free())
def test_triggers_apply_to_device_tensors(name: str, device: torch.device, embedded) -> None:
    atk = attacks.build(name)
    x = embedded.test.x[:8].to(device)
    out = atk.apply(x)
    assert out.device.type == device.type and out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


def test_a_tiny_backdoor_and_tsc_round_run_on_the_device(device: torch.device, embedded) -> None:
    from tscray import data

    small = data.load("fashion-mnist-embedded", train_per_class=30, test_per_class=10)
    bd = attacks.train_backdoored(small, "cnn", attacks.build("badnets"), 0.1, 0, 0,
                                  attacks.TrainRecipe(1, 64, OptimConfig(lr=0.05)), device, {"widths": (8, 8, 16, 16)})
    assert next(bd.model.parameters()).device.type == device.type
    clean = CleanData(small.train.subset(torch.arange(60)), small.prep, device)
    tsc = defenses.get("tsc")
    cfg = tsc.make_config("paper", rounds=1, t=0.5, curve_epochs=1, finetune_epochs=1, batch_size=20)
    res = tsc.run(bd.model, clean, method("supervised"), cfg, bd.evaluate)
    after = bd.evaluate(res.model)
    assert 0 <= after["acc"] <= 100 and 0 <= after["asr"] <= 100
    assert next(res.model.parameters()).device.type == device.type


TINY_DEFENSE = {
    "fp": dict(epochs=1, batch_size=16), "nc": dict(reverse_epochs=1, reverse_batches=1, reverse_batch_size=8,
                                                    unlearn_epochs=1, batch_size=16),
    "nad": dict(teacher_epochs=1, epochs=1, batch_size=16), "anp": dict(iterations=2, batch_size=16, log_every=1),
    "i-bau": dict(rounds=1, batch_size=8, fixed_point_steps=2), "ft-sam": dict(epochs=1, batch_size=16),
    "sau": dict(epochs=1, batch_size=16), "fst": dict(epochs=1, batch_size=16), "finetune": dict(epochs=1, batch_size=16),
    "mcr": dict(curve_epochs=1, finetune_epochs=1, batch_size=16), "tsc": dict(rounds=1, curve_epochs=1,
                                                                                finetune_epochs=1, batch_size=16),
}


@pytest.mark.parametrize("name", sorted(TINY_DEFENSE))
def test_every_defense_runs_on_the_device(name: str, device: torch.device, embedded) -> None:
    assert set(TINY_DEFENSE) == set(defenses.DEFENSES.names()), "a new defense needs a tiny setting here"
    model = tiny("cnn", device)
    clean = CleanData(embedded.train.subset(torch.arange(48)), embedded.prep, device)
    d = defenses.get(name)
    res = d.run(model, clean, method("supervised"), d.make_config("paper", **TINY_DEFENSE[name]))
    out = res.model.eval()(torch.zeros(2, 1, 28, 28, device=device))
    assert out.device.type == device.type and out.shape == (2, 10) and torch.isfinite(out).all()


def test_a_tiny_sweep_runs_step_by_step_on_the_device_and_resumes_computing_nothing(device: torch.device,
                                                                                     tmp_path) -> None:
    """What a sweep's shard worker executes (steps.run_local over a trial's steps, on a Context of the
    device), for TSC, a baseline and the undefended model: rows record the device and its precision, the
    stored artifacts load back on the CPU, and a second pass reuses every step."""
    from tscray import results
    from tscray.config import validate
    from tscray.plan import make_plan
    from tscray.steps import Context, run_local
    from tscray.store import Store

    spec = validate({"name": "dev", "storage": str(tmp_path),
                     "grid": {"defense": ["tsc", "fp", "none"], "rounds": [1], "t": [0.5]},
                     "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "arch_kw": {"widths": [8, 8, 16, 16]}},
                     "defense": {"clean_ratio": 0.02, "tsc": {"curve_epochs": 1, "finetune_epochs": 1, "batch_size": 64},
                                 "fp": {"epochs": 1, "batch_size": 64}}})
    plan = make_plan(spec)
    store = Store(str(tmp_path))
    ctx = Context(store, device=str(device))
    for trial in plan.trials:
        results.write_trial(store, trial.id, results.trial_rows(spec.name, trial, run_local(trial.steps, ctx)))
    rows = results.read(store).to_pandas()
    final = rows[rows.stage == "final"]
    assert sorted(final.defense) == ["fp", "none", "tsc"]
    assert final.acc.between(0, 100).all() and final.asr.between(0, 100).all()
    assert set(rows.device) == {str(device)}
    assert set(rows.precision) == {"bf16" if device.type == "cuda" else "fp32"}
    bd = next(s for s in plan.steps.values() if s.kind == "backdoor")
    assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all()
               for t in store.load_tensors("backdoor", bd.key, "model").values())
    before = dict(store.computations())
    for trial in plan.trials:
        run_local(trial.steps, Context(store, device=str(device)))
    assert store.computations() == before
