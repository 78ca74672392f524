"""A worker's resident state (tscray.steps.Context): what it caches must be keyed by everything it is built from."""

from tscray.config import validate
from tscray.plan import make_plan
from tscray.steps import Context
from tscray.store import Store


def _backdoor_steps(raw):
    return [s for s in make_plan(validate(raw)).steps.values() if s.kind == "backdoor"]


def test_evaluators_of_models_on_other_load_options_are_not_shared(tmp_path):
    """Two backdoored models that differ only in the data's image_size got one triggered test set: the first
    one a worker built (28 px for both, so the 32 px model was scored on the wrong images)."""
    base = {"name": "e", "grid": {"defense": ["none"]}, "train": {"epochs": 1}}
    (plain,) = _backdoor_steps(base)
    (big,) = _backdoor_steps({**base, "data_kw": {"fashion-mnist-embedded": {"image_size": 32}}})
    ctx = Context(Store(str(tmp_path)))
    a, b = ctx.evaluator(plain), ctx.evaluator(big)
    assert a is not b
    assert a.poisoned.x.shape[-1] == 28 and b.poisoned.x.shape[-1] == 32
    assert ctx.evaluator(plain) is a  # still cached


def test_encoder_probes_of_other_probe_settings_are_not_shared(tmp_path):
    """A self-supervised model's evaluator is a linear probe trained with the spec's ssl settings: a second
    spec (or an ssl field axis) with more probe epochs got the first one's probe, same dataset and attack."""
    from tests.ssl.test_ssl_sweep import ssl_raw

    raw = ssl_raw(attack=["badencoder"], defense=["none"])
    (short,) = _backdoor_steps(raw)
    (long,) = _backdoor_steps({**raw, "ssl": {**raw["ssl"], "probe_epochs": 5}})
    assert short.key != long.key and [i.key for i in short.inputs] == [i.key for i in long.inputs]
    ctx = Context(Store(str(tmp_path)))
    a, b = ctx.evaluator(short), ctx.evaluator(long)
    assert a is not b and (a.epochs, b.epochs) == (2, 5)
