import pyarrow.fs as pafs
import pytest
import torch

from tscray.store import Store


@pytest.mark.parametrize("kind", ["local", "object"])
def test_steps_exist_only_once_their_manifest_is_written(tmp_path, kind):
    store = Store(str(tmp_path / "s")) if kind == "local" else Store("bucket/sweep", pafs._MockFileSystem())
    assert not store.local or kind == "local"
    assert not store.has_step("backdoor", "k1")
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    m = store.put_step("backdoor", "k1", {"model": state}, {"records": [{"acc": 1.0}]})
    assert store.has_step("backdoor", "k1") and m["artifacts"] == ["model"]
    assert store.manifest("backdoor", "k1")["records"] == [{"acc": 1.0}]
    back = store.load_tensors("backdoor", "k1", "model")
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["n"], state["n"])
    store.log_computation("backdoor", "k1", 1.0, "cpu")
    store.log_computation("backdoor", "k1", 1.0, "cpu")
    assert store.computations() == {"k1": 2}
    assert store.step_keys() == {"backdoor": ["k1"]}


def test_a_driver_killed_between_manifest_and_event_still_counts_its_computation(tmp_path, monkeypatch):
    """CI flake, issue 14's S3 kill test: the kill landed after a step's manifest (the step exists, a resume
    reuses it) but before its computation event, so `computations()` forgot a computed step."""
    from tscray import steps
    from tscray.config import validate
    from tscray.plan import make_plan

    spec = validate({"name": "k", "grid": {"dataset": ["fashion-mnist-embedded"], "arch": ["mlp"], "defense": ["none"]},
                     "train": {"epochs": 1, "batch_size": 256, "arch_kw": {"hidden": [16]}}})
    ctx = steps.Context(Store(str(tmp_path / "s")))
    step = make_plan(spec).trials[0].steps[0]

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between the manifest and the event")
    monkeypatch.setattr(Store, "log_computation", killed)
    with pytest.raises(KeyboardInterrupt):
        steps.compute(step, ctx)
    monkeypatch.undo()
    assert ctx.store.has_step(step.kind, step.key)
    assert ctx.store.computations() == {step.key: 1}
    steps.compute(step, ctx)  # the resume reuses it: still one computation
    assert ctx.store.computations() == {step.key: 1}
    # a second computation of the same key (two drivers racing) is counted even when it too is killed early
    m = ctx.store.manifest(step.kind, step.key)
    ctx.store.log_computation(step.kind, step.key, 1.0, "cpu", m["computation"])
    assert ctx.store.computations() == {step.key: 1}
    ctx.store.put_step(step.kind, step.key, {}, {**m, "computation": "c2"})  # a second driver's: theirs is kept
    assert ctx.store.manifest(step.kind, step.key)["computation"] == m["computation"]
    ctx.store.log_computation(step.kind, step.key, 1.0, "cpu", "c2")  # and its computation is still counted
    assert ctx.store.computations() == {step.key: 2}


def test_artifacts_without_a_manifest_do_not_count(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("steps/tsc_round/k2/point.safetensors", b"partial")
    assert not store.has_step("tsc_round", "k2") and store.step_keys() == {"tsc_round": []}
    assert not list(tmp_path.rglob("*.tmp"))


def test_results_written_by_an_older_schema_still_read(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tscray import results
    store = Store(str(tmp_path))
    # the first tscray's columns (every file since has had them: results.REQUIRED), none of the later ones
    old = pa.table({"sweep": ["s"], "trial_id": ["t1"], "defense": ["tsc"], "attack": ["badnets"], "seed": [0],
                    "round": [3], "stage": ["final"], "acc": [90.0], "asr": [5.0], "step_key": ["k"]})
    buf = io.BytesIO()
    pq.write_table(old, buf)
    store.write_bytes("results/trial-t1.parquet", buf.getvalue())
    table = results.read(store)
    assert table.schema == results.schema() and table.num_rows == 1
    assert table.column("acc").to_pylist() == [90.0] and table.column("sweep_id").to_pylist() == [None]
