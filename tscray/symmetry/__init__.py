"""Weight symmetry: permutation specs, applying permutations, activation matching."""

from tscray.symmetry.match import correlations, match, matched_correlation, solve
from tscray.symmetry.permute import (Permutation, compose, identity, invert, permute, permute_state,
                                     random_permutation, spec_of)
from tscray.symmetry.spec import Expand, PermSpec, Probe
from tscray.symmetry.stats import CrossCorrelation

__all__ = ["CrossCorrelation", "Expand", "PermSpec", "Permutation", "Probe", "compose", "correlations",
           "identity", "invert", "match", "matched_correlation", "permute", "permute_state",
           "random_permutation", "solve", "spec_of"]
