"""Weight symmetry: permutation specs (hand-written or derived from the graph), applying permutations,
activation matching."""

from tscray.symmetry.derive import DeriveError, SpecMismatch, derive, verify
from tscray.symmetry.match import correlations, match, matched_correlation, solve
from tscray.symmetry.permute import (Permutation, compose, identity, invert, permute, permute_state,
                                     random_permutation, spec_of)
from tscray.symmetry.spec import Expand, PermSpec, Probe
from tscray.symmetry.stats import CrossCorrelation

__all__ = ["CrossCorrelation", "DeriveError", "Expand", "PermSpec", "Permutation", "Probe", "SpecMismatch",
           "compose", "correlations", "derive", "identity", "invert", "match", "matched_correlation", "permute",
           "permute_state", "random_permutation", "solve", "spec_of", "verify"]
