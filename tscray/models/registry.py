"""The architecture registry (kept apart so model modules can register without import cycles)."""

from tscray.registry import Registry

MODELS: Registry = Registry("architecture")
