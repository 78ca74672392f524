"""Backdoor defenses in one registry: ``tsc`` (Algorithm 1), ``mcr``, ``finetune``."""

from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult
from tscray.defenses import finetune, mcr, tsc  # noqa: F401  (registration)


def get(name: str) -> Defense:
    """The registered defense ``name``."""
    return DEFENSES.get(name)


__all__ = ["DEFENSES", "CleanData", "Defense", "DefenseResult", "get"]
