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


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: {'a folder, not a checkpoint file' if path.is_dir() else 'no such checkpoint file'}")
    return path


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file is safetensors by its content (an 8-byte header length, then a JSON object), whatever
    its name says: a model written as ``model.pt`` or ``MODEL.SAFETENSORS`` is still read as what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= size - 8


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """tscray metadata of a safetensors checkpoint ({} for other files and for safetensors without it)."""
    from safetensors import safe_open

    path = _existing(Path(path))
    if not (is_safetensors(path) or path.suffix.lower() == ".safetensors"):
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({err})") from None
    try:
        out = json.loads(meta.get("meta", "{}"))
    except ValueError as err:
        raise CheckpointError(f"{path}: its tscray metadata is not valid JSON ({err})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: its tscray metadata is a JSON {type(out).__name__}, not an object")
    return out


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
    path = _existing(Path(path))
    if is_safetensors(path) or path.suffix.lower() == ".safetensors":
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
    except Exception as err:  # noqa: BLE001 - untrusted bytes fail the unpickler in many ways (KeyError, IndexError...)
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err)[:160]})") from None
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
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:  # such a model's outputs are NaN: its ACC and ASR would read as a clean model's
        raise CheckpointError(f"{path}: holds NaN or infinite values in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model
