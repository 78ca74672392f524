"""The ``tscray`` command line: train a backdoored model, purify a model, run the demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EPILOG = "Run `tscray COMMAND --help` for a command's options. Docs: README.md."


def _t_value(text: str) -> float:
    t = float(text)
    if not 0.0 < t < 1.0:
        raise argparse.ArgumentTypeError(f"t must be strictly between 0 and 1, got {text}")
    return t


def _ratio(text: str) -> float:
    r = float(text)
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return r


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return n


def _nonneg(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return n


def _seed(text: str) -> int:
    """A seed in [0, 2**32 - 1], as a sweep's ``seed`` axis takes it (a larger one overflowed deep inside)."""
    n = int(text)
    if not 0 <= n <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 4,294,967,295], got {text}")
    return n


def _lr(text: str) -> float:
    """A learning rate: a finite number > 0 (``nan`` trained a model of NaN weights and saved it)."""
    x = float(text)
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def _device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N or mps (a bad one was a traceback after the data
    had loaded)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:0, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine's torch has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: tscray runs on cpu, cuda or mps")
    return text


def _e_t(text: str) -> tuple[int, float]:
    """``E,T``: an E_TSC >= 1 and a t in (0, 1)."""
    e, sep, t = text.partition(",")
    try:
        value = (int(e), float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected E,T such as 3,0.4, got {text!r}") from None
    if not sep or value[0] < 1 or not 0.0 < value[1] < 1.0:
        raise argparse.ArgumentTypeError(f"expected E >= 1 and t in (0, 1), got {text!r}")
    return value


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"widths\": [16, 32]}'")
    return value


def _common(p: argparse.ArgumentParser, data_help: str = "dataset name (default: %(default)s)",
            data_default: str | None = "fashion-mnist-embedded") -> None:
    p.add_argument("--data", default=data_default,
                   help=data_help + "; or a path to your own data: an .npz (x, y[, x_test, y_test]) or an image "
                                    "folder with one sub-folder per class")
    p.add_argument("--data-root", help="local dataset root (default: $TSCRAY_DATA)")
    p.add_argument("--data-kw", dest="data_kw", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="dataset load option, as a sweep's data_kw (repeatable): image_size=32, test_ratio=0.2")
    p.add_argument("--device", type=_device, default="cpu",
                   help="torch device, e.g. cpu or cuda:0 (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=_seed, default=0, help="seed for data subsets, init and curves (default: 0)")


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a YAML scalar or list (``curve_lr=0.01``, ``betas=[500, 1000]``), as a
    spec reads it (``on`` is a word, not true)."""
    from tscray import spec_yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), spec_yaml.load(value, key)
    except spec_yaml.SpecYAMLError:
        raise argparse.ArgumentTypeError(f"{key}: value {value!r} is not a YAML scalar or list") from None


def _options(pairs: list[tuple[str, Any]], flag: str) -> dict[str, Any]:
    """Repeatable ``KEY=VALUE`` options as a dict; a key given twice is refused (which one was meant?)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{flag} {key} is given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _defense_args(p: argparse.ArgumentParser) -> None:
    from tscray import defenses

    g = p.add_argument_group("defense (`tscray defenses NAME` lists a defense's settings)")
    g.add_argument("--defense", default="tsc",
                   help=f"defense: {', '.join(defenses.DEFENSES.names())} (default: %(default)s)")
    g.add_argument("--preset", default="paper", help="recipe preset: paper, released, small (TSC for a few hundred clean images), ssl "
                   "(default: %(default)s)")
    g.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of the defense, as in a sweep's defense section (repeatable): "
                        "--set curve_lr=0.01 --set finetune_epochs=3")
    g.add_argument("--rounds", type=_positive, help="E_TSC, rounds of TSC (tsc)")
    g.add_argument("--t", type=_t_value, help="curve index t in (0, 1) (tsc, mcr)")
    g.add_argument("--curve-epochs", type=_nonneg, help="epochs per curve fit (tsc, mcr)")
    g.add_argument("--finetune-epochs", type=_nonneg,
                   help="fine-tune epochs (between TSC rounds; MCR's copy; finetune's epochs)")
    g.add_argument("--batch-size", type=_positive, help="defense batch size")
    g.add_argument("--clean-ratio", type=_ratio, default=0.05,
                   help="share of the clean training set given to the defender (default: %(default)s)")
    g.add_argument("--clean-balanced", action="store_true",
                   help="draw the clean subset class-balanced instead of uniformly at random")


def build_parser() -> argparse.ArgumentParser:
    from tscray import __version__
    from tscray.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="tscray", epilog=EPILOG,
        description="TSC backdoor purification (Two-stage Symmetry Connectivity, ICML 2025) and sweeps.")
    parser.add_argument("--version", action="version", version=f"tscray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("purify", help="purify a model you bring (safetensors or a weights-only state dict)",
                       description="Purify a (possibly backdoored) classifier with a defense on a small clean "
                                   "subset, write the purified model as safetensors, and print ACC (and ASR "
                                   "when --attack names the trigger) before and after.")
    p.add_argument("--model", required=True, type=Path, help="checkpoint: .safetensors or a torch state dict")
    p.add_argument("--arch", help="architecture (default: read from a tscray checkpoint's metadata)")
    p.add_argument("--arch-kw", type=_json_dict, default=None, help="architecture options as JSON")
    p.add_argument("--attack", help="attack whose trigger measures ASR, e.g. badnets")
    p.add_argument("--attack-kw", type=_json_dict, default=None, help="attack options as JSON")
    p.add_argument("--attack-resource", type=Path,
                   help="the attack's resource (trigger generator, universal trigger...) as written by "
                        "`tscray backdoor` (default: MODEL.attack.safetensors when it exists)")
    p.add_argument("--target", type=int, default=None,
                   help="attack target label (default: read from a tscray checkpoint's metadata, else 0)")
    p.add_argument("--out", type=Path, help="output path (default: MODEL.purified.safetensors)")
    _common(p, "dataset name (default: the one recorded in a tscray checkpoint's metadata)", None)
    _defense_args(p)

    p = sub.add_parser("backdoor", help="train a backdoored model (attack + training)",
                       description="Poison a dataset with an attack and train a model on it.")
    p.add_argument("--arch", default="cnn", help="architecture (default: %(default)s)")
    p.add_argument("--arch-kw", type=_json_dict, default=None, help="architecture options as JSON")
    p.add_argument("--attack", default="badnets", help="attack (default: %(default)s)")
    p.add_argument("--attack-kw", type=_json_dict, default=None, help="attack options as JSON")
    p.add_argument("--rate", type=_ratio, default=0.1, help="poisoning rate (default: %(default)s)")
    p.add_argument("--target", type=int, default=0, help="target label (default: 0)")
    p.add_argument("--epochs", type=_nonneg, default=100, help="training epochs (default: %(default)s)")
    p.add_argument("--lr", type=_lr, default=0.01, help="SGD learning rate, cosine (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=256, help="batch size (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="where to write the model (.safetensors)")
    _common(p)

    p = sub.add_parser("sweep", help="run (or resume) a sweep from a YAML spec on Ray",
                       description="Validate a sweep spec, plan its trials as a graph of shared steps and run "
                                   "them on Ray (local or a cluster). Running the same command again on the same "
                                   "storage resumes: finished steps and trials are never recomputed.")
    p.add_argument("spec", type=Path, help="sweep YAML, e.g. sweeps/quickstart.yaml")
    p.add_argument("--storage", help="sweep directory or pyarrow.fs URI (default: the spec's storage)")
    p.add_argument("--address", help="Ray address: auto, ray://host:10001, ... (default: a local Ray)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: the spec's, else sqlite in the sweep dir)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; writes nothing")

    p = sub.add_parser("status", help="progress of a sweep directory")
    p.add_argument("storage", help="sweep directory or URI")

    p = sub.add_parser("verify", help="check a sweep's stored steps and result files; --repair sets damage aside",
                       description="Check every stored step's artifacts against the sizes and SHA-256 hashes its "
                                   "manifest recorded, and every result file. With --repair: move damaged steps to "
                                   "quarantine/ (the next run recomputes them) and unreadable result files to "
                                   "results-damaged/, rebuilding their rows from the step manifests. Exit code 1 "
                                   "when damage was found and not repaired.")
    p.add_argument("storage", help="sweep directory or URI")
    p.add_argument("--repair", action="store_true", help="set damaged steps and result files aside")
    p.add_argument("--quick", action="store_true", help="check sizes only, not content hashes")

    p = sub.add_parser("import-steps", help="copy computed steps from another storage into a sweep's",
                       description="Copy the stored steps (backdoored models, rounds, curves, defenses) of another "
                                   "sweep directory into this one, so a new or renamed sweep reuses them instead of "
                                   "computing them again. Step keys hash everything a step depends on, so only "
                                   "steps a sweep would compute identically are ever reused. Each artifact is "
                                   "checked against its recorded hash as it is copied; damaged ones are skipped. "
                                   "Steps already present are left alone.")
    p.add_argument("source", help="sweep directory or URI to copy from (a sweep.json is not needed)")
    p.add_argument("storage", help="sweep directory or URI to copy into (created if missing)")
    p.add_argument("--spec", type=Path, help="copy only the steps this sweep YAML plans (default: every step)")

    p = sub.add_parser("results", help="results table of a sweep directory")
    p.add_argument("storage", help="sweep directory or URI")
    p.add_argument("--stage", default="final", help="row stage to show (default: %(default)s; 'all' for every row)")
    p.add_argument("--csv", type=Path, help="also write the rows to this CSV file")

    p = sub.add_parser("report", help="figures (Figures 3, 5, 6 style), Table 1 and index.html from a sweep",
                       description="Read a sweep's Parquet rows and write the paper-style figures and tables, "
                                   "an index.html to open them all, and log them to the sweep's MLflow run.")
    p.add_argument("storage", help="sweep directory or URI")
    p.add_argument("--out", type=Path, help="output directory (default: SWEEP_DIR/report)")
    p.add_argument("--format", default="png", choices=["png", "svg", "pdf"], help="figure format (default: png)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--tsc-setting", type=_e_t, metavar="E,T",
                   help="TSC's (E_TSC, t) in Table 1 (default: the paper's 3,0.4; 2,0.25 self-supervised)")

    p = sub.add_parser("defenses", help="list the defenses, or one defense's settings and presets",
                       description="Without NAME: every registered defense with its grid axes and training methods. "
                                   "With NAME: its settings and their values under a preset (what a sweep's "
                                   "defense.NAME section and `purify --set` accept).")
    p.add_argument("name", nargs="?", help="a defense, e.g. nc")
    p.add_argument("--preset", default="paper", choices=PRESETS,
                   help="preset whose values to show (default: %(default)s)")

    p = sub.add_parser("demo", help="backdoor a small CNN on the embedded data, then purify it with TSC and MCR",
                       description="The end-to-end demo on the embedded Fashion-MNIST subset: BadNets at 10% "
                                   "poison on a small CNN, then TSC (and MCR beside it), in a few minutes on a "
                                   "laptop CPU.")
    p.add_argument("--out", type=Path, default=Path("tscray-demo"), help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (lower fidelity)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch")
    return parser


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k.upper()} {metrics[k]:6.2f}%" for k in ("acc", "asr") if k in metrics)


def _defense_config(args: argparse.Namespace):
    """The defense and its config from ``--defense``, ``--preset``, the shortcut flags and ``--set``."""
    import dataclasses

    from tscray import defenses
    from tscray.defenses.base import resolve_config

    defense = defenses.get(args.defense)
    fields = {f.name for f in dataclasses.fields(defense.config)}
    flags = {"rounds": args.rounds, "t": args.t, "curve_epochs": args.curve_epochs,
             "finetune_epochs": args.finetune_epochs, "batch_size": args.batch_size}
    overrides: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        # A defense whose own training is a fine-tune (finetune) takes --finetune-epochs as its epochs.
        field_name = "epochs" if name == "finetune_epochs" and name not in fields and "epochs" in fields else name
        if field_name not in fields:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to defense {args.defense!r} "
                             f"(its settings: tscray defenses {args.defense})")
        overrides[field_name] = value
    overrides.update(_options(args.settings, "--set"))
    if "seed" in fields:
        overrides.setdefault("seed", args.seed)
    return defense, resolve_config(defense, args.preset, overrides)


def _purify_target(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    """The class ASR is measured against: ``--target``, else the checkpoint's recorded target, else 0. A
    ``--target`` that contradicts the recorded one is refused: the ASR would look clean."""
    recorded = meta.get("target")
    if recorded is not None and not isinstance(recorded, int):
        raise ValueError(f"{args.model}: metadata target {recorded!r} is not a class index")
    if args.target is not None and recorded is not None and args.target != recorded:
        raise ValueError(f"--target {args.target} contradicts {args.model}, which records target {recorded} "
                         "(drop --target to use it)")
    return args.target if args.target is not None else (recorded if recorded is not None else 0)


def _purify_data(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """``--data`` (and ``--data-kw``), else the dataset and load options recorded in the checkpoint; a bare
    state dict needs ``--data``."""
    from tscray import data

    given = _options(args.data_kw, "--data-kw")
    recorded, kw = meta.get("data"), meta.get("data_kw") or {}
    if args.data is not None:
        # the same data as recorded keeps its recorded options (image size, split): others mix train and test
        same = isinstance(recorded, str) and _same_data(str(args.data), recorded)
        return str(args.data), ({**kw, **given} if same else given), ("--data-kw or the recorded data_kw" if same
                                                                      and kw else "--data-kw")
    if not isinstance(recorded, str) or not recorded:
        raise ValueError(f"{args.model} does not record the dataset it was trained on; pass --data "
                         f"(one of {', '.join(data.DATASETS.names())}, or a path to your own data)")
    return recorded, {**kw, **given}, "--data-kw or the recorded data_kw" if kw else "--data-kw"


def _carried(meta: dict[str, Any], args: argparse.Namespace, target: int, attack_kw: dict[str, Any],
             ds: Any, data_kw: dict[str, Any], resource: Path | None) -> dict[str, Any]:
    """What a purified model records of the backdoored one, so that reading it again measures ASR against
    the same target, trigger and data (it recorded only the architecture and defense before)."""
    out: dict[str, Any] = {k: meta[k] for k in ("rate", "seed") if k in meta}
    out.update(target=target, data=_recorded_data(ds.name), data_kw=data_kw, **_data_identity(ds))
    attack = args.attack or meta.get("attack")
    if attack:
        out.update(attack=attack, attack_kw=attack_kw if args.attack else meta.get("attack_kw", {}))
    if resource is not None:
        out["attack_resource"] = str(Path(resource).expanduser().resolve())
    return out


def _data_identity(ds: Any) -> dict[str, Any]:
    """What a checkpoint records to know its data again: the class names where the data has them (a class
    folder added or renamed shifts every label after it) and the content hash of the user's own data."""
    from tscray import data_record

    out: dict[str, Any] = {}
    if ds.class_names is not None:
        out["classes"] = list(ds.class_names)
    if data_record.user_datasets([ds.name]):
        out["data_sha256"] = data_record.fingerprint(ds.name)
    return out


def _check_classes(meta: dict[str, Any], ds: Any, model: Path) -> None:
    """Refuse data whose classes are not the ones the model was trained on: its target and labels would name
    other classes, and ACC and ASR would be measured against them. A note when the user's data at the
    recorded path changed since (purifying on it is fine, but the numbers are not the earlier ones)."""
    from tscray import data_record

    want, have = meta.get("classes"), ds.class_names
    if want is not None and have is not None and list(have) != want:
        i = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        then, now = (want[i] if i < len(want) else None), (have[i] if i < len(have) else None)
        raise ValueError(f"{ds.name} has classes {_few(list(have))}, but {model} was trained on {_few(want)} "
                         f"(label {i}: {then!r} then, {now!r} now); pass the data it was trained on")
    sha = meta.get("data_sha256")
    if sha and data_record.user_datasets([ds.name]) and data_record.fingerprint(ds.name) != sha \
            and _same_data(ds.name, str(meta.get("data", ""))):
        _log(f"note: {ds.name} changed since {model.name} was trained on it (content hash {sha[:12]}, now "
             f"{data_record.fingerprint(ds.name)[:12]}); ACC and ASR are measured on the data as it is now")


def _few(names: list[str], n: int = 6) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"


def _recorded_data(name: str) -> str:
    """The dataset as a checkpoint records it: a path made absolute (``--data shapes.npz`` recorded as given
    was not found by ``purify`` run from another folder), as a sweep's grid does; a registered name as is."""
    from tscray.config import dataset_entry

    return dataset_entry(name)


def _same_data(a: str, b: str) -> bool:
    """Whether two dataset names or paths name the same data."""
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


META_TYPES: dict[str, tuple[type, ...]] = {"arch": (str,), "arch_kw": (dict,), "attack": (str,), "attack_kw": (dict,),
                                           "data": (str,), "data_kw": (dict,), "target": (int,), "rate": (int, float),
                                           "classes": (list,), "data_sha256": (str,)}


def _checked_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata, the fields tscray reads type-checked. The file is untrusted: a recorded
    architecture that names code to import (``module:builder``) is refused, as only the user may choose to
    run code; torchvision's builders and the registered architectures are data."""
    from tscray import checkpoint
    from tscray.models import external

    meta = checkpoint.read_meta(path)
    for key, types in META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise checkpoint.CheckpointError(f"{path}: metadata {key} {json.dumps(value)[:80]} is not a "
                                             f"{' or '.join(t.__name__ for t in types)}")
    if isinstance(meta.get("classes"), list) and not all(isinstance(c, str) for c in meta["classes"]):
        raise checkpoint.CheckpointError(f"{path}: metadata classes {json.dumps(meta['classes'])[:80]} are not "
                                         "class names")
    arch = meta.get("arch")
    if arch and external.is_external(arch) and not arch.startswith(external.TORCHVISION):
        raise checkpoint.CheckpointError(
            f"{path}: records architecture {arch!r}, code to import; tscray does not run code a checkpoint "
            f"names. If you trust it, pass --arch {arch} (and --arch-kw) yourself")
    return meta


def _load_data(name: str, root: str | None, kw: dict[str, Any], where: str = "--data-kw") -> Any:
    """The dataset ``name`` (a registered name or a path) with load options ``kw``, checked as a sweep's
    ``data_kw`` is; a bad option is one clear line naming ``where`` it was written."""
    from tscray import data
    from tscray.config import data_options_problems, dataset_entry
    from tscray.data import custom

    name = dataset_entry(name)
    if name not in data.DATASETS and not custom.is_path(name):
        data.DATASETS.get(name)  # an unknown name: the registry's message lists the known ones
    problems = data_options_problems(name, kw, f"{where} ")
    if problems:
        raise ValueError("; ".join(problems))
    return data.load(name, root, **kw)


def _sibling(model: Path, suffix: str) -> Path:
    """``model``'s name with its own extension (only: ``run.s1.safetensors`` keeps ``run.s1``) replaced by
    ``suffix``: the default names of an attack's resource and a purified model."""
    name = model.name
    for ext in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return model.with_name(name + suffix)


def _resource_path(model: Path) -> Path:
    return _sibling(model, ".attack.safetensors")


def _check_out(out: Path, *inputs: Path) -> None:
    """An output model path: safetensors by name (that is what is written: a ``.pt`` name tells other tools
    to unpickle it), and never a file this command reads."""
    if not out.name.lower().endswith(".safetensors"):
        raise ValueError(f"--out {out}: tscray writes safetensors; name the file *.safetensors")
    for p in inputs:
        if p is not None and out.expanduser().resolve() == Path(p).expanduser().resolve():
            raise ValueError(f"--out {out} would overwrite the input {p}; choose another path")


def _check_target(target: int, ds: Any, what: str = "--target") -> None:
    """A target class the data has (an out-of-range one failed deep inside training, or read as ASR 0)."""
    if not 0 <= target < ds.num_classes:
        raise ValueError(f"{what} {target} is not a class of {ds.name} (its classes are 0..{ds.num_classes - 1})")


def _build_model(arch: str, ds: Any, arch_kw: dict[str, Any], where: str = "--arch-kw") -> Any:
    """The architecture for ``ds``; options it cannot take are named with ``where`` they were written (the
    model's own TypeError names neither the flag nor the architecture)."""
    from tscray import models

    try:
        return models.build(arch, ds.num_classes, ds.in_channels, input_hw=ds.input_hw, **arch_kw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: architecture {arch!r} does not take {json.dumps(arch_kw)}: "
                         f"{str(err)[:200]}") from None


def cmd_purify(args: argparse.Namespace) -> int:
    from tscray import attacks, checkpoint, data, methods, models
    from tscray.defenses import CleanData

    _setup(args)
    defense, cfg = _defense_config(args)  # the arguments first: naming a bad one needs no model
    if args.attack:
        attacks.ATTACKS.get(args.attack)
    meta = _checked_meta(args.model)
    out = args.out or _sibling(args.model, ".purified.safetensors")
    _check_out(out, args.model, args.attack_resource)
    arch = args.arch or meta.get("arch")
    if not arch:
        raise ValueError(f"{args.model} carries no architecture; pass --arch (one of {', '.join(models.names())})")
    arch_kw = args.arch_kw if args.arch_kw is not None else meta.get("arch_kw", {})
    target = _purify_target(args, meta)
    data_name, data_kw, data_kw_from = _purify_data(args, meta)
    ds = _load_data(data_name, args.data_root, data_kw, data_kw_from)
    _check_classes(meta, ds, args.model)  # (first: a removed class folder is what a target out of range means)
    _check_target(target, ds, "--target" if args.target is not None else "the checkpoint's target")
    model = _build_model(arch, ds, arch_kw, "--arch-kw" if args.arch_kw is not None
                         else f"arch_kw recorded in {args.model.name}")
    if defense.check_model is not None:
        defense.check_model(model)
    try:
        checkpoint.load_into(model, args.model)
    except checkpoint.CheckpointError as err:
        if "shape mismatch" not in str(err):
            raise
        raise checkpoint.CheckpointError(f"{err} (built {arch} for {ds.name}: {ds.num_classes} classes, "
                                         f"{ds.in_channels} channel(s); pass --data for the dataset the model "
                                         "was trained on)") from None
    model.to(args.device)
    attack_kw = args.attack_kw if args.attack_kw is not None else (
        meta.get("attack_kw", {}) if meta.get("attack") == args.attack else {})
    try:
        attack = attacks.build(args.attack, **attack_kw) if args.attack else None
    except TypeError as err:  # an option the attack does not take: name where it came from
        where = "--attack-kw" if args.attack_kw is not None else f"attack_kw recorded in {args.model.name}"
        raise ValueError(f"{where}: attack {args.attack!r} does not take {json.dumps(attack_kw)[:120]}: "
                         f"{str(err)[:160]}") from None
    resource = None
    if attack is not None and not attack.ready:
        res = args.attack_resource or _resource_path(args.model)
        if not res.exists() and isinstance(meta.get("attack_resource"), str) and meta.get("attack") == args.attack:
            res = Path(meta["attack_resource"])  # a purified model's: the resource of the model it came from
        if not res.exists():
            raise ValueError(f"attack {args.attack!r} needs its resource to build the triggered test set; "
                             f"pass --attack-resource (no {res})")
        attack.load_resource(checkpoint.load_state(res))
        resource = res
    evaluate = attacks.evaluator(ds, attack, target)
    idx = (data.balanced_clean_subset(ds.train.y, args.clean_ratio, args.seed) if args.clean_balanced
           else data.clean_subset(len(ds.train), args.clean_ratio, args.seed))
    clean = CleanData(ds.train.subset(idx), ds.prep, args.device)
    _log(f"{args.model}: {arch} on {ds.name}; defender holds {len(idx)} clean images "
         f"({args.clean_ratio:.1%}); defense {defense.name} ({args.preset} preset)")
    if attack is not None:
        rate = f", poisoned at {meta['rate']:.1%}" if isinstance(meta.get("rate"), (int, float)) else ""
        _log(f"ASR: {args.attack} trigger, target class {target}{rate}")
    before = evaluate(model)
    _log(f"before: {_fmt(before)}")
    t0 = time.time()
    result = defense.run(model, clean, methods.build("supervised"), cfg, evaluate, _log)
    after = evaluate(result.model)
    checkpoint.save_model(result.model, out, arch=arch, arch_kw=arch_kw, defense=defense.name,
                          config=repr(cfg), source=str(args.model), **_carried(meta, args, target, attack_kw,
                                                                                ds, data_kw, resource))
    print(f"\n{'':8}{'ACC':>8}{'ASR':>8}")
    for name, m in (("before", before), ("after", after)):
        print(f"{name:8}{m['acc']:7.2f}%" + (f"{m['asr']:7.2f}%" if "asr" in m else f"{'-':>8}"))
    _log(f"purified in {time.time() - t0:.0f}s; wrote {out}")
    return 0


def cmd_backdoor(args: argparse.Namespace) -> int:
    from tscray import attacks, checkpoint
    from tscray.optim import OptimConfig

    _setup(args)
    _check_out(args.out)
    data_kw = _options(args.data_kw, "--data-kw")
    ds = _load_data(args.data, args.data_root, data_kw)
    _check_target(args.target, ds)
    _build_model(args.arch, ds, args.arch_kw or {})  # bad options fail here, before any training
    try:
        attack = attacks.build(args.attack, **(args.attack_kw or {}))
    except TypeError as err:
        raise ValueError(f"--attack-kw: attack {args.attack!r} does not take {json.dumps(args.attack_kw)[:120]}: "
                         f"{str(err)[:160]}") from None
    recipe = attacks.TrainRecipe(args.epochs, args.batch_size, OptimConfig(lr=args.lr))
    _log(f"training {args.arch} on {ds.name} with {args.attack} at {args.rate:.1%} poison, target {args.target}")
    resource = attack.prepare(ds, args.rate, args.target, args.seed, args.device)
    bd = attacks.train_backdoored(ds, args.arch, attack, args.rate, args.target, args.seed, recipe, args.device,
                                  args.arch_kw, lambda e, n, loss: _log(f"epoch {e}/{n} loss {loss:.4f}"))
    m = bd.evaluate(bd.model)
    checkpoint.save_model(bd.model, args.out, arch=args.arch, arch_kw=args.arch_kw or {}, attack=args.attack,
                          attack_kw=args.attack_kw or {}, rate=args.rate, target=args.target,
                          data=_recorded_data(ds.name), data_kw=data_kw, seed=args.seed, **_data_identity(ds))
    _log(f"backdoored model: {_fmt(m)}; wrote {args.out}")
    if resource is not None:
        res = checkpoint.save_tensors(resource, _resource_path(args.out), attack=args.attack,
                                      attack_kw=args.attack_kw or {}, target=args.target,
                                      data=_recorded_data(ds.name), seed=args.seed)
        _log(f"wrote the attack's resource to {res} (purify reads it to rebuild the trigger)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tscray.config import load_spec
    from tscray.plan import summarize
    from tscray.store import Store
    from tscray.sweep import describe_plan, run_sweep

    spec = load_spec(args.spec)
    from tscray.tracking import mlflow_uri_problem

    # (the environment's URI only where neither the option nor the spec names one: it is not used otherwise)
    env = None if args.mlflow_uri or spec.mlflow_uri else os.environ.get("MLFLOW_TRACKING_URI")
    for given, what in ((args.mlflow_uri, "--mlflow-uri"), (env, "$MLFLOW_TRACKING_URI")):
        if given and (why := mlflow_uri_problem(given)) is not None:
            raise ValueError(f"{what}: {why}")
    if args.mlflow_uri:
        import dataclasses

        spec = dataclasses.replace(spec, mlflow_uri=args.mlflow_uri)
    if args.storage and "://" not in args.storage:  # a local path: checked as the spec's own (it failed once Ray ran)
        from tscray.config import _check_storage

        problems: list[str] = []
        _check_storage(args.storage, spec.name, problems)
        if problems:
            raise ValueError("--" + problems[0])
    uri = spec.storage_path(args.storage)
    store = Store(uri)
    store.probe()  # an unreachable storage: one line before any compute
    if args.dry_run:
        from tscray import data_record, results

        data_record.check(store, data_record.spec_inputs(spec), uri, write=False)
        # finished: a results file holding the planned final step's rows (not one written under other settings),
        # as the sweep itself counts them: with or without a sweep.json (result files copied into a fresh storage)
        done = results.finished_steps(store)
        print(describe_plan(summarize(spec, done)))
        print(f"storage: {uri}")
        return 0
    summary = run_sweep(spec, args.storage, args.address,
                        fault_kill_at=int(os.environ.get("TSCRAY_FAULT_KILL_WORKER_AT_STEP", "0")))
    if summary["done"] == summary["trials"]:
        return 0
    return 1 if summary.get("errors") else 130  # trials errored, or the sweep was stopped (Ctrl-C) before them


def _store_at(location: str):
    """The storage at a local path or URI, reachable (``probe`` names what is wrong otherwise)."""
    from tscray.store import Store

    store = Store(location if "://" in location else str(Path(location).resolve()))
    store.probe()
    return store


def _open_store(location: str):
    store = _store_at(location)
    if not store.exists("sweep.json"):
        raise FileNotFoundError(f"{location}: not a tscray sweep directory (no sweep.json)")
    return store


def cmd_status(args: argparse.Namespace) -> int:
    from tscray import results

    store = _open_store(args.storage)
    info = _sweep_info(store)
    stored = store.step_keys()
    # only steps whose artifacts have the sizes their manifests recorded count (`tscray verify` checks hashes)
    steps = {k: [key for key in v if store.check_step(k, key, deep=False) is None] for k, v in stored.items()}
    damaged = sum(len(v) for v in stored.values()) - sum(len(v) for v in steps.values())
    comp = store.computations(stored)
    from tscray import sweep_record

    plans = sweep_record.plans(info)  # every recorded spec: slices or earlier grids may have run here too
    planned = sweep_record.planned_ids(info)
    bad: list[str] = []
    foreign: list[str] = []  # result files copied in from another sweep: not this one's trials
    done = set(results.read(store, bad, planned, foreign).column("trial_id").to_pylist())
    total_trials, total_steps, specs = info["trials"], info["steps"], 1
    if plans:
        specs = len(plans)
        total_trials, total_steps = len(planned or ()), len({k for p in plans for k in p.steps})
    print(f"sweep {info['spec']['name']} ({info['sweep_id']}) at {store.uri}"
          + (f" ({specs} specs ran on it; counts are over all of them)" if specs > 1 else ""))
    print(f"trials: {len(done)}/{total_trials} finished"
          + (f" ({len(bad)} unreadable result file(s): run `tscray verify --repair`)" if bad else "")
          + (f"; {len(foreign)} result file(s) of trials no recorded spec plans" if foreign else ""))
    by_kind = ", ".join(f"{k} {len(v)}" for k, v in sorted(steps.items()) if v)
    print(f"steps : {sum(len(v) for v in steps.values())}/{total_steps} computed" + (f" ({by_kind})" if by_kind else "")
          + (f"; {damaged} damaged (recomputed on the next run; `tscray verify` for details)" if damaged else ""))
    leases = [n[: -len(".json")] for n in store.listdir("leases") if n.endswith(".json")]
    if leases:
        live = [k for k in leases if (h := store.lease_holder(k)) is not None and h[1]]
        print(f"in progress: {len(live)} step(s) being computed by a driver now"
              + (f" ({len(leases) - len(live)} expired lease(s) of a stopped driver)" if len(live) < len(leases) else ""))
    again = sum(1 for n in comp.values() if n > 1)
    print(f"computations: {sum(comp.values())}" + (f" ({again} steps computed more than once)" if again else ""))
    return 0


def _sweep_info(store: Any) -> dict[str, Any]:
    """``sweep.json``, or one line naming it when it is unreadable."""
    from tscray import sweep_record

    return sweep_record.read(store)


def _warn_damaged(bad: list[str]) -> None:
    if bad:
        print(f"warning: skipped {len(bad)} unreadable result file(s): {', '.join(bad[:3])}"
              f"{' ...' if len(bad) > 3 else ''} (`tscray verify --repair` rebuilds their rows)", file=sys.stderr)


def _output_path(path: Path, option: str, folder: bool) -> None:
    """Refuse, before any work, an output the command could not write: a file where a folder goes, a folder
    where a file goes, a parent that is a file or missing (for a file)."""
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{option}: {path} is a file; give a folder for the report")
    if not folder and path.is_dir():
        raise ValueError(f"{option}: {path} is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option}: {path} runs through {parent}, which is a file, not a folder")
            break
        if not folder:
            raise ValueError(f"{option}: folder {path.parent} does not exist")


def _warn_foreign(foreign: list[str]) -> None:
    if foreign:
        print(f"warning: left out {len(foreign)} result file(s) of trials no recorded spec of this storage plans: "
              f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} (copied in from another sweep?)",
              file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    from tscray.verify import verify_store

    store = _open_store(args.storage)
    report = verify_store(store, repair=args.repair, deep=not args.quick)
    for line in report.lines():
        print(line)
    if report.clean:
        print("store is intact")
        return 0
    return 0 if args.repair and report.record_problem is None else 1  # repair cannot rewrite a lost spec


def cmd_import_steps(args: argparse.Namespace) -> int:
    from tscray import data_record

    src = _store_at(args.source)
    available = src.step_keys()
    if not available:
        raise FileNotFoundError(f"{args.source}: no stored steps (expected a sweep directory with steps/)")
    spec_data: list[str] = []
    if args.spec is not None:
        from tscray.config import load_spec
        from tscray.plan import make_plan

        wanted: dict[str, set[str]] = {}
        spec = load_spec(args.spec, check_data=False)
        spec_data = data_record.spec_inputs(spec)
        for step in make_plan(spec).steps.values():
            wanted.setdefault(step.kind, set()).add(step.key)
        available = {k: [key for key in v if key in wanted.get(k, set())] for k, v in available.items()}
    dst = _store_at(args.storage)
    # steps computed on other data at the same path are refused; with --spec, only the spec's data matters
    adopt = data_record.merge(src, dst, spec_data if args.spec is not None else None)
    present = {k: set(v) for k, v in dst.step_keys().items()}
    copied: dict[str, int] = {}
    skipped = damaged = 0
    todo = [(k, key) for k, v in sorted(available.items()) for key in v]
    for i, (kind, key) in enumerate(todo, 1):
        if key in present.get(kind, ()) and dst.check_step(kind, key, deep=False) is None:
            skipped += 1
        elif (problem := dst.copy_step_from(src, kind, key)) is not None:
            damaged += 1
            print(f"not copied: {kind}/{key}: {problem}", file=sys.stderr)
        else:
            copied[kind] = copied.get(kind, 0) + 1
        if sys.stderr.isatty() and (i % 50 == 0 or i == len(todo)):
            print(f"\r{i}/{len(todo)} steps looked at", end="" if i < len(todo) else "\n", file=sys.stderr, flush=True)
    if copied:
        data_record.adopt(dst, adopt)
    print(f"copied {sum(copied.values())} step(s) into {dst.uri}"
          + (f" ({', '.join(f'{k} {n}' for k, n in sorted(copied.items()))})" if copied else "")
          + f"; {skipped} already there" + (f"; {damaged} damaged in the source, not copied" if damaged else ""))
    return 1 if damaged else 0


def cmd_results(args: argparse.Namespace) -> int:
    from tscray import results

    from tscray import sweep_record

    if args.csv:
        _output_path(Path(args.csv), "--csv", folder=False)
    store = _open_store(args.storage)
    try:
        planned = sweep_record.planned_ids(sweep_record.read(store))
    except ValueError:  # an unreadable sweep.json: every readable file's rows (`tscray verify` names it)
        planned = None
    bad: list[str] = []
    foreign: list[str] = []
    table = results.read(store, bad, planned, foreign)
    _warn_damaged(bad)
    _warn_foreign(foreign)
    rows = table.to_pylist()
    stages = sorted({r["stage"] for r in rows if r["stage"]})
    if args.stage != "all" and rows and args.stage not in stages:  # (it read as "no result rows yet")
        raise ValueError(f"--stage: no rows of stage {args.stage!r}; stages here: {', '.join(stages)}, all")
    if args.stage != "all":
        rows = [r for r in rows if r["stage"] == args.stage]
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=table.schema.names)
            w.writeheader()
            w.writerows(rows)
    if not rows:
        print("no result rows yet")
        return 0
    axes = [c for c in table.schema.names if "." in c and any(r.get(c) is not None for r in rows)]  # field axes
    cols = ["dataset", "arch", "attack", "poison_rate", "seed", "defense", "e_tsc", "t", *axes, "round", "stage",
            "acc", "asr"]
    rows.sort(key=lambda r: tuple(_sort_key(r.get(c)) for c in cols[:cols.index("round") + 1]))
    def fmt(col: str, v: Any) -> str:
        """A measure to two places; a setting exactly (a 0.5% poison rate is not 0.01, t 0.125 not 0.12)."""
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if col in ("acc", "asr") else f"{v:g}" if float(f"{v:g}") == v else repr(v)
        return str(v)

    cells = [[fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths)))
    return 0


def _sort_key(v: Any) -> tuple[int, float, str]:
    """Numbers in numeric order (seed 2 before seed 10), before text; unset last."""
    if v is None:
        return (2, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def cmd_report(args: argparse.Namespace) -> int:
    from tscray.sweep import report_sweep

    store = _open_store(args.storage)
    out = args.out or (Path(store.uri) / "report" if "://" not in store.uri else Path("report"))
    _output_path(out, "--out", folder=True)
    from tscray.report import is_report_folder

    # a folder of the user's own (a site, the storage itself): the report would replace its files
    # (the default is the storage's own report folder; for a remote storage it is ./report, anyone's)
    if (args.out is not None or "://" in store.uri) and out.is_dir() and any(out.iterdir()) \
            and not is_report_folder(out):
        raise ValueError(f"--out: {out} holds files that are not a tscray report; give a new or empty folder, or "
                         "an earlier report's")
    bad: list[str] = []  # unreadable result files, named once the report's single read found them
    foreign: list[str] = []
    rep = report_sweep(store, out, args.format, mlflow=not args.no_mlflow, tsc_setting=args.tsc_setting, damaged=bad,
                       foreign=foreign)
    _warn_damaged(bad)
    _warn_foreign(foreign)
    for n in rep.notes:
        print(f"note: {n}", file=sys.stderr)
    for p in rep.figures + rep.tables:
        print(f"wrote {p}")
    for s in rep.skipped:
        print(f"skipped {s}")
    print(f"open {rep.index}")
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    import dataclasses

    from tscray import defenses
    from tscray.defenses.base import OPTIM_KEYS, _optim_fields

    if args.name is None:
        width = max(len(n) for n in defenses.DEFENSES.names())
        for d in defenses.DEFENSES.values():
            extra = [f"grid axes: {', '.join(d.axes)}"] if d.axes else []
            extra += [f"methods: {', '.join(d.methods)}"]
            print(f"{d.name:<{width}}  {d.summary}  ({'; '.join(extra)})")
        return 0
    d = defenses.get(args.name)
    cfg = d.make_config(args.preset)
    prefixes = _optim_fields(d.config)
    print(f"{d.name}: {d.summary} ({args.preset} preset)")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in prefixes:
            pre = f"{prefixes[f.name]}_" if prefixes[f.name] else ""
            for key, attr in OPTIM_KEYS.items():
                print(f"  {pre + key:<28} {getattr(value, attr)!r}")
        else:
            note = "  (grid axis)" if f.name in d.axes else "  (the trial's seed)" if f.name == "seed" else ""
            print(f"  {f.name:<28} {value!r}{note}")
    if d.columns:
        print(f"result columns: {', '.join(d.columns)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tscray.demo import run_demo

    _setup(args)
    return run_demo(args.out, quick=args.quick, device=args.device, log=_log)


COMMANDS = {"purify": cmd_purify, "backdoor": cmd_backdoor, "sweep": cmd_sweep, "status": cmd_status,
            "verify": cmd_verify, "import-steps": cmd_import_steps, "results": cmd_results, "report": cmd_report, "defenses": cmd_defenses, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a reader that stops early (``tscray status DIR | head``) ends it quietly."""
    try:
        rc = _main(argv)
        sys.stdout.flush()  # (a pipe's buffer is written here: a closed reader shows up now, not at exit)
        return rc
    except BrokenPipeError as err:
        if not _from_our_output(err):
            raise  # (a socket or a subprocess's pipe inside the command: a real error)
        # nothing more can reach the reader; point stdout at devnull so the exit flush cannot fail again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # (stdout is not a file descriptor)
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away


def _from_our_output(err: BaseException) -> bool:
    """Whether the error was raised writing tscray's own output: its innermost Python frame is in tscray
    (``print`` and ``flush`` are C, so a write to a closed stdout surfaces in the tscray line that made it)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).parent)


def _main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from tscray.checkpoint import CheckpointError
    from tscray.config import SpecError
    from tscray.registry import UnknownName

    try:
        return COMMANDS[args.command](args)
    except SpecError as err:
        print(f"tscray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, UnknownName, ValueError, FileNotFoundError) as err:
        print(f"tscray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except OSError as err:  # storage or network failing mid-command: one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"tscray {args.command}: error: {type(err).__name__}: {first}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from tscray.sweep import SweepStopped

        if not isinstance(err, SweepStopped):
            raise
        print(f"tscray {args.command}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
