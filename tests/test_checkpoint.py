import pickle

import pytest
import torch

from tscray.checkpoint import CheckpointError, load_into, load_state, read_meta, save_model
from tscray.models import build


class Evil:
    """Unpickling this would run code: the loader must refuse it."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_safetensors_roundtrip_keeps_weights_and_metadata(tmp_path):
    m = build("cnn", 10, in_channels=1)
    path = save_model(m, tmp_path / "m.safetensors", arch="cnn", attack="badnets")
    assert read_meta(path)["arch"] == "cnn"
    m2 = load_into(build("cnn", 10, in_channels=1), path)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    assert not list(tmp_path.glob("*.tmp"))


def test_weights_only_state_dict_and_wrappers_load(tmp_path):
    m = build("mlp", 10, in_channels=1)
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "m.pt")
    m2 = load_into(build("mlp", 10, in_channels=1), tmp_path / "m.pt")
    assert torch.equal(m2.head.weight, m.head.weight)


def test_pickled_objects_are_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    torch.save({"model": build("mlp", 10, in_channels=1), "w": torch.zeros(1)}, tmp_path / "whole.pt")
    for name in ("evil.pt", "whole.pt"):
        with pytest.raises(CheckpointError, match="refused|corrupt"):
            load_state(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name,payload", [("bad.safetensors", b"\x00" * 40), ("bad.pt", b"not a zip"),
                                          ("trunc.safetensors", None)])
def test_corrupt_files_give_a_clear_error(tmp_path, name, payload):
    path = tmp_path / name
    if payload is None:
        good = save_model(build("mlp", 10, in_channels=1), tmp_path / "good.safetensors")
        payload = good.read_bytes()[:-100]
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_state(path)


def test_wrong_architecture_names_the_mismatch(tmp_path):
    path = save_model(build("mlp", 10, in_channels=1), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="missing: .*unexpected"):
        load_into(build("cnn", 10, in_channels=1), path)
    with pytest.raises(CheckpointError, match="no such"):
        load_state(tmp_path / "absent.safetensors")


def test_a_missing_checkpoint_is_named_missing_not_corrupt(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    for reader in (read_meta, load_state):
        with pytest.raises(CheckpointError, match=r"m\.safetensors: no such checkpoint file$"):
            reader(tmp_path / "m.safetensors")
        with pytest.raises(CheckpointError, match=r"d\.safetensors: a folder, not a checkpoint file$"):
            reader(tmp_path / "d.safetensors")


def test_purify_checks_its_arguments_before_it_reads_the_model(tmp_path, capsys):
    """An unknown defense, or a setting of another defense, is named even when the model is unreadable."""
    from tscray.cli import main

    (tmp_path / "m.safetensors").write_bytes(b"\x00" * 64)
    for extra, needle in ((["--defense", "magic"], "unknown defense 'magic'"),
                          (["--defense", "fp", "--set", "rho=2"], "rho")):
        assert main(["purify", "--model", str(tmp_path / "m.safetensors"), "--arch", "cnn", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "safetensors" not in err and "\n" not in err, err


def test_a_checkpoint_is_read_by_its_content_not_its_name(tmp_path):
    """`tscray backdoor --out m.pt` wrote safetensors that purify then refused as 'pickled objects beyond
    tensors'; `M.SAFETENSORS` lost its metadata (the suffix check was case-sensitive)."""
    from tscray.checkpoint import save_tensors

    m = build("mlp", 10, in_channels=1)
    for name in ("m.pt", "M.SAFETENSORS"):
        path = save_tensors(m.state_dict(), tmp_path / name, arch="mlp", target=3)
        assert read_meta(path) == {"arch": "mlp", "target": 3}
        assert torch.equal(load_into(build("mlp", 10, in_channels=1), path).head.weight, m.head.weight)


@pytest.mark.parametrize("payload", [b"hello", bytes(range(256)) * 4, b"PK\x03\x04garbage"])
def test_garbage_pt_files_are_one_clear_error(tmp_path, payload):
    """Text or random bytes named .pt failed inside the unpickler with KeyError or IndexError tracebacks."""
    (tmp_path / "x.pt").write_bytes(payload)
    assert read_meta(tmp_path / "x.pt") == {}
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint|refused"):
        load_state(tmp_path / "x.pt")


@pytest.mark.parametrize("meta, msg", [("[1, 2]", "is a JSON list, not an object"), ('"hi"', "JSON str"),
                                       ("{not json", "metadata is not valid JSON")])
def test_metadata_that_is_not_a_json_object_is_named(tmp_path, meta, msg):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"format": "tscray", "meta": meta})
    with pytest.raises(CheckpointError, match=msg):
        read_meta(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_meta(tmp_path / "missing.pt")


def test_weights_that_are_not_finite_are_refused(tmp_path):
    """A model with NaN weights loaded silently, and purify printed ASR 0.00% before and after."""
    m = build("mlp", 10, in_channels=1)
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    path = save_model(m, tmp_path / "m.safetensors", arch="mlp")
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensor.*head.weight"):
        load_into(build("mlp", 10, in_channels=1), path)
