"""The errors of the on-disk dataset loaders.

A dataset that is absent raises :class:`DatasetNotFound` (a ``FileNotFoundError``) whose message
names every path searched and the layout expected there; a dataset that is present but malformed
(wrong sizes or shapes, truncated or unreadable files, an unsafe pickle) raises ``ValueError``
naming the offending file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

HINT = "set --data-root or $TSCRAY_DATA, or pass download=True where there is internet"


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not under the data root (or no data root was given)."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) otherwise
        return str(self.args[0]) if self.args else ""


def no_root(name: str) -> DatasetNotFound:
    """The error for a loader called without a root while ``$TSCRAY_DATA`` is unset."""
    return DatasetNotFound(f"{name}: no data root given and $TSCRAY_DATA is unset; pass root= "
                           f"(--data-root on the command line) or export TSCRAY_DATA=/path/to/data")


def not_found(name: str, title: str, root: Path, searched: Sequence[Path], layout: str,
              hint: str = HINT) -> DatasetNotFound:
    """The error for a dataset absent from ``root`` (``searched``: the folders that were tried)."""
    tried = ", ".join(str(p) for p in searched)
    layout = layout.replace("<root>", str(root))
    return DatasetNotFound(f"{name}: no {title} under {root}; expected {layout} (searched: {tried}); {hint}")
