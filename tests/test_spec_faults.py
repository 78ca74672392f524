"""Hostile or careless sweep specs (issue 14, rows 1-6): each is one line naming the field, exit code 2,
before any compute; nothing expands without bound, nothing merges silently, nothing ends in a traceback."""

from __future__ import annotations

import pytest

from tscray.cli import main
from tscray.config import SpecError, load_spec
from tscray.defenses import DEFENSES, get
from tscray.defenses.base import _check_value
from tscray.spec_yaml import MAX_BYTES, MAX_VALUES, expanded_size


def bomb(levels: int) -> str:
    """The 372-byte alias bomb of the issue (nine levels of nine aliases each) at ``levels`` levels."""
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [x,x,x,x,x,x,x,x,x]"]
    for i in range(1, levels):
        ref = ",".join(f"*{names[i - 1]}" for _ in range(9))
        lines.append(f"{names[i]}: &{names[i]} [{ref}]")
    return "\n".join(lines) + f"\nname: bomb\ngrid: {{seed: *{names[levels - 1]}}}\n"


def spec_error(tmp_path, text: str) -> list[str]:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    return e.value.problems


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    text = bomb(9)
    assert len(text) < 400
    problems = spec_error(tmp_path, text)
    assert len(problems) == 1 and f"expands to more than {MAX_VALUES:,} values" in problems[0]


def test_a_small_bomb_expands_but_its_errors_quote_little(tmp_path):
    """Five levels (59,049 values) is under the limit; the error about ``grid.seed`` quotes ~120 characters,
    not 857 KB."""
    problems = spec_error(tmp_path, bomb(5))
    assert problems and all(len(p) <= 300 for p in problems)
    assert any(p.startswith("grid.seed[0]: ") for p in problems)


def test_expanded_size_counts_shared_nodes_once_per_use_and_refuses_cycles():
    import yaml

    node = yaml.compose("a: &a [1, 2]\nb: [*a, *a, *a]\n")
    # mapping 1 + keys 2 + a's list (1 + 2) + b's list (1 + 3 uses of a's list of 3)
    assert expanded_size(node) == 1 + 2 + 3 + 1 + 3 * 3
    assert expanded_size(yaml.compose("a: &a [*a]\n")) > MAX_VALUES


def test_oversized_documents_are_refused(tmp_path):
    problems = spec_error(tmp_path, "name: big\n# " + "x" * MAX_BYTES + "\n")
    assert "a sweep spec is at most" in problems[0]


def test_a_duplicate_key_is_an_error_naming_the_key_and_both_lines(tmp_path):
    problems = spec_error(tmp_path, "name: x\ntrain: {epochs: 1}\ngrid: {seed: [0]}\ntrain: {epochs: 2}\n")
    assert problems == ["duplicate key 'train' at line 4 (first at line 2); YAML would silently keep only the "
                        "last one"]
    nested = spec_error(tmp_path, "name: x\ndefense:\n  tsc: {t: 1}\n  tsc: {t: 2}\n")
    assert "duplicate key 'tsc' at line 4 (first at line 3)" in nested[0]


def test_two_merge_keys_in_one_mapping_are_an_error(tmp_path):
    """PyYAML kept one of two ``<<`` keys and dropped the other without a word."""
    problems = spec_error(tmp_path, "name: x\nb: &b {t: [0.4]}\ngrid:\n  <<: *b\n  <<: {rounds: [3]}\n")
    assert problems == ["two merge keys (<<) in one mapping, at lines 4 and 5; merge several mappings with one: "
                        "<<: [*a, *b]"]


def test_merge_keys_still_work_and_explicit_keys_override_them(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\ngrid:\n  - &all {attack: [badnets], seed: [0], defense: [none]}\n"
                    "  - {<<: *all, attack: [blended], seed: [1]}\n")
    spec = load_spec(path)
    assert [g.attack for g in spec.grids] == [("badnets",), ("blended",)]
    assert [g.seed for g in spec.grids] == [(0,), (1,)]


@pytest.mark.parametrize("section,needle", [
    ("defense: {tsc: {batch_size: 0}}", "defense.tsc: batch_size: 0 is outside [1, ∞)"),
    ("defense: {tsc: {curve_lr: fast}}", "defense.tsc: curve_lr: 'fast' is not a number"),
    ("defense: {tsc: {curve_epochs: -3}}", "defense.tsc: curve_epochs: -3 is outside [0, ∞)"),
    ("defense: {mcr: {finetune_epochs: x}}", "defense.mcr: finetune_epochs: 'x' is not an integer"),
    ("defense: {nc: {batch_size: 2.5}}", "defense.nc: batch_size: 2.5 is not an integer"),
    ("defense: {tsc: {curve_optim: {lr: -1}}}", "defense.tsc: curve_optim.lr: -1 is outside (0, ∞)"),
    ("defense: {tsc: {finetune_momentum: 3}}", "defense.tsc: finetune_momentum: 3 is outside [0, 1]"),
    ("defense: {anp: {batch_size: true}}", "defense.anp: batch_size: True is not an integer"),
    ("storage: 'runs/{nope}'", "storage: 'runs/{nope}' has a bad placeholder (KeyError"),
    ("storage: 'runs/{'", "storage: 'runs/{' has a bad placeholder"),
    ("storage: 's3://'", "storage: 's3://' names no bucket or folder after s3://"),
])
def test_bad_values_are_named_at_validation(tmp_path, section, needle):
    problems = spec_error(tmp_path, f"name: x\n{section}\n")
    assert any(needle in p for p in problems), problems


def test_storage_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    problems = spec_error(tmp_path, f"name: x\nstorage: {tmp_path / 'afile' / 'sub'}\n")
    assert problems == [f"storage: '{tmp_path / 'afile' / 'sub'}' runs through {tmp_path / 'afile'}, which is "
                        "a file, not a folder"]


def test_every_defense_preset_passes_the_shared_setting_checks():
    """The name-based ranges never refuse a value a defense ships with (NC's reverse_batch_size 0 means
    "batch_size" and declares its own range)."""
    import dataclasses

    from tscray.optim import OptimConfig

    for name in DEFENSES.names():
        d = get(name)
        for preset in ("paper", "released", "ssl", "backdoorbench"):
            try:
                cfg = d.make_config(preset)
            except ValueError:
                continue
            problems: list[str] = []
            own = getattr(type(cfg), "RANGES", None)
            for f in dataclasses.fields(cfg):
                value = getattr(cfg, f.name)
                if isinstance(value, OptimConfig):
                    for g in dataclasses.fields(value):
                        _check_value(g.name, g.name, getattr(value, g.name), getattr(value, g.name), problems)
                else:
                    _check_value(f.name, f.name, value, value, problems, own)
            assert problems == [], (name, preset)


def test_cli_bad_spec_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(bomb(9))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "alias" in err and len(err) < 1000


def test_a_folder_given_as_the_spec_is_named_as_one(tmp_path, capsys):
    assert main(["sweep", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"file: {tmp_path} is a folder, not a YAML file") and err.count("\n") == 1


@pytest.mark.parametrize("command", [["sweep", "SPEC", "--dry-run"], ["sweep", "SPEC"], ["status", "URI"],
                                     ["results", "URI"]])
def test_an_unreachable_storage_is_one_line_exit_2_before_any_compute(tmp_path, capsys, monkeypatch, command):
    """An object store that cannot be reached (here: nothing listens at the S3 endpoint) gave a pyarrow
    OSError traceback from the dry run's look for finished trials."""
    import socket

    with socket.socket() as s:  # a local port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "spec.yaml"
    path.write_text("name: s3\nstorage: s3://nobucket/sweep\ntrain: {epochs: 1}\ngrid: {defense: [none]}\n")
    argv = [str(path) if a == "SPEC" else "s3://nobucket/sweep" if a == "URI" else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tscray {command[0]}: error: storage s3://nobucket/sweep cannot be read: ") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_step_asking_more_gpus_than_the_machine_has_stops_before_compute(tmp_path, capsys):
    """``resources.gpus_per_step: 4`` on a machine without GPUs hung silently; it is one line, exit 2."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs")
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: gpus\nstorage: {tmp_path / 'runs'}\ntrain: {{epochs: 1}}\ngrid: {{defense: [none]}}\n"
                    "resources: {gpus_per_step: 4}\n")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "resources.gpus_per_step: each step asks 4 GPU(s), but this machine has" in err
    assert not (tmp_path / "runs" / "steps").exists()


def test_a_step_asking_more_memory_than_any_node_has_stops_before_compute(tmp_path, capsys):
    """Shard workers and trials declare their memory to Ray (so it never overcommits a node); a declaration
    no node can hold is one line, exit 2, before any compute."""
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: mem\nstorage: {tmp_path / 'runs'}\ntrain: {{epochs: 1}}\ngrid: {{defense: [none]}}\n"
                    "resources: {memory_gb_per_step: 100000}\n")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "resources.memory_gb_per_step: a step and a trial ask 100000.25 GiB together" in err
    assert not (tmp_path / "runs" / "steps").exists()


def test_an_os_error_mid_command_is_one_line_not_a_traceback(capsys, monkeypatch):
    from tscray import cli

    def failing(args):
        raise OSError(28, "No space left on device")
    monkeypatch.setitem(cli.COMMANDS, "status", failing)
    assert main(["status", "anywhere"]) == 1
    assert capsys.readouterr().err.strip() == "tscray status: error: OSError: [Errno 28] No space left on device"


def test_a_bucket_that_does_not_exist_or_no_bucket_at_all_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """On a reachable S3 server: a sweep into a bucket nobody made planned everything, then failed writing
    sweep.json with pyarrow's "enable allow_bucket_creation" (a setting tscray does not expose); and
    ``--storage s3://`` (no bucket) got past validation, which checks only the spec's own field."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "x",
                     "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        path = tmp_path / "spec.yaml"
        path.write_text("name: s3\nstorage: s3://nobucket/sweep\ntrain: {epochs: 1}\ngrid: {defense: [none]}\n")
        assert main(["sweep", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "tscray sweep: error: storage s3://nobucket/sweep: bucket 'nobucket' does not exist (create it first)"
        assert main(["sweep", str(path), "--storage", "s3://"]) == 2
        assert capsys.readouterr().err.strip() == "tscray sweep: error: storage s3:// names no bucket or folder"
    finally:
        server.stop()


def test_a_missing_trigger_or_pattern_file_is_a_named_problem_of_the_spec(tmp_path, capsys):
    """A missing LF pattern stopped validation at the first such file with a bare FileNotFoundError line;
    every missing file is now a problem of train.attack_kw, named with its attack."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\ngrid: {attack: [lf, narcissus], defense: [none]}\ntrain: {epochs: 1, attack_kw: "
                    "{lf: {pattern: /nope/p.npy}, narcissus: {trigger_file: /nope/t.npy}}}\n")
    with pytest.raises(SpecError) as e:
        load_spec(str(spec))
    assert e.value.problems == ["train.attack_kw: attack 'lf': lf pattern file not found: /nope/p.npy",
                                "train.attack_kw: attack 'narcissus': narcissus trigger_file not found: /nope/t.npy"]
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    assert "2 problem(s)" in capsys.readouterr().err


def test_a_poison_rate_the_users_data_cannot_hold_is_refused_before_any_compute(tmp_path):
    """SIG at 10% on data whose target class holds 2% failed on a worker, after the sweep had started (and,
    for LC or Narcissus, after their resource was computed); validation reads the user's data anyway."""
    import numpy as np

    y = np.array([0] * 20 + [1] * 490 + [2] * 490)
    x = np.random.default_rng(0).integers(0, 256, (1000, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: x\ngrid: {{dataset: [{tmp_path / 'd.npz'}], attack: [sig, badnets], poison_rate: [0.01, "
                    "0.1], defense: [none]}\ntrain: {epochs: 1}\n")
    with pytest.raises(SpecError) as e:
        load_spec(str(spec))
    (only,) = e.value.problems  # badnets (any non-target image) and SIG at 1% fit; SIG at 10% does not
    assert only.startswith("grid.poison_rate[1]: on ") and "sig at rate 0.1 asks 80 poisoned images of 800, " \
        "but only 16 are images of target class 0" in only and only.endswith("at most 0.02")  # (train split)
    spec.write_text(spec.read_text().replace("train: {epochs: 1}", "train: {epochs: 1, target: 1}"))
    load_spec(str(spec))  # target class 1 holds 49%
