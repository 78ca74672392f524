"""The content-addressed artifact store of a sweep: the truth every resume starts from.

Layout under the sweep storage (a local directory or any ``pyarrow.fs`` URI such as ``s3://``):

    steps/<kind>/<key>/<artifact>.safetensors   models and tensors
    steps/<kind>/<key>/manifest.json            written last: a step exists iff its manifest does
    events/<key>.<uuid>.json                    one file per computation (to count them)
    results/trial-<id>.parquet                  one file per trial, rewritten whole

Local writes go to a temporary name and are renamed into place; on object stores each object
is written whole and the manifest last, so a reader never sees a half-written step.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any, Mapping

import pyarrow.fs as pafs

if TYPE_CHECKING:  # torch is imported lazily: light Tune trials use the store without it
    import torch


class Store:
    """Content-addressed step artifacts, computation events and per-trial results."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        self.uri = uri
        if filesystem is not None:  # an explicit pyarrow filesystem (tests use an in-memory one)
            self.fs, self.root = filesystem, uri
        elif "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

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
        """Write a step's tensor artifacts, then its manifest (which makes the step exist)."""
        from safetensors.torch import save as st_save

        d = self.step_dir(kind, key)
        for name, state in tensors.items():
            blob = st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})
            self.write_bytes(f"{d}/{name}.safetensors", blob)
        manifest = {**manifest, "kind": kind, "key": key, "artifacts": sorted(tensors), "written_at": time.time()}
        self.write_json(f"{d}/manifest.json", manifest)
        return manifest

    def load_tensors(self, kind: str, key: str, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        return st_load(self.read_bytes(f"{self.step_dir(kind, key)}/{name}.safetensors"))

    def step_keys(self) -> dict[str, list[str]]:
        """Existing (manifested) steps by kind."""
        out: dict[str, list[str]] = {}
        for kind in self.listdir("steps"):
            out[kind] = [k for k in self.listdir(f"steps/{kind}") if self.has_step(kind, k)]
        return out

    # ------------------------------------------------------------ events
    def log_computation(self, kind: str, key: str, seconds: float, device: str) -> None:
        self.write_json(f"events/{key}.{uuid.uuid4().hex}.json",
                        {"kind": kind, "key": key, "seconds": seconds, "device": device, "at": time.time()})

    def computations(self) -> dict[str, int]:
        """How many times each step key was computed (should be 1 for every key)."""
        counts: dict[str, int] = {}
        for name in self.listdir("events"):
            if name.endswith(".json"):
                key = name.split(".")[0]
                counts[key] = counts.get(key, 0) + 1
        return counts
