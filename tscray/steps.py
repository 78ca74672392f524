"""Computing one step of a plan: pure functions over the library, no Ray.

:class:`Context` holds what a worker keeps resident (datasets, triggered test sets, clean
subsets, the device); :func:`compute` runs a step whose inputs are already in the store and
writes its artifacts and manifest. :func:`run_local` computes a whole chain in-process, which is
how the algorithmic parts are tested without Ray; the Ray layer calls the same :func:`compute`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tscray import attacks, data, data_record, defenses, methods, models
from tscray.curves import BezierCurve
from tscray.defenses.base import CleanData, config_from_dict
from tscray.optim import OptimConfig
from tscray.plan import Step, root_params, root_step
from tscray.store import Store


class Context:
    """What a worker keeps resident between steps: datasets, evaluators, clean subsets, device."""

    def __init__(self, store: Store, device: str = "cpu", data_root: str | None = None,
                 precision: str = "auto", channels_last: bool | str = "auto", eval_batch: int = 512) -> None:
        self.store, self.device, self.data_root = store, device, data_root
        self.eval_batch = eval_batch
        cuda = device.startswith("cuda")
        self.precision = ("bf16" if cuda else "fp32") if precision == "auto" else precision
        # auto: CUDA only; True/"on": CPU too (mkldnn's NHWC kernels: 1.3x the cnn's training step here)
        self.channels_last = cuda if channels_last == "auto" else channels_last in (True, "on")
        self._cache: dict[Any, Any] = {}

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def dataset(self, name: str, kw: dict[str, Any] | None = None) -> data.Dataset:
        """Dataset ``name`` loaded with options ``kw`` (e.g. ``image_size``), kept resident."""
        kw = kw or {}

        def make() -> data.Dataset:
            data_record.verify(self.store, name)  # (a node's stale copy of the user's data is refused)
            return data.load(name, self.data_root, **kw)
        return self._cached(("ds", name, repr(sorted(kw.items()))), make)

    def method(self, bd: Step) -> methods.Method:
        """The training method F of the backdoor step ``bd``'s model (what defenses re-use on clean data)."""
        p = bd.params
        name = p.get("method", "supervised")
        kw = dict(p.get("method_kw", {}))
        if name == "simclr":  # its views jitter colours in pixel space: it needs the dataset's normalisation
            prep = self.dataset(p["dataset"], p.get("data_kw")).prep
            kw = {"mean": prep.mean, "std": prep.std, **kw}
        return methods.build(name, **kw)

    def attack(self, bd: Step) -> attacks.Attack:
        """The backdoor step's attack, with its resource loaded from the store when it has one."""
        def make() -> attacks.Attack:
            p = bd.params
            atk = attacks.build(p["attack"], **p["attack_kw"])
            for f in atk.files():  # (a node's stale copy of a pattern is refused, as of the data)
                data_record.verify(self.store, str(f.expanduser().resolve()))
            for res in bd.inputs:
                if res.kind == "attack_resource":
                    atk.load_resource(self.store.load_tensors(res.kind, res.key, "resource"))
            return atk
        return self._cached(("attack", bd.key), make)

    def evaluator(self, bd: Step) -> Callable[[nn.Module], dict[str, float]]:
        """ACC/ASR evaluator of the backdoor step ``bd``: its attack's triggered test set, or for an encoder
        a linear probe on the downstream task."""
        def make() -> Callable[[nn.Module], dict[str, float]]:
            p = bd.params
            if p.get("method", "supervised") != "supervised":
                return self._probe(p)
            ev = attacks.evaluator(self.dataset(p["dataset"], p.get("data_kw")), self.attack(bd), p["target"])
            ev.batch_size = self.eval_batch
            return ev
        p = bd.params
        # everything the evaluator is built from: the data's load options (an image_size axis), and for an
        # encoder the probe's settings and seed (a second spec's probe_epochs got the first one's probe)
        key: tuple[Any, ...] = ("ev", p["dataset"], repr(p.get("data_kw")), p["attack"], repr(p["attack_kw"]), p["target"],
               tuple(i.key for i in bd.inputs))
        if p.get("method", "supervised") != "supervised":
            key += (p.get("method"), repr(p.get("ssl")), p.get("seed"))
        return self._cached(key, make)

    def _probe(self, p: dict[str, Any]) -> Callable[[nn.Module], dict[str, float]]:
        from tscray.ssl import ProbeEvaluator, add_target_class
        from tscray.ssl import attacks as ssl_attacks

        pre = self.dataset(p["dataset"], p.get("data_kw"))
        s = p["ssl"]
        down = self.dataset(s["downstream"], s.get("downstream_kw")) if s["downstream"] else pre
        train, test, target = down.train, down.test, p["target"]
        if not bool((test.y == target).any()) or target >= down.num_classes:
            # the downstream task lacks the target class: add the pre-training set's (Tables 18-19)
            train, target = add_target_class(train, pre.train, p["target"])
            test, _ = add_target_class(test, pre.test, p["target"], label=target)
        trigger = ssl_attacks.build(p["attack"], **p["attack_kw"]).trigger()
        return ProbeEvaluator(train, test, pre.prep, trigger=trigger, target=target, epochs=s["probe_epochs"],
                              lr=s["probe_lr"], probe_batch_size=s["probe_batch_size"], knn_k=s["knn_k"],
                              seed=p["seed"], batch_size=self.eval_batch)

    def clean(self, root: dict[str, Any], ratio: float, seed: int, balanced: bool = False) -> CleanData:
        """The defender's clean subset of the training set of ``root``'s dataset (class-balanced if asked)."""
        def make() -> CleanData:
            ds = self.dataset(root["dataset"], root.get("data_kw"))
            idx = (data.balanced_clean_subset(ds.train.y, ratio, seed) if balanced
                   else data.clean_subset(len(ds.train), ratio, seed))
            return CleanData(ds.train.subset(idx), ds.prep, self.device)
        return self._cached(("clean", root["dataset"], repr(root.get("data_kw")), ratio, seed, balanced), make)

    def new_model(self, p: dict[str, Any]) -> nn.Module:
        ds = self.dataset(p["dataset"], p.get("data_kw"))
        return models.build(p["arch"], ds.num_classes, ds.in_channels, input_hw=ds.input_hw, **p["arch_kw"])

    def load_model(self, step: Step, artifact: str) -> nn.Module:
        model = self.new_model(step.params if step.kind == "ssl_pretrain" else root_params(step))
        model.load_state_dict(self.store.load_tensors(step.kind, step.key, artifact))
        return self.place(model)

    def place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit memory_format
        return model

    @staticmethod
    def state(model: nn.Module) -> dict[str, torch.Tensor]:
        """A model's state as contiguous tensors, ready to store."""
        return {k: v.contiguous() for k, v in model.state_dict().items()}

    def load_curve(self, step: Step, start: nn.Module, end: nn.Module) -> BezierCurve:
        """The curve between ``start`` and ``end`` whose bend step ``step`` stored."""
        return BezierCurve(start, end).load_bend(self.store.load_tensors(step.kind, step.key, "bend"))

    def defense_env(self, step: Step) -> tuple[CleanData, methods.Method, Callable[[nn.Module], dict[str, float]]]:
        """What a defense step works with: the defender's clean subset (``clean_ratio``/``clean_seed`` of
        the step's params), the backdoored model's training method F, and its ACC/ASR evaluator."""
        root, p = root_step(step), step.params
        clean = self.clean(root.params, p["clean_ratio"], p["clean_seed"], bool(p.get("clean_balanced", False)))
        return clean, self.method(root), self.evaluator(root)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.precision == "bf16":
            with torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16):
                yield
        else:
            yield


def _records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in r.items()}
            for r in rows]


# ------------------------------------------------------------------ step kinds
# Each returns (tensors to store, records); records are evaluated models, one dict each.

Result = tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]


_state = Context.state


def step_attack_resource(step: Step, ctx: Context) -> Result:
    p = step.params
    atk = attacks.build(p["attack"], **p["attack_kw"])
    rate = p["rate"] if p["rate"] is not None else 0.0
    tensors = atk.make_resource(ctx.dataset(p["dataset"], p.get("data_kw")), rate, p["target"], p["seed"], ctx.device)
    return {"resource": {k: v.detach().contiguous() for k, v in tensors.items()}}, []


def _pretrain_recipe(p: dict[str, Any]) -> Any:
    from tscray.ssl.attacks import PretrainRecipe
    return PretrainRecipe(p["epochs"], p["batch_size"],
                          OptimConfig(name=p["optimizer"], lr=p["lr"], weight_decay=p["weight_decay"]))


def step_ssl_pretrain(step: Step, ctx: Context) -> Result:
    from tscray.ssl.attacks import pretrain

    p = step.params
    ds = ctx.dataset(p["dataset"], p.get("data_kw"))
    model = ctx.place(ctx.new_model(p))
    pretrain(model, ds.train, ds, ctx.method(step), _pretrain_recipe(p), p["seed"], ctx.device)
    return {"model": _state(model)}, []


def step_ssl_backdoor(step: Step, ctx: Context) -> Result:
    from tscray.ssl import attacks as ssl_attacks

    p = step.params
    ds = ctx.dataset(p["dataset"], p.get("data_kw"))
    atk = ssl_attacks.build(p["attack"], **p["attack_kw"])
    model = ctx.load_model(step.inputs[0], "model") if atk.needs_clean_encoder else ctx.place(ctx.new_model(p))
    bd = atk.backdoor(ds, model, ctx.method(step), _pretrain_recipe(p), p["poison_rate"], p["target"], p["seed"],
                      ctx.device)
    return {"model": _state(bd)}, [{"stage": "backdoored", "t_curve": None, **ctx.evaluator(step)(bd)}]


def step_backdoor(step: Step, ctx: Context) -> Result:
    p = step.params
    if p.get("method", "supervised") != "supervised":
        return step_ssl_backdoor(step, ctx)
    ds = ctx.dataset(p["dataset"], p.get("data_kw"))
    atk = ctx.attack(step)
    recipe = attacks.TrainRecipe(p["epochs"], p["batch_size"],
                                 OptimConfig(lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"]))
    bd = attacks.train_backdoored(ds, p["arch"], atk, p["poison_rate"], p["target"], p["seed"], recipe,
                                  ctx.device, p["arch_kw"], channels_last=ctx.channels_last)
    ev = ctx.evaluator(step)
    return {"model": _state(bd.model)}, [{"stage": "backdoored", "t_curve": None, **ev(bd.model)}]


def step_defense(step: Step, ctx: Context) -> Result:
    """A whole defense in one step (the default plan): its library ``run`` on the backdoored model."""
    p, (bd,) = step.params, step.inputs
    d = defenses.get(p["defense"])
    cfg = config_from_dict(d.config, p["config"])
    clean, method, evaluate = ctx.defense_env(step)
    res = d.run(ctx.load_model(bd, "model"), clean, method, cfg, evaluate)
    rows = [{k: v for k, v in r.items() if k != "defense"} for r in res.records]
    if not any(r.get("stage") == "final" for r in rows):
        rows.append({"stage": "final", "t_curve": None, **evaluate(res.model)})
    return {"model": _state(res.model)}, rows


BASE_KINDS: dict[str, Callable[[Step, Context], Result]] = {
    "attack_resource": step_attack_resource, "ssl_pretrain": step_ssl_pretrain, "backdoor": step_backdoor,
    "defense": step_defense,
}


def kinds() -> dict[str, Callable[[Step, Context], Result]]:
    """Every step kind: the base ones and those the registered defenses' planners declare."""
    out = dict(BASE_KINDS)
    for d in defenses.DEFENSES.values():
        if d.plan is not None:
            out.update(d.plan.kinds)
    return out


def compute(step: Step, ctx: Context) -> dict[str, Any]:
    """Compute ``step`` (inputs must exist in the store), write it, return its manifest. Idempotent:
    a step already in the store is returned as is, unless its artifacts fail their hash check (then it is
    moved to quarantine/ and computed again)."""
    if ctx.store.has_step(step.kind, step.key):
        problem = ctx.store.check_step(step.kind, step.key)
        if problem is None:
            return ctx.store.manifest(step.kind, step.key)
        ctx.store.quarantine_step(step.kind, step.key, problem)  # damaged: set aside and computed again
    for i in step.inputs:
        if not ctx.store.has_step(i.kind, i.key):
            raise RuntimeError(f"step {step.kind}/{step.key}: input {i.kind}/{i.key} is not computed")
    seed = step.params.get("seed", 0) if step.kind in ("backdoor", "attack_resource", "ssl_pretrain") else 0
    torch.manual_seed(seed)
    t0 = time.time()
    with ctx.autocast():
        tensors, records = kinds()[step.kind](step, ctx)
    seconds = time.time() - t0
    cid = uuid.uuid4().hex
    manifest = {"records": _records(records), "computation": cid, "seconds": seconds, "device": ctx.device, "threads": torch.get_num_threads(),
                "precision": ctx.precision, "channels_last": ctx.channels_last, "params": step.params, "inputs": [i.key for i in step.inputs]}
    manifest = ctx.store.put_step(step.kind, step.key, tensors, manifest)
    ctx.store.log_computation(step.kind, step.key, seconds, ctx.device, cid)
    return manifest


def run_local(steps: list[Step], ctx: Context) -> dict[str, dict[str, Any]]:
    """Compute steps and all their inputs in-process, in dependency order; returns manifests by key."""
    out: dict[str, dict[str, Any]] = {}
    for s in steps:
        for a in s.walk():
            if a.key not in out:
                out[a.key] = compute(a, ctx)
    return out


__all__ = ["BASE_KINDS", "Context", "compute", "kinds", "root_params", "root_step", "run_local"]
