"""The exact engine: J, values and grad J in float64, two independent ways on the stored tree
(:mod:`.engine`), and the Markov-chain engine for shared policies on compact rewards at any horizon
(:mod:`.markov`)."""

from .engine import (ExactSolution, enumerate_objective, exact_kl, grad_by_enumeration, kl_by_enumeration,
                     path_log_probs, path_returns, solve)
from .markov import (MarkovSolution, choose_engine, markov_entropy, markov_kl, markov_objective,
                     markov_unsupported_reason, solve_markov)

__all__ = ["ExactSolution", "enumerate_objective", "exact_kl", "grad_by_enumeration", "kl_by_enumeration",
           "path_log_probs", "path_returns", "solve",
           "MarkovSolution", "choose_engine", "markov_entropy", "markov_kl", "markov_objective",
           "markov_unsupported_reason", "solve_markov"]
