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
    old = pa.table({"sweep": ["s"], "trial_id": ["t1"], "stage": ["final"], "acc": [90.0], "asr": [5.0]})
    buf = io.BytesIO()
    pq.write_table(old, buf)
    store.write_bytes("results/trial-t1.parquet", buf.getvalue())
    table = results.read(store)
    assert table.schema == results.schema() and table.num_rows == 1
    assert table.column("acc").to_pylist() == [90.0] and table.column("sweep_id").to_pylist() == [None]
