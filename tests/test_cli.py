import subprocess
import sys

import pytest
import torch

from tscray.checkpoint import load_state, save_model
from tscray.cli import main
from tscray.models import build


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("purify", "backdoor", "demo"):
        assert cmd in out


def test_console_script_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "tscray.cli", "purify", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--model" in r.stdout and "--t" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--t", "1.5"], "t must be strictly between 0 and 1"),
    (["--t", "0"], "t must be strictly between 0 and 1"),
    (["--rounds", "0"], "must be >= 1"),
    (["--clean-ratio", "2"], "must be in [0, 1]"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        main(["purify", "--model", str(tmp_path / "m.safetensors"), *args])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["backdoor", "--device", "nope"], "argument --device: not a torch device: 'nope'"),
    (["purify", "--model", "m.safetensors", "--device", "cuda:7"], "argument --device: cuda:7: this machine"),
    (["demo", "--device", "nope"], "argument --device: not a torch device"),
    (["backdoor", "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["backdoor", "--lr", "-5"], "argument --lr: must be a finite number > 0"),
    (["backdoor", "--seed", "99999999999999999999"], "argument --seed: must be in [0, 4,294,967,295]"),
    (["purify", "--model", "m.safetensors", "--seed", "-1"], "argument --seed: must be in [0, 4,294,967,295]"),
    (["defenses", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
])
def test_bad_device_lr_seed_and_preset_exit_2_before_any_work(argv, msg, tmp_path, capsys, monkeypatch):
    """A bad --device was a traceback after the data loaded (the demo had logged its first step); --lr nan
    trained and saved a model of NaN weights with exit 0; a huge --seed failed naming no option, and -1 passed
    where a sweep's seed axis refuses it; `defenses --preset nope` listed the defenses with exit 0."""
    monkeypatch.chdir(tmp_path)
    if "cuda:7" in argv:  # (a device this machine lacks, whether or not it has CUDA)
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "x.safetensors")] if argv[0] == "backdoor" else argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_purify_errors_are_clear_and_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    assert main(["purify", "--model", str(bad), "--arch", "cnn"]) == 2
    assert "corrupt" in capsys.readouterr().err
    good = save_model(build("cnn", 10, in_channels=1), tmp_path / "m.safetensors", data="fashion-mnist-embedded")
    assert main(["purify", "--model", str(good)]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["purify", "--model", str(good), "--arch", "cnn", "--attack", "nope"]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert main(["purify", "--model", str(good), "--arch", "cnn", "--defense", "magic"]) == 2
    assert "unknown defense 'magic'; known: " in capsys.readouterr().err
    assert main(["purify", "--model", str(good), "--arch", "cnn", "--set", "curve_lrr=0.1"]) == 2
    assert "unknown tsc setting(s) ['curve_lrr']" in capsys.readouterr().err
    assert main(["purify", "--model", str(good), "--arch", "cnn", "--set", "probes=post"]) == 2
    assert "probes must be one of auto, raw, relu" in capsys.readouterr().err
    assert main(["purify", "--model", str(good), "--arch", "mlp", "--defense", "anp"]) == 2
    assert "needs BatchNorm layers; MLP has none" in capsys.readouterr().err
    assert main(["purify", "--model", str(good), "--arch", "cnn", "--defense", "finetune", "--t", "0.3"]) == 2
    assert "--t does not apply" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "m.safetensors"]


@pytest.mark.parametrize("extra", [[], ["--set", "probes=raw"]], ids=["spec probes", "raw probes"])
def test_purify_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys, extra):
    torch.manual_seed(0)
    path = save_model(build("cnn", 10, in_channels=1, widths=(8, 8, 8, 8)), tmp_path / "m.safetensors",
                      arch="cnn", arch_kw={"widths": [8, 8, 8, 8]}, data="fashion-mnist-embedded")
    code = main(["purify", "--model", str(path), "--attack", "badnets", "--rounds", "1", "--curve-epochs", "1",
                 "--finetune-epochs", "1", "--clean-ratio", "0.01", "--batch-size", "50", *extra])
    assert code == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "ASR" in out
    assert (tmp_path / "m.purified.safetensors").exists()


def test_purify_finetune_takes_finetune_epochs_and_any_setting(tmp_path, capsys):
    """`--defense finetune --finetune-epochs N` failed with "does not apply" (the check ran before the
    flag was mapped to finetune's `epochs`); `--set` reaches any setting."""
    torch.manual_seed(0)
    path = save_model(build("cnn", 10, in_channels=1, widths=(8, 8, 8, 8)), tmp_path / "m.safetensors",
                      arch="cnn", arch_kw={"widths": [8, 8, 8, 8]})
    base = ["purify", "--model", str(path), "--data", "fashion-mnist-embedded", "--clean-ratio", "0.01",
            "--batch-size", "50"]
    assert main(base + ["--defense", "finetune", "--finetune-epochs", "1", "--set", "lr=0.001"]) == 0
    assert "after" in capsys.readouterr().out


TINY_TSC = ["--rounds", "1", "--curve-epochs", "1", "--finetune-epochs", "1", "--clean-ratio", "0.01",
            "--batch-size", "50"]


def test_purify_measures_asr_against_the_recorded_target_and_refuses_a_contradiction(tmp_path, capsys):
    """A target-7 model read "ASR 0.00%" before and after: purify measured ASR against class 0 unless
    --target was passed. It now reads the target from the checkpoint and refuses a contradicting --target."""
    torch.manual_seed(0)
    path = save_model(build("cnn", 10, in_channels=1, widths=(8, 8, 8, 8)), tmp_path / "m.safetensors",
                      arch="cnn", arch_kw={"widths": [8, 8, 8, 8]}, attack="badnets", rate=0.1, target=7,
                      data="fashion-mnist-embedded")
    assert main(["purify", "--model", str(path), "--attack", "badnets", "--target", "3", *TINY_TSC]) == 2
    err = capsys.readouterr().err
    assert "--target 3 contradicts" in err and "records target 7" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert main(["purify", "--model", str(path), "--attack", "badnets", *TINY_TSC]) == 0
    assert "target class 7, poisoned at 10.0%" in capsys.readouterr().out


def test_purify_uses_the_recorded_dataset_and_names_the_one_it_needs(tmp_path, capsys):
    """Without --data, purify loaded Fashion-MNIST and failed with "shape mismatch: convs.0.weight"."""
    rgb = save_model(build("cnn", 10, in_channels=3, widths=(8, 8, 8, 8)), tmp_path / "rgb.safetensors",
                     arch="cnn", arch_kw={"widths": [8, 8, 8, 8]})
    assert main(["purify", "--model", str(rgb), *TINY_TSC]) == 2
    err = capsys.readouterr().err
    assert "does not record the dataset" in err and "pass --data" in err and "cifar10" in err
    assert main(["purify", "--model", str(rgb), "--data", "fashion-mnist-embedded", *TINY_TSC]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "fashion-mnist-embedded: 10 classes, 1 channel(s)" in err
    grey = save_model(build("cnn", 10, in_channels=1, widths=(8, 8, 8, 8)), tmp_path / "grey.safetensors",
                      arch="cnn", arch_kw={"widths": [8, 8, 8, 8]}, data="fashion-mnist-embedded")
    assert main(["purify", "--model", str(grey), *TINY_TSC]) == 0
    assert "on fashion-mnist-embedded" in capsys.readouterr().out


def test_defenses_lists_every_defense_and_its_settings(capsys):
    from tscray import defenses
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in defenses.DEFENSES.names())
    assert main(["defenses", "tsc"]) == 0
    out = capsys.readouterr().out
    assert "curve_lr" in out and "curve_epochs" in out and "(grid axis)" in out
    assert main(["defenses", "nope"]) == 2


@pytest.mark.slow
def test_demo_quick_runs_and_writes_its_outputs(tmp_path, capsys, monkeypatch):
    """The demo command end to end: every stage runs and writes its outputs. Its numbers are not asserted
    (TSC's and MCR's purification is proved in tests/defenses), so the recipe is shrunk: this test took 4
    minutes of CI at the real --quick settings."""
    from tscray import demo

    monkeypatch.setattr(demo, "QUICK", {**demo.QUICK, "train_epochs": 1, "curve_epochs": 2, "mcr_finetune_epochs": 1})
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "tsc E_TSC=2" in out and "mcr" in out and "backdoored" in out
    for name in ("backdoored.safetensors", "tsc.safetensors", "results.json"):
        assert (tmp_path / "demo" / name).exists()


def test_backdoor_writes_the_attack_resource_and_purify_reads_it(tmp_path, capsys, pattern_attack):
    torch.set_num_threads(1)
    out = tmp_path / "bd.safetensors"
    assert main(["backdoor", "--attack", "test-pattern", "--attack-kw", '{"size": 5}', "--arch-kw",
                 '{"widths": [8, 8, 8, 8]}', "--epochs", "1", "--batch-size", "500", "--out", str(out)]) == 0
    res = tmp_path / "bd.attack.safetensors"
    assert res.exists() and load_state(res)["patch"].shape == (1, 5, 5)
    capsys.readouterr()
    args = ["purify", "--model", str(out), "--attack", "test-pattern", "--rounds", "1", "--curve-epochs", "1",
            "--finetune-epochs", "1", "--clean-ratio", "0.01", "--batch-size", "50"]
    assert main(args) == 0  # attack_kw comes from the checkpoint's metadata, the resource from beside it
    assert "ASR" in capsys.readouterr().out
    moved = tmp_path / "elsewhere.safetensors"
    res.rename(moved)
    assert main(args) == 2
    assert "--attack-resource" in capsys.readouterr().err
    assert main(args + ["--attack-resource", str(moved)]) == 0


@pytest.mark.parametrize("target", ["10", "-1"])
def test_backdoor_refuses_a_target_the_data_lacks(tmp_path, capsys, target):
    out = tmp_path / "m.safetensors"
    assert main(["backdoor", "--target", target, "--epochs", "1", "--out", str(out)]) == 2
    assert "is not a class of fashion-mnist-embedded (its classes are 0..9)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["defenses"], ["defenses", "tsc"], ["sweep", "QUICKSTART", "--dry-run"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(argv):
    """`tscray status DIR | head`: the reader closes the pipe before the output is written. Without the fix
    Python printed a BrokenPipeError traceback (and, at exit, 'Exception ignored ... BrokenPipeError').
    (argparse's --help already ignores a closed pipe.)"""
    import os

    from pathlib import Path

    argv = [str(Path(__file__).parents[1] / "sweeps" / "quickstart.yaml") if a == "QUICKSTART" else a for a in argv]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "tscray.cli", *argv], stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_a_broken_pipe_that_is_not_our_output_is_not_hidden(monkeypatch):
    """Only a write of tscray's own output to a closed reader ends quietly: a broken socket or subprocess
    pipe inside a command is a real error and keeps its traceback."""
    import socket

    from tscray import cli

    def command(args):
        a, b = socket.socketpair()
        b.close()
        a.sendall(b"x" * 1_000_000)  # the peer is gone: BrokenPipeError, raised outside tscray

    monkeypatch.setitem(cli.COMMANDS, "defenses", command)
    with pytest.raises(BrokenPipeError):
        main(["defenses"])


def test_options_an_architecture_cannot_take_are_named_as_arch_kw_before_compute(tmp_path, capsys):
    """`--arch-kw '{"widths": "xx"}'` printed the cnn's own TypeError ("not all arguments converted during
    string formatting"), which names neither the flag nor the architecture; backdoor trained nothing first."""
    path = save_model(build("cnn", 10, in_channels=1, widths=(8, 8, 8, 8)), tmp_path / "m.safetensors",
                      arch="cnn", arch_kw={"widths": [8, 8, 8, 8]}, data="fashion-mnist-embedded")
    for cmd in (["purify", "--model", str(path), *TINY_TSC],
                ["backdoor", "--data", "fashion-mnist-embedded", "--out", str(tmp_path / "b.safetensors")]):
        for bad in ('{"widths": "xx"}', '{"depth": 3}'):
            assert main([*cmd, "--arch-kw", bad]) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and "--arch-kw" in err and "'cnn'" in err and bad[2:7] in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _tiny_model(path, classes=10, **meta):
    torch.manual_seed(0)
    return save_model(build("cnn", classes, in_channels=1, widths=(8, 8, 8, 8)), path, **meta)


def test_a_checkpoint_naming_code_to_import_is_refused_and_runs_none_of_it(tmp_path, capsys, monkeypatch):
    """purify built the architecture a checkpoint's metadata named: `module:builder` was imported and called
    (a module of the attacker's choosing ran; `this:x` printed the Zen of Python). Now refused, naming how to
    opt in; metadata fields of the wrong type are one line too."""
    (tmp_path / "evil_mod.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
                                          "def build(**kw):\n    raise SystemExit('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _tiny_model(tmp_path / "m.safetensors", arch="evil_mod:build", data="fashion-mnist-embedded")
    assert main(["purify", "--model", str(path), *TINY_TSC]) == 2
    err = capsys.readouterr().err
    assert "does not run code a checkpoint names" in err and "pass --arch evil_mod:build" in err
    assert not (tmp_path / "RAN").exists()
    for bad, msg in (({"target": True}, "metadata target true is not a int"),
                     ({"arch_kw": [1]}, "metadata arch_kw [1] is not a dict"),
                     ({"attack": "badnets", "attack_kw": {"nosuch": 1}}, "attack_kw recorded in m.safetensors: "
                                                                          "attack 'badnets' does not take")):
        path = _tiny_model(tmp_path / "m.safetensors", **{"arch": "cnn", "arch_kw": {"widths": [8, 8, 8, 8]},
                                                          "data": "fashion-mnist-embedded", **bad})
        assert main(["purify", "--model", str(path), "--attack", "badnets", *TINY_TSC]) == 2, bad
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


def test_purify_names_outputs_after_the_whole_name_never_overwrites_and_carries_the_setting(tmp_path, capsys):
    """`run.s1.safetensors` wrote `run.purified.safetensors` (so did `run.s2`), purifying `m.purified` overwrote
    its own input, and the purified model recorded neither target nor attack nor data: reading it again
    measured ASR against class 0."""
    from tscray.checkpoint import read_meta

    path = _tiny_model(tmp_path / "run.s1.safetensors", arch="cnn", arch_kw={"widths": [8, 8, 8, 8]},
                       attack="badnets", rate=0.1, target=7, data="fashion-mnist-embedded", data_kw={})
    assert main(["purify", "--model", str(path), "--attack", "badnets", *TINY_TSC]) == 0
    out = tmp_path / "run.s1.purified.safetensors"
    meta = read_meta(out)
    assert (meta["target"], meta["attack"], meta["data"], meta["rate"]) == (7, "badnets", "fashion-mnist-embedded", 0.1)
    capsys.readouterr()
    assert main(["purify", "--model", str(out), "--attack", "badnets", *TINY_TSC]) == 0
    assert "target class 7" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["purify", "--model", str(out), "--out", str(out), *TINY_TSC]) == 2
    assert "would overwrite the input" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["backdoor", "--epochs", "1", "--out", str(tmp_path / "m.pt")]) == 2
    assert "name the file *.safetensors" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("kw, msg", [(["mean=0.5"], "--data-kw mean: 0.5 is not a list of finite numbers"),
                                     (["split_seed=abc"], "--data-kw split_seed: 'abc' is not a non-negative"),
                                     (["image_size=100000"], "--data-kw image_size: 100000 is not an integer in 1..4096"),
                                     (["mean=[.nan]"], "is not a list of finite numbers"),
                                     (["std=[0]"], "--data-kw std: [0] must be positive"),
                                     (["test_ratio=0.1", "test_ratio=0.3"], "--data-kw test_ratio is given twice")])
def test_data_kw_on_the_command_line_is_checked_as_a_sweeps_data_kw(tmp_path, capsys, kw, msg):
    """The sweep refused these values; the CLI passed them on (tracebacks, or NaN inputs trained on)."""
    from tests.data.test_custom import EXAMPLE

    args = [a for k in kw for a in ("--data-kw", k)]
    assert main(["backdoor", "--data", str(EXAMPLE), *args, "--epochs", "1", "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_purify_on_the_recorded_data_path_keeps_the_recorded_load_options(tmp_path, capsys):
    """`--data` naming the very file the model was trained on dropped the recorded data_kw (image size,
    split): training and test images were mixed without a word."""
    from tscray.checkpoint import read_meta
    from tests.data.test_custom import EXAMPLE

    path = _tiny_model(tmp_path / "m.safetensors", 4, arch="cnn", arch_kw={"widths": [8, 8, 8, 8]}, target=1,
                       data=str(EXAMPLE), data_kw={"image_size": 16})
    assert main(["purify", "--model", str(path), "--data", str(EXAMPLE), "--attack", "badnets", *TINY_TSC]) == 0
    assert read_meta(tmp_path / "m.purified.safetensors")["data_kw"] == {"image_size": 16}
    assert main(["purify", "--model", str(path), "--data", str(EXAMPLE), "--data-kw", "image_size=12",
                 "--attack", "badnets", *TINY_TSC]) == 0
    assert read_meta(tmp_path / "m.purified.safetensors")["data_kw"] == {"image_size": 12}
