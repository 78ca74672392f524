import re

import pytest
import yaml

from tscray.cli import main
from tscray.config import SpecError, load_spec, validate
from tscray.attacks import ATTACKS
from tscray.ssl.attacks import SSL_ATTACKS
from tscray.plan import make_plan

GOOD = {"name": "x", "grid": {"t": [0.3, 0.5], "rounds": [1, 2]}}


def problems(raw):
    with pytest.raises(SpecError) as e:
        validate(raw)
    return "\n".join(e.value.problems)


def test_good_spec_and_shipped_sweeps_validate():
    spec = validate(GOOD)
    assert spec.grid.t == (0.3, 0.5) and spec.grid.rounds == (1, 2)
    assert load_spec("sweeps/quickstart.yaml").name == "quickstart"


@pytest.mark.parametrize("raw,needle", [
    ({**GOOD, "bogus": 1}, "bogus: unknown key"),
    ({"name": "x", "grid": {"colour": [1]}}, "grid.colour: unknown key"),
    ({"name": "x", "grid": {"t": [0.3, 1.5]}}, "grid.t[1]: 1.5 is outside (0, 1)"),
    ({"name": "x", "grid": {"t": [0]}}, "grid.t[0]: 0 is outside (0, 1)"),
    ({"name": "x", "grid": {"rounds": [0]}}, "grid.rounds[0]: 0 is outside [1, 1000]"),
    ({"name": "x", "grid": {"rounds": [1.5]}}, "grid.rounds[0]: 1.5 is not an integer"),
    ({"name": "x", "grid": {"poison_rate": [1.2]}}, "grid.poison_rate[0]: 1.2 is outside [0, 1]"),
    ({"name": "x", "grid": {"attack": ["badnetz"]}}, "grid.attack[0]: unknown attack 'badnetz'; allowed: " + ", ".join(sorted(ATTACKS.names() + SSL_ATTACKS.names()))),
    ({"name": "x", "grid": {"arch": ["resnet9"]}}, "unknown architecture 'resnet9'; allowed:"),
    ({"name": "x", "grid": {"dataset": ["mnist"]}}, "unknown dataset 'mnist'; allowed:"),
    ({"name": "x", "grid": {"defense": ["nope"]}}, "unknown defense 'nope'; allowed: "),
        ({"name": "x", "defense": {"nope": {"a": 1}}}, "defense.nope: unknown key; allowed: preset, clean_ratio, clean_seed"),
        ({"name": "x", "defense": {"tsc": [1]}}, "defense.tsc: expected a mapping of settings"),
        ({"name": "x", "defense": {"mcr": {"curve_lr": -1}}}, "defense.mcr: curve_lr: -1 is outside (0, ∞)"),
        ({"name": "x", "defense": {"mcr": {"curve_lrr": 1}}}, "defense.mcr: unknown mcr setting(s) ['curve_lrr']"),
    ({"name": "x", "grid": {"t": []}}, "grid.t: empty list"),
    ({"name": "x", "train": {"epochs": "ten"}}, "train.epochs: 'ten' is not an integer"),
    ({"name": "x", "defense": {"clean_ratio": 0}}, "defense.clean_ratio: 0 is outside (0, 1]"),
    ({"name": "x", "defense": {"preset": "fast"}}, "unknown preset 'fast'"),
    ({"name": "x", "defense": {"tsc": {"curve_epoch": 3}}}, "defense.tsc: unknown tsc setting(s) ['curve_epoch']"),
    ({"name": "x", "defense": {"tsc": {"t": 0.3}}}, "defense.tsc.t: set through the grid axis t"),
    ({"name": "x", "defense": {"tsc": {"seed": 3}}}, "defense.tsc.seed: set through the grid axis seed"),
    ({"name": "x", "defense": {"tsc": {"eval_ts": [0.5]}}}, "defense.tsc.eval_ts: set through eval.curve_ts"),
    # the settings it lists are the ones it takes (rounds, t, seed and eval_ts are refused here)
    ({"name": "x", "defense": {"tsc": {"curve_epoch": 3}}},
     "defense.tsc: unknown tsc setting(s) ['curve_epoch']; allowed: batch_size, curve_batch_size, curve_epochs, "
     "curve_optim, curve_steps, finetune_epochs, finetune_last, finetune_optim, match_batch_size, match_batches, probes, optimiser knobs (curve_lr, "
     "finetune_lr, ...)"),
    ({"name": "x", "defense": {"tsc": {"probes": "post"}}}, "defense.tsc: probes must be one of auto, raw, relu"),
    ({"name": "x", "resources": {"gpus_per_step": -1}}, "resources.gpus_per_step: -1 is outside [0, ∞)"),
    ({"name": "x", "eval": {"curve_ts": [2]}}, "eval.curve_ts[0]: 2 is outside [0, 1]"),
    ({"name": "x", "resources": {"step_threads": {"backdor": 2}}},
     "resources.step_threads: unknown step kind 'backdor'; allowed: attack_resource, backdoor, defense"),
    ({"name": "x", "resources": {"step_threads": {"backdoor": 0}}},
     "resources.step_threads: backdoor: 0 is not an integer >= 1"),
    ({"name": "x", "resources": {"step_threads": [2]}}, "resources.step_threads: [2] is not a mapping"),
    ({"name": "x", "resources": {"channels_last": "sideways"}},
     "resources.channels_last: unknown channels_last 'sideways'; allowed: auto, on, off"),
    ({"name": "a b"}, "name: 'a b' must be"),
    ({"grid": {}}, "name: None must be"),
    ({"name": "x", "grid": {"dataset": ["cifar10"]}, "data_root": "/nonexistent/data"}, "data_root: /nonexistent/data does not exist"),
])
def test_each_bad_input_is_named(raw, needle):
    assert needle in problems(raw)


def test_all_problems_are_reported_at_once():
    text = problems({"name": "x", "grid": {"t": [2], "attack": ["nope"]}, "train": {"lr": -1}})
    assert "grid.t" in text and "grid.attack" in text and "train.lr" in text


def test_cli_exits_2_and_writes_nothing_on_a_bad_spec(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "storage": str(tmp_path / "out"), "grid": {"t": [1.5]}}))
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "grid.t[0]: 1.5 is outside (0, 1)" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "syntax.yaml").write_text("name: [unclosed")
    assert main(["sweep", str(tmp_path / "syntax.yaml")]) == 2
    err = capsys.readouterr().err
    assert "YAML syntax" in err and f'in "{tmp_path / "syntax.yaml"}", line 1' in err and "<unicode string>" not in err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "storage": str(tmp_path / "out"),
                                    "grid": {"t": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "rounds": [1, 2, 3]}}))
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "27 trials" in out and "curve fits" in out
    assert [ln.split() for ln in out.splitlines() if ln.startswith("curve fits")][0][-2:] == ["46", "108"]
    assert not (tmp_path / "out").exists()


def test_data_kw_is_checked_against_the_sweeps_datasets_and_their_loaders():
    spec = validate({"name": "x", "grid": {"dataset": ["cifar10"]}, "data_kw": {"cifar10": {"image_size": 64}}},
                    check_data=False)
    assert spec.data_kw == {"cifar10": {"image_size": 64}}
    with pytest.raises(SpecError) as e:
        validate({"name": "x", "data_kw": {"cifar10": {"image_size": 64},
                                           "fashion-mnist-embedded": {"crop": 32, "train_per_class": 0}}})
    got = e.value.problems
    assert "data_kw.cifar10: not a dataset of this sweep (fashion-mnist-embedded)" in got
    assert any(p.startswith("data_kw.fashion-mnist-embedded.crop: unknown option") for p in got)
    assert "data_kw.fashion-mnist-embedded.train_per_class: 0 is not a positive integer" in got


def test_data_kw_accepts_every_option_the_imagenet100_loader_takes():
    """``data_kw.imagenet100`` rejected ``cache_dir`` and ``workers``, which the loader accepts."""
    kw = {"image_size": 64, "cache_dir": "/tmp/cache", "workers": 4, "download": False}
    spec = validate({"name": "x", "grid": {"dataset": ["imagenet100"]}, "data_kw": {"imagenet100": kw}},
                    check_data=False)
    assert spec.data_kw == {"imagenet100": kw}
    with pytest.raises(SpecError) as e:
        validate({"name": "x", "grid": {"dataset": ["imagenet100"]},
                  "data_kw": {"imagenet100": {"cache_dir": 3, "workers": 0}}}, check_data=False)
    assert sorted(e.value.problems) == ["data_kw.imagenet100.cache_dir: 3 is not a non-empty path",
                                        "data_kw.imagenet100.workers: 0 is not a positive integer"]


def test_grid_blocks_union_their_products_each_at_its_own_rates():
    """Table 1 gives each attack its own poison rates: a list of grid blocks is the union of their products."""
    from tscray.plan import make_plan

    spec = validate({"name": "x", "grid": [
        {"attack": ["badnets", "blended"], "poison_rate": [0.1, 0.05], "defense": ["none", "finetune"]},
        {"attack": ["sig"], "poison_rate": [0.01], "defense": ["none", "finetune"]},
        {"attack": ["badnets"], "poison_rate": [0.1], "defense": ["none"]},  # repeats a point: counted once
    ]})
    points = {(t.params["attack"], t.params["poison_rate"], t.params["defense"]) for t in make_plan(spec).trials}
    assert len(make_plan(spec).trials) == len(points) == 10
    assert ("sig", 0.01, "finetune") in points and ("sig", 0.1, "none") not in points
    assert spec.grid.attack == ("badnets", "blended", "sig")  # the union, for validation
    assert make_plan(spec).count_by_kind()["backdoor"] == 5
    with pytest.raises(SpecError, match=r"grid\[1\].poison_rate\[0\]: 2 is outside"):
        validate({"name": "x", "grid": [{"attack": ["badnets"]}, {"poison_rate": [2]}]})
    with pytest.raises(SpecError, match="grid: empty list"):
        validate({"name": "x", "grid": []})


def test_a_target_class_the_data_lacks_is_refused_before_compute():
    """`train.target: 10` on a 10-class dataset was accepted and failed inside the backdoor step; on the
    user's own data the class count is read from the file, and a field axis names its value."""
    from pathlib import Path

    shapes = str(Path(__file__).resolve().parents[1] / "examples" / "shapes.npz")
    assert problems({"name": "x", "train": {"target": 10}}) == \
        "train.target: 10 is not a class of fashion-mnist-embedded (its classes are 0..9)"
    assert problems({"name": "x", "grid": {"dataset": [shapes]}, "train": {"target": 7}}) == \
        f"train.target: 7 is not a class of {shapes} (its classes are 0..3)"
    assert problems({"name": "x", "grid": {"train.target": [3, 12]}}) == \
        "grid.train.target[1]: 12 is not a class of fashion-mnist-embedded (its classes are 0..9)"
    validate({"name": "x", "train": {"target": 9}})


def test_channels_last_is_auto_by_default_and_true_false_keep_their_old_meaning(tmp_path):
    from tscray.steps import Context
    from tscray.store import Store

    assert validate(GOOD).resources.channels_last == "auto"
    for raw, want in ((True, "auto"), (False, "off"), ("on", "on"), ("auto", "auto")):
        assert validate({**GOOD, "resources": {"channels_last": raw}}).resources.channels_last == want
    store = Store(str(tmp_path))
    assert Context(store, "cpu", channels_last="auto").channels_last is False  # CUDA only
    assert Context(store, "cpu", channels_last="on").channels_last is True
    assert Context(store, "cpu", channels_last="off").channels_last is False
    assert load_spec("sweeps/quickstart.yaml").resources.channels_last == "on"


def test_an_unquoted_on_in_a_spec_is_the_word_not_true(tmp_path):
    """YAML 1.1 (PyYAML's default) reads `channels_last: on` as true, which means "auto" (CUDA only): two
    shipped specs asked for NHWC on CPU that way and silently ran without it (their manifests said False).
    Specs are read as YAML 1.2: only true/false are booleans; yes/no for a boolean field is named."""
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid: {defense: [tsc], rounds: [1], t: [0.5]}\nresources: {channels_last: on}\n")
    assert load_spec(path, check_data=False).resources.channels_last == "on"
    for name in ("clean_scale_small", "preset_small_check"):
        assert load_spec(f"sweeps/{name}.yaml", check_data=False).resources.channels_last == "on"
    path.write_text("name: s\ngrid: {defense: [tsc], rounds: [1], t: [0.5]}\ndefense: {clean_balanced: yes}\n")
    with pytest.raises(SpecError, match="defense.clean_balanced: 'yes' is not true/false"):
        load_spec(path, check_data=False)
    path.write_text("name: s\ngrid: {defense: [tsc], rounds: [1], t: [0.5]}\ndefense: {clean_balanced: True}\n")
    assert load_spec(path, check_data=False).defense.clean_balanced is True


def test_a_spec_of_grid_blocks_reads_back_from_its_record_as_the_same_trials():
    """sweep.json holds spec.to_dict(); it wrote the blocks under a `grids` key that validation ignored (it was
    even listed as allowed), so a spec written with `grids:` by hand silently ran the default grid."""
    import json

    from tscray.plan import make_plan

    raw = {"name": "b", "grid": [{"attack": ["badnets"], "defense": ["none"]},
                                 {"attack": ["blended"], "defense": ["tsc"], "rounds": [1], "t": [0.5]}]}
    spec = validate(raw, check_data=False)
    again = json.loads(json.dumps(spec.to_dict()))
    again.pop("ssl")
    assert {t.id for t in make_plan(validate(again, check_data=False)).trials} == {t.id for t in make_plan(spec).trials}
    with pytest.raises(SpecError, match="grids: unknown key; allowed: name, grid, train"):
        validate({"name": "b", "grids": raw["grid"]}, check_data=False)


@pytest.mark.parametrize("raw, msg", [
    ({"name": ".."}, "name: '..' must be"), ({"name": "a\nb"}, "control characters"),
    ({"train": {"momentum": -3}}, "train.momentum: -3 is outside [0, ∞)"),
    ({"train": {"weight_decay": -1}}, "train.weight_decay: -1 is outside"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size: 0 is outside [1, ∞)")])
def test_values_that_failed_only_at_compute_or_escaped_the_storage_are_refused(raw, msg):
    """A name of `..` put the default storage (runs/{name}) in the working directory; a negative momentum or
    an eval batch of 0 passed validation and failed after Ray had started."""
    with pytest.raises(SpecError, match=re.escape(msg)):
        validate({"name": "x", **raw}, check_data=False)


def test_exponent_floats_are_numbers_as_in_yaml_1_2():
    """`lr: 1e-3` read as the string '1e-3' ('is not a number'): YAML 1.1 wants 1.0e-3."""
    from tscray import spec_yaml

    assert spec_yaml.load("a: 1e-3\nb: -2E+2\nc: 1_0e1\nd: 1e\ne: e5") == {"a": 0.001, "b": -200.0, "c": 100.0,
                                                                        "d": "1e", "e": "e5"}
    assert validate({"name": "x", **spec_yaml.load("train: {lr: 1e-3}")}, check_data=False).train.lr == 0.001


def test_duplicates_and_empty_blocks_in_a_grid_and_a_storage_override_through_a_file_are_refused(tmp_path, capsys):
    """`defense.clean_ratio: [1, 1.0]` made two trials of one setting (two ids, one final step); an empty block in
    a list of blocks added a trial of every default; `--storage FILE` passed the dry run and failed once Ray ran."""
    with pytest.raises(SpecError, match=r"grid.defense.clean_ratio: duplicate values \[1, 1.0\]"):
        validate({"name": "x", "grid": {"defense": ["tsc"], "defense.clean_ratio": [1, 1.0]}}, check_data=False)
    with pytest.raises(SpecError, match=r"grid\[0\]: empty block"):
        validate({"name": "x", "grid": [{}, {"defense": ["none"]}]}, check_data=False)
    (tmp_path / "afile").write_text("hi")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\ngrid: {defense: [none]}\ntrain: {epochs: 1}\n")
    assert main(["sweep", str(spec), "--dry-run", "--storage", str(tmp_path / "afile" / "sub")]) == 2
    assert "--storage: " in capsys.readouterr().err


def test_a_field_axis_of_a_defense_outside_its_block_is_refused():
    """`grid: {defense: [tsc], defense.mcr.curve_epochs: [1, 2, 3]}` planned one trial without a word."""
    with pytest.raises(SpecError, match="defense.mcr.curve_epochs: a setting of mcr, which is not a defense of this "
                                        r"block \(tsc\)"):
        validate({"name": "x", "grid": {"defense": ["tsc"], "defense.mcr.curve_epochs": [1, 2, 3]}}, check_data=False)
    spec = validate({"name": "x", "grid": {"defense": ["tsc", "mcr"], "defense.mcr.curve_epochs": [1, 2]}},
                    check_data=False)
    assert spec.grid.field_axes == (("defense.mcr.curve_epochs", (1, 2)),)


def test_a_spec_read_from_a_pipe_and_an_empty_spec(tmp_path):
    """`tscray sweep <(cat spec.yaml)` said 'file: /dev/fd/63 does not exist'; an empty file said 'got NoneType'."""
    import os

    r, w = os.pipe()
    os.write(w, b"name: piped\ngrid: {defense: [none]}\n")
    os.close(w)
    try:
        assert load_spec(f"/dev/fd/{r}", check_data=False).name == "piped"
    finally:
        os.close(r)
    (tmp_path / "e.yaml").write_text("# nothing yet\n")
    with pytest.raises(SpecError, match="e.yaml is empty"):
        load_spec(tmp_path / "e.yaml")


@pytest.mark.parametrize("grid,needle", [
    # planning makes a step per round: 10**20 rounds validated, then planning ate all memory
    ({"defense": ["tsc"], "rounds": [200000]}, "grid.rounds[0]: 200000 is outside [1, 1000]"),
    # seeds past 2**64 validated, then torch's manual_seed overflowed once compute had started
    ({"seed": [2**64]}, "grid.seed[0]: 18446744073709551616 is outside [0, 4,294,967,295]"),
])
def test_values_that_would_fail_later_are_refused_up_front(grid, needle):
    assert needle in problems({"name": "x", "grid": grid})
    assert "clean_seed" in problems({"name": "x", "defense": {"clean_seed": 2**64}})


def test_blocks_are_checked_on_their_own_and_named_by_block():
    """A defense meets only its own block's architectures (nad beside cnn only, mlp in another block under
    tsc, was refused as 'nad cannot purify mlp'); errors name the block and the position within it."""
    ok = validate({"name": "x", "grid": [{"defense": ["tsc", "none"], "arch": ["mlp"]},
                                         {"defense": ["nad"], "arch": ["cnn"]}]})
    assert {(t.params["arch"], t.params["defense"]) for t in make_plan(ok).trials} == {
        ("mlp", "tsc"), ("mlp", "none"), ("cnn", "nad")}
    found = problems({"name": "x", "grid": [{"attack": ["badnets"]},
                                            {"attack": ["blended", "ctrl"], "arch": ["simclr-cnn"]}]})
    assert "grid[1].attack[1]: 'ctrl' is not a supervised attack" in found
    assert "grid[1].arch[0]: 'simclr-cnn' is not a classifier" in found
    assert "grid[0].defense[0]: nad cannot purify arch 'mlp'" in problems(
        {"name": "x", "grid": [{"defense": ["nad"], "arch": ["mlp"]}]})
    # an empty block (refused) does not shift the names of the blocks after it
    found = problems({"name": "x", "grid": [{}, {"defense": ["tsc"], "t": [0.3]},
                                            {"defense": ["tsc"], "train.epochs": [-1]}]})
    assert "grid[2].train.epochs" in found and "grid[1].train.epochs" not in found


def test_integers_and_floats_are_yaml_1_2s():
    """YAML 1.1 read ``seed: 010`` as 8 and ``1:30`` as 90 without a word, and ``0o10``, ``+.5``, ``.5e3``
    as strings; the README promises 1.2."""
    from tscray import spec_yaml

    got = spec_yaml.load("a: [010, 0o10, 0x1F, 1:30, +.5, .5e3, -.5, 1_000, -3, +4, 3., .inf, 0b1, 1.2.3]")["a"]
    assert got == [10, 8, 31, "1:30", 0.5, 500.0, -0.5, 1000, -3, 4, 3.0, float("inf"), "0b1", "1.2.3"]
    assert [type(v) for v in got[:4]] == [int, int, int, str]
    assert validate({"name": "x", **spec_yaml.load("grid: {seed: [010]}")}, check_data=False).grid.seed == (10,)


def test_a_bad_data_file_is_named_at_its_block_and_position(tmp_path):
    """A bad file was named 'grid.dataset' whichever block and position held it; with two blocks of datasets a
    user had to find it by its path. It is named where it is first used."""
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    gone = str(tmp_path / "gone.npz")
    found = problems({"name": "x", "grid": [{"dataset": ["fashion-mnist-embedded", {"path": gone}]},
                                            {"dataset": [str(bad)]}, {"dataset": [str(bad)], "seed": [1]}]})
    assert f"grid[0].dataset[1]: {gone}: no such file or folder" in found
    assert f"grid[1].dataset[0]: {bad}: corrupt or not an .npz file" in found
    assert "grid[2]" not in found  # the same file is reported once, where it is first used
    assert problems({"name": "x", "grid": {"dataset": [str(bad)]}}).startswith("grid.dataset[0]: ")
    assert problems({"name": "x", "train": {"method": "simclr"}, "grid": {"arch": ["simclr-cnn"], "attack":
                     ["badencoder"]}, "ssl": {"downstream": str(bad)}}).startswith("ssl.downstream: ")


@pytest.mark.parametrize("method, kw, want", [
    ("simclr", {"nope": 1}, "train.method_kw: method 'simclr': SimCLR.__init__() got an unexpected keyword argument 'nope'"),
    ("simclr", {"temperature": -5}, "train.method_kw: method 'simclr': temperature must be > 0, got -5"),
    ("supervised", {"label_smoothing": 0.1}, "train.method_kw: supervised training takes no options here"),
])
def test_method_options_are_checked_up_front(method, kw, want):
    """``train.method_kw`` was never built before the run: an unknown option or a negative temperature passed
    the dry run, then errored every trial with "run the same command again to retry"; under supervised
    training the options were dropped without a word."""
    grid = {"arch": ["simclr-cnn"], "attack": ["badencoder"]} if method == "simclr" else {"attack": ["badnets"]}
    with pytest.raises(SpecError) as e:
        validate({"name": "m", "grid": {**grid, "defense": ["none"]},
                  "train": {"method": method, "method_kw": kw, "epochs": 1}})
    assert any(p.startswith(want) for p in e.value.problems), e.value.problems
    ok = validate({"name": "m", "grid": {"arch": ["simclr-cnn"], "attack": ["badencoder"], "defense": ["none"]},
                   "train": {"method": "simclr", "method_kw": {"temperature": 0.2}, "epochs": 1}})
    assert ok.train.method_kw == {"temperature": 0.2}


def test_an_mlflow_uri_mlflow_cannot_log_to_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """``mlflow_uri: nope://x`` (in the spec, --mlflow-uri or $MLFLOW_TRACKING_URI) passed the dry run; the run
    wrote sweep.json, started Ray, and died in a 57-line traceback."""
    with pytest.raises(SpecError) as e:
        validate({"name": "m", "mlflow_uri": "nope://x", "grid": {"attack": ["badnets"], "defense": ["none"]}})
    assert e.value.problems == ["mlflow_uri: 'nope://x' is not a tracking URI MLflow can log to (e.g. "
                                "sqlite:////abs/path/mlflow.db, http://<host>:5000, file:///abs/dir)"]
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "m", "grid": {"attack": ["badnets"], "defense": ["none"]}}))
    storage = tmp_path / "run"
    assert main(["sweep", str(spec), "--storage", str(storage), "--mlflow-uri", "nope://x"]) == 2
    assert "--mlflow-uri: 'nope://x' is not a tracking URI" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nope://y")
    assert main(["sweep", str(spec), "--storage", str(storage)]) == 2
    assert "$MLFLOW_TRACKING_URI: 'nope://y'" in capsys.readouterr().err
    assert not storage.exists()  # refused before anything was written
    # (an environment URI that --mlflow-uri overrides is never used: not refused)
    assert main(["sweep", str(spec), "--storage", str(storage), "--dry-run", "--mlflow-uri",
                 f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    assert main(["sweep", str(spec), "--storage", str(storage), "--dry-run"]) == 0
    assert not (tmp_path / "m.db").exists()  # (the check creates nothing)
