"""Backdoor defenses in one registry, one module each.

Every module of this package registers its defense on import (``DEFENSES.register``), so adding a
defense is adding one file here; a defense in another package registers through the entry-point group
``tscray.defenses`` (``[project.entry-points."tscray.defenses"] mine = "mypkg.mydefense"``).
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
for _ep in entry_points(group="tscray.defenses"):
    _ep.load()


def get(name: str) -> Defense:
    """The registered defense ``name``."""
    return DEFENSES.get(name)


__all__ = ["DEFENSES", "CleanData", "Defense", "DefenseResult", "get"]
