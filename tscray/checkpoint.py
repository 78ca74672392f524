"""Saving and loading models safely. Checkpoints are untrusted input.

tscray writes safetensors with the architecture in the metadata. It reads safetensors, or a
PyTorch file through ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects;
anything else is rejected with a message saying why. Nothing here ever unpickles user data freely.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


def save_model(model: nn.Module, path: str | os.PathLike, arch: str | None = None,
               **meta: Any) -> Path:
    """Write ``model``'s state dict as safetensors (atomically), with ``arch`` and ``meta`` as metadata."""
    return save_tensors(model.state_dict(), path, arch=arch, **meta)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, **meta: Any) -> Path:
    """Write named tensors (a state dict, an attack's resource) as safetensors, atomically, with metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "tscray", "meta": json.dumps(meta, default=str)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """tscray metadata of a safetensors checkpoint ({} for other files)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    if not path.is_file():
        raise CheckpointError(f"{path}: {'a folder, not a checkpoint file' if path.is_dir() else 'no such checkpoint file'}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({err})") from None
    return json.loads(meta.get("meta", "{}"))


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common wrappers {'state_dict': ...} / {'model': ...}."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path)
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            prefix = "module."
            if all(k.startswith(prefix) for k in obj):
                return {k[len(prefix):]: v for k, v in obj.items()}
            return dict(obj)
    raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a weights-only PyTorch file; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'a folder, not a checkpoint file' if path.is_dir() else 'no such checkpoint file'}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: corrupt or not a safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects beyond tensors, and tscray loads "
            f"checkpoints with weights_only=True only (convert it to a plain state dict or safetensors). "
            f"Detail: {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({err})") from None
    return _unwrap(obj, path)


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into ``model``; a mismatch names the missing and unexpected keys."""
    state = load_state(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing: {few(missing)}" if missing else "", f"unexpected: {few(unexpected)}" if unexpected else "",
                 f"shape mismatch: {few(shapes)}" if shapes else ""]
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}; " + "; ".join(p for p in parts if p))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model
