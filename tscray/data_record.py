"""``data.json``: the content of the user's own data (a dataset named by its path, and the files its attacks
read: a pattern, a released trigger) that a storage's steps were computed on.

Step keys name a user dataset by its path, not its content. Edit the file or folder between two runs of a
sweep and a resume would reuse backdoored models trained on the old data and evaluate them on the new: numbers
from two datasets, silently in one table. So the first run records each path's content hash, and later runs,
and every worker before it computes on the data (a cluster node may hold another copy at the same path), check
it. Registered datasets (CIFAR-10 under a data root...) are not hashed: they do not change.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from tscray.store import Store

NAME = "data.json"
_CHUNK = 1 << 20
_MEMO: dict[tuple[Any, ...], str] = {}  # (path, files' sizes and times) -> hash: a resume does not read it all again


class DataChanged(ValueError):
    """The data at a path is not the data a storage's steps were computed on."""


def _files(p: Path) -> list[tuple[str, Path]]:
    """What the loader reads at ``p``, from the loader's own rule (:func:`tscray.data.custom.folder_files`): an
    ``.npz`` file itself, or each image with its split, label and path below the split (so moving an image to
    another class folder, which relabels it, counts; renaming ``train/`` to ``Train/`` does not)."""
    from tscray.data.custom import folder_files

    if not p.is_dir():
        return [("", p)]
    ff = folder_files(p)  # each name carries its label too: a new class-ordering rule relabels as much as a move
    out = [(f"train/{y}/{f.relative_to(ff.train_dir).as_posix()}", f) for f, y in ff.train]
    if ff.test is not None and ff.test_dir is not None:
        out += [(f"test/{y}/{f.relative_to(ff.test_dir).as_posix()}", f) for f, y in ff.test]
    return sorted(out)


def fingerprint(path: str | Path) -> str:
    """SHA-256 over the data at ``path``: each file's name below it, length and bytes."""
    p = Path(path).expanduser().resolve()
    files = _files(p)
    stats = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for rel, f in files
                  for st in (f.stat(),))
    key = (str(p), stats)
    if key in _MEMO:
        return _MEMO[key]
    h = hashlib.sha256()
    for (rel, f), (_, size, *_) in zip(files, stats):
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    # a file written in the last seconds may be written again within the clock's granularity, same size and
    # time: not memoised until its time is safely past (git's "racy clean" rule)
    if max((max(m, c) for _, _, m, c, _ in stats), default=0) < time.time_ns() - 2_000_000_000:
        _MEMO[key] = h.hexdigest()
    return h.hexdigest()


# the field axes whose values can name the user's files, or decide whether attacks read any
_NAMES_INPUTS = ("train.attack_kw", "ssl.")  # (and train.method itself)


def spec_inputs(spec: Any) -> list[str]:
    """What a sweep reads from the user, by path: its datasets (the grid's and SSL's downstream) and the files
    its attacks read (a pattern, a released trigger: :meth:`tscray.attacks.Attack.files`), made absolute.
    A grid axis that can name one (``train.attack_kw.lf.pattern: [a.npy, b.npy]``, ``ssl.downstream``,
    ``train.method``) is followed into each of its values, so a file named only there is recorded too."""
    from tscray import attacks
    from tscray.config import attack_kw_for

    names: list[str | None] = [*spec.grid.dataset]
    built: dict[str, list[str]] = {}  # files per (attack, options), whatever the blocks and variants

    def add(variant: Any, attack_names: Iterable[str]) -> None:
        names.append(variant.ssl.downstream)
        if variant.train.method != "supervised":
            return
        for a in attack_names:
            kw = attack_kw_for(variant.train, a)
            key = json.dumps([a, kw], sort_keys=True, default=str)
            if key not in built:
                try:
                    built[key] = [str(Path(f).expanduser().resolve()) for f in attacks.build(a, **kw).files()]
                except (TypeError, ValueError, OSError, KeyError):
                    built[key] = []  # (validation named it)
            names.extend(built[key])

    for g in spec.grids or (spec.grid,):
        axes = [(path, values) for path, values in g.field_axes
                if path == "train.method" or path.startswith(_NAMES_INPUTS)]
        if not axes:
            add(spec, g.attack)
            continue
        for combo in itertools.product(*(values for _, values in axes)):
            try:
                variant = spec.with_fields({path: v for (path, _), v in zip(axes, combo)})
            except ValueError:
                continue  # (validation named it)
            add(variant, g.attack)
    return user_datasets(names)


def user_datasets(names: Iterable[str | None]) -> list[str]:
    """The names among ``names`` that are paths to the user's own data, each once."""
    from tscray import data
    from tscray.data import custom

    return [n for n in dict.fromkeys(names) if n and n not in data.DATASETS and custom.is_path(n)]


def recorded(store: Store) -> dict[str, str]:
    """Path -> content hash, as recorded (empty when there is no record). An unreadable record is an error,
    not an empty one: taking it for none would accept any data."""
    if not store.exists(NAME):
        return {}
    try:
        raw = store.read_json(NAME)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataChanged(f"{store.uri}/{NAME}, the record of the data this storage's steps were computed on, is "
                          f"unreadable ({str(err)[:80]}); if the data has not changed since, delete it and it is "
                          "recorded again") from None
    if not isinstance(raw, dict):
        raise DataChanged(f"{store.uri}/{NAME}, the record of the data this storage's steps were computed on, is "
                          f"not a mapping of paths to hashes; if the data has not changed since, delete it and it "
                          "is recorded again")
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _add(store: Store, entries: dict[str, str]) -> None:
    """Add ``entries`` to the record, read again just before writing (another driver may have added paths
    while this one hashed)."""
    current = recorded(store)
    if any(current.get(p) != h for p, h in entries.items()):
        store.write_json(NAME, {**current, **entries})


def check(store: Store, names: Iterable[str | None], uri: str, write: bool = True) -> list[str]:
    """Refuse data whose content differs from what ``store`` recorded for its path; record (with ``write``)
    the paths it has no record of, and return them. Raises :class:`DataChanged` naming each changed path."""
    paths = user_datasets(names)
    if not paths:
        return []
    record = recorded(store)
    if not write and not any(p in record for p in paths):
        return []  # (nothing to compare with, nothing to record: no need to read the data)
    now = {p: fingerprint(p) for p in paths}
    changed = [p for p in paths if p in record and record[p] != now[p]]
    if changed:
        lines = [f"{p}: its content changed since this storage's steps were computed on it (content hash "
                 f"{record[p][:12]}, now {now[p][:12]})" for p in changed]
        raise DataChanged("; ".join(lines) + ". The stored models were trained on the old version, and a resume "
                          "would put numbers from both in one table. Restore the data, or run on a new storage "
                          f"(--storage); to go on here with the new data anyway, delete {uri}/{NAME} (the "
                          "finished trials keep the old data's numbers)")
    new = [p for p in paths if p not in record]
    if write and new:
        _add(store, {p: now[p] for p in new})
    return new


def verify(store: Store, name: str) -> None:
    """On a worker: refuse a user dataset whose copy here differs from the one the sweep recorded (a cluster
    node with a stale copy at the same path). Nothing to check for a registered dataset, without a record, or
    without the data (the loader names what is missing)."""
    if not user_datasets([name]) or not Path(name).expanduser().exists():
        return
    want = recorded(store).get(name)
    if want is not None and (have := fingerprint(name)) != want:
        raise DataChanged(f"{name} on {socket.gethostname()}: this copy differs from the data the sweep recorded "
                          f"in {NAME} (content hash {have[:12]}, recorded {want[:12]}); every node needs the same "
                          "data at this path")


def merge(src: Store, dst: Store, paths: Iterable[str] | None = None) -> dict[str, str]:
    """Before steps are copied from ``src`` into ``dst``: refuse when the two record other data at one of
    ``paths`` (default: every path ``src`` records), whose steps would be reused on the wrong data. Returns
    the entries to :func:`adopt` into ``dst``'s record once steps were copied."""
    theirs, ours = recorded(src), recorded(dst)
    if paths is not None:
        keep = set(paths)
        theirs = {p: h for p, h in theirs.items() if p in keep}
    clash = [p for p in theirs if p in ours and theirs[p] != ours[p]]
    if clash:
        raise DataChanged("; ".join(f"{p}: {src.uri}'s steps were computed on other data at this path than "
                                    f"{dst.uri}'s (content hash {theirs[p][:12]}, {ours[p][:12]})" for p in clash)
                          + ": their models would be reused on the wrong data; nothing was copied")
    return {p: h for p, h in theirs.items() if p not in ours}


def adopt(dst: Store, entries: dict[str, str]) -> None:
    """Record in ``dst`` the data copied steps were computed on, so its next run checks its data against it."""
    if entries:
        _add(dst, entries)
