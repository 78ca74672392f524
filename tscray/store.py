"""The content-addressed artifact store of a sweep: the truth every resume starts from.

Layout under the sweep storage (a local directory or any ``pyarrow.fs`` URI such as ``s3://``):

    steps/<kind>/<key>/<artifact>.safetensors   models and tensors
    steps/<kind>/<key>/manifest.json            written last: a step exists iff its manifest does
                                                (it records each artifact's size and SHA-256)
    quarantine/<kind>/<key>.<time>/             damaged steps moved aside (recomputed on the next run)
    leases/<key>.json                           a driver computing the step (renewed while it runs)
    events/<key>.<uuid>.json                    one file per computation (to count them)
    results/trial-<id>.parquet                  one file per trial, rewritten whole
    results-stale/trial-<id>.parquet.<time>     a trial's results under settings the spec no longer has

Local writes go to a temporary name and are renamed into place; on object stores each object
is written whole and the manifest last, so a reader never sees a half-written step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import pyarrow.fs as pafs

try:
    import fcntl
except ImportError:  # (Windows)
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # torch is imported lazily: light Tune trials use the store without it
    import torch


class CorruptArtifact(ValueError):
    """A stored step artifact that is missing, truncated or altered (its size or hash differ)."""


class StorageUnreachable(ValueError):
    """The sweep storage cannot be read (an unknown host, no credentials, a bucket that does not exist)."""


class Store:
    """Content-addressed step artifacts, computation events and per-trial results."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        self.uri = uri
        if filesystem is not None:  # an explicit pyarrow filesystem (tests use an in-memory one)
            self.fs, self.root = filesystem, uri
        elif "://" in uri:
            try:  # (an S3 URI resolves its bucket's region here)
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except OSError as err:
                raise StorageUnreachable(f"storage {uri} cannot be read: {_first_line(err)}") from None
            if not self.root.strip("/"):
                raise StorageUnreachable(f"storage {uri} names no bucket or folder")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def probe(self) -> None:
        """Read the storage's root once, so an unreachable storage is one clear error before any compute."""
        try:
            info = self.fs.get_file_info(self.root)
            if not self.local and info.type == pafs.FileType.NotFound:  # a bucket is never made for the user
                bucket = self.root.strip("/").split("/")[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageUnreachable(f"storage {self.uri}: bucket {bucket!r} does not exist (create it first)")
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StorageUnreachable(f"storage {self.uri} cannot be read: {_first_line(err)}") from None

    def __reduce__(self):  # ship to Ray workers as the URI only
        return (Store, (self.uri,))

    # ------------------------------------------------------------ raw files
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def listdir(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def files(self, rel: str) -> list[str]:
        """The plain files in ``rel`` (not its folders)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def subdirs(self, rel: str) -> list[str]:
        """The folders in ``rel`` (a stray file there, such as a desktop's .DS_Store, is not one)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # ------------------------------------------------------------ steps
    @staticmethod
    def step_dir(kind: str, key: str) -> str:
        return f"steps/{kind}/{key}"

    def has_step(self, kind: str, key: str) -> bool:
        return self.exists(f"{self.step_dir(kind, key)}/manifest.json")

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        return self.read_json(f"{self.step_dir(kind, key)}/manifest.json")

    def put_step(self, kind: str, key: str, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                 manifest: dict[str, Any]) -> dict[str, Any]:
        """Write a step's tensor artifacts, then its manifest (which makes the step exist); a step stored
        intact already is kept, and its manifest returned."""
        from safetensors.torch import save as st_save

        if self.has_step(kind, key) and self.check_step(kind, key, deep=False) is None:
            # another driver stored it first (a lease that lapsed, or an object store's race): keep theirs,
            # since writing ours over it would pair one driver's manifest with the other's bytes under a reader
            return self.manifest(kind, key)
        d = self.step_dir(kind, key)
        files: dict[str, dict[str, Any]] = {}
        for name, state in tensors.items():
            blob = st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})
            files[name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            self.write_bytes(f"{d}/{name}.safetensors", blob)
        manifest = {**manifest, "kind": kind, "key": key, "artifacts": sorted(tensors), "files": files,
                    "written_at": time.time()}
        self.write_json(f"{d}/manifest.json", manifest)
        return manifest

    def load_tensors(self, kind: str, key: str, name: str) -> dict[str, torch.Tensor]:
        """A step's artifact, checked against the size and hash its manifest recorded."""
        from safetensors.torch import load as st_load

        rel = f"{self.step_dir(kind, key)}/{name}.safetensors"
        try:
            blob = self.read_bytes(rel)
        except FileNotFoundError:
            raise CorruptArtifact(f"{self.path(rel)} is missing") from None
        problem = _blob_problem(blob, self.manifest(kind, key).get("files", {}).get(name))
        if problem is None:
            try:
                return st_load(blob)
            except Exception as err:  # safetensors raises its own error types on bad headers
                problem = f"is not a readable safetensors file ({type(err).__name__})"
        raise CorruptArtifact(f"{self.path(rel)} {problem}")

    def check_step(self, kind: str, key: str, deep: bool = True) -> str | None:
        """What is wrong with a stored step (None when nothing): an unreadable manifest, a missing artifact,
        or one whose size (always) or content hash (``deep``) differs from the manifest's record."""
        d = self.step_dir(kind, key)
        try:
            manifest = self.manifest(kind, key)
        except FileNotFoundError:
            return "manifest.json is missing"
        except (ValueError, UnicodeDecodeError):
            return "manifest.json is not valid JSON"
        if not isinstance(manifest, dict) or not isinstance(manifest.get("records"), list) \
                or not isinstance(manifest.get("artifacts", []), list):
            return "manifest.json lacks its records or artifact list"
        files = manifest.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()) \
                or not all(isinstance(n, str) for n in manifest.get("artifacts", [])):
            return "manifest.json has a malformed artifact list or file table"
        for name in manifest.get("artifacts", []):
            rel = f"{d}/{name}.safetensors"
            info = self.fs.get_file_info(self.path(rel))
            if info.type != pafs.FileType.File:
                return f"{name}.safetensors is missing"
            meta = manifest.get("files", {}).get(name)
            if meta is not None and info.size != meta.get("bytes"):
                return f"{name}.safetensors has {info.size} bytes, its manifest recorded {meta.get('bytes')}"
            if deep:
                problem = _artifact_problem(self.read_bytes(rel), meta)
                if problem is not None:
                    return f"{name}.safetensors {problem}"
        return None

    def quarantine_step(self, kind: str, key: str, why: str) -> str:
        """Move a damaged step aside (its manifest first, so it stops existing at once); returns where."""
        src = self.step_dir(kind, key)
        dest = f"quarantine/{kind}/{key}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
        self.write_json(f"{dest}/why.json", {"kind": kind, "key": key, "why": why, "at": time.time()})
        manifest = self.path(f"{src}/manifest.json")
        if self.fs.get_file_info(manifest).type == pafs.FileType.File:
            self.fs.move(manifest, self.path(f"{dest}/manifest.json"))
        for name in self.listdir(src):
            try:
                self.fs.move(self.path(f"{src}/{name}"), self.path(f"{dest}/{name}"))
            except OSError:
                self.fs.delete_file(self.path(f"{src}/{name}"))
        return self.path(dest)

    def copy_step_from(self, src: "Store", kind: str, key: str) -> str | None:
        """Copy a step from another storage, each artifact checked against the hash its manifest recorded as
        it is read, the manifest written last (a copy cut short leaves no step). Returns what was wrong with
        the source step (nothing is written then), else None. Step keys hash everything a step depends on,
        so a step of any sweep is valid in any other that plans the same key."""
        problem = src.check_step(kind, key, deep=False)
        if problem is not None:
            return problem
        manifest = src.manifest(kind, key)
        d = self.step_dir(kind, key)
        blobs = {}
        for name in manifest.get("artifacts", []):
            blob = src.read_bytes(f"{d}/{name}.safetensors")
            problem = _artifact_problem(blob, manifest.get("files", {}).get(name))
            if problem is not None:
                return f"{name}.safetensors {problem}"
            blobs[name] = blob
        for name, blob in blobs.items():
            self.write_bytes(f"{d}/{name}.safetensors", blob)
        self.write_json(f"{d}/manifest.json", manifest)
        return None

    def step_keys(self) -> dict[str, list[str]]:
        """Existing (manifested) steps by kind."""
        out: dict[str, list[str]] = {}
        for kind in self.subdirs("steps"):
            out[kind] = [k for k in self.subdirs(f"steps/{kind}") if self.has_step(kind, k)]
        return out

    # ------------------------------------------------------------ leases
    def acquire_lease(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease on computing step ``key`` for ``owner``; False while another owner holds a live one.

        On a local or NFS storage every lease change happens under one lock (:meth:`_lease_lock`) and a lease
        is written whole (temp file, then rename), so of two takers of a free or expired lease (its holder
        stopped renewing it: a killed driver) exactly one wins. Taking one's own lease again renews it.
        Object stores have no lock: the lease is written if absent and read back, the last writer winning."""
        rel = f"leases/{key}.json"
        body = json.dumps({"owner": owner, "ttl": ttl, "at": time.time()}).encode()
        if self.local:
            with self._lease_lock():
                holder = self.lease_holder(key)
                if holder is not None and holder[1] and holder[0] != owner:
                    return False
                self.write_bytes(rel, body)  # free, expired, or this owner's own (renewed)
                return True
        holder = self.lease_holder(key)
        if holder is not None and holder[1] and holder[0] != owner:
            return False
        self.write_bytes(rel, body)
        holder = self.lease_holder(key)
        return holder is not None and holder[0] == owner

    @contextlib.contextmanager
    def _lease_lock(self) -> Iterator[None]:
        """Hold ``leases/.lock`` exclusively (``flock``: between processes, threads and, on NFS, hosts; the
        system drops it when its holder dies). Without it two takers of an expired lease could both take it,
        and a late renewal could overwrite a lease another driver had just taken."""
        if fcntl is None or not self.local:  # (object stores, or no flock here: leases are best effort)
            yield
            return
        path = self.path("leases/.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # (releases the lock)

    def lease_holder(self, key: str) -> tuple[str, bool] | None:
        """``(owner, live)`` of step ``key``'s lease, or None when there is none. Live: renewed within its ttl."""
        rel = f"leases/{key}.json"
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            return None
        try:
            lease = json.loads(self.read_bytes(rel))
            owner, ttl = str(lease["owner"]), float(lease["ttl"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return ("?", False)
        stamp = info.mtime.timestamp() if info.mtime is not None else float(lease.get("at", 0))
        return owner, time.time() - max(stamp, float(lease.get("at", 0))) < ttl

    def renew_lease(self, key: str, owner: str) -> None:
        """Keep a held lease live (its holder is still computing); a lease another driver has taken over, or
        one no longer readable, is left as it is."""
        rel = f"leases/{key}.json"
        with self._lease_lock():
            holder = self.lease_holder(key)
            if holder is None or holder[0] != owner:
                return
            try:
                lease = json.loads(self.read_bytes(rel))
            except (FileNotFoundError, ValueError):
                return
            self.write_bytes(rel, json.dumps({**lease, "at": time.time()}).encode())

    def release_lease(self, key: str, owner: str) -> None:
        with self._lease_lock():
            holder = self.lease_holder(key)
            if holder is not None and holder[0] == owner:
                try:
                    self.fs.delete_file(self.path(f"leases/{key}.json"))
                except (FileNotFoundError, OSError):
                    pass

    def release_leases(self, owner: str) -> int:
        """Drop every lease ``owner`` still holds (a driver stopping, e.g. on Ctrl-C, so a restart need not
        wait for them to expire); returns how many."""
        n = 0
        for name in self.listdir("leases"):
            if name.endswith(".json"):
                key = name[: -len(".json")]
                holder = self.lease_holder(key)
                if holder is not None and holder[0] == owner:
                    self.release_lease(key, owner)
                    n += 1
        return n

    # ------------------------------------------------------------ events
    def log_computation(self, kind: str, key: str, seconds: float, device: str, computation: str | None = None) -> None:
        """Record that step ``key`` was computed. ``computation`` is the id its manifest carries, so a kill
        between the manifest and this event still leaves the computation counted (see ``computations``)."""
        cid = computation or uuid.uuid4().hex
        self.write_json(f"events/{key}.{cid}.json",
                        {"kind": kind, "key": key, "seconds": seconds, "device": device, "at": time.time()})

    def computations(self, stored: dict[str, list[str]] | None = None) -> dict[str, int]:
        """How many times each step key was computed (should be 1 for every key): its events, plus one for a
        stored step whose own computation left no event (the driver died between manifest and event).
        ``stored``: :meth:`step_keys`, when the caller already listed them."""
        events: dict[str, set[str]] = {}
        for name in self.listdir("events"):
            if name.endswith(".json"):
                key, _, cid = name[: -len(".json")].partition(".")
                events.setdefault(key, set()).add(cid)
        counts = {k: len(v) for k, v in events.items()}
        for kind, keys in (self.step_keys() if stored is None else stored).items():
            for key in keys:
                if key not in events:
                    counts[key] = 1
                    continue
                try:
                    made_by = self.manifest(kind, key).get("computation")
                except (FileNotFoundError, ValueError, UnicodeDecodeError, AttributeError):
                    continue
                if made_by is not None and made_by not in events[key]:
                    counts[key] += 1
        return counts


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _artifact_problem(blob: bytes, meta: Mapping[str, Any] | None) -> str | None:
    """:func:`_blob_problem`, and for an artifact written before hashes were recorded, whether it parses."""
    problem = _blob_problem(blob, meta)
    if problem is None and meta is None:
        try:
            from safetensors.torch import load as st_load
            st_load(blob)
        except Exception as err:  # safetensors raises its own error types on bad headers
            problem = f"is not a readable safetensors file ({type(err).__name__})"
    return problem


def _blob_problem(blob: bytes, meta: Mapping[str, Any] | None) -> str | None:
    """How ``blob`` differs from its recorded size and SHA-256 (None when it matches or nothing was recorded)."""
    if meta is None:
        return None
    if len(blob) != meta.get("bytes"):
        return f"has {len(blob)} bytes, its manifest recorded {meta.get('bytes')}"
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        return "does not match the SHA-256 its manifest recorded"
    return None
