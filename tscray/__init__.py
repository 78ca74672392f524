"""tscray: TSC backdoor purification (Two-stage Symmetry Connectivity) and a Ray sweep orchestrator."""

__version__ = "0.1.0"
