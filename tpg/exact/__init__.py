"""The exact engine: J, values and grad J in float64, two independent ways."""

from .engine import (ExactSolution, enumerate_objective, exact_kl, grad_by_enumeration, kl_by_enumeration,
                     path_log_probs, path_returns, solve)

__all__ = ["ExactSolution", "enumerate_objective", "exact_kl", "grad_by_enumeration", "kl_by_enumeration",
           "path_log_probs", "path_returns", "solve"]
