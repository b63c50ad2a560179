"""Exact numeric checks of every statement of docs/THEORY.md section 2, one module per statement.

Each module has ``NAME``, ``STATEMENT`` (the formula, one line), ``NEGATIVE`` (the negative
control, one line), ``check(mdp, policy)`` and ``negative_control(mdp, policy)``. Both compute
the two sides of an identity exactly in float64 (enumeration of every response against the
dynamic programme or autograd; no sampling) and return
``max |lhs - ref| / max(1, max |ref|)``. A statement holds when ``check <= 1e-10``; a negative
control fails as it must when ``negative_control > 1e-6``. :mod:`tpg.proofs_checks.runner` runs them
all on a default set of small MDPs.
"""

from . import critic_identity, eq26_gamma, gae_equality, lemma1, lemma2, td_identity, theorem1, theorem2
from .common import NEGATIVE_TOL, STATEMENT_TOL

#: the statement modules, in docs/THEORY.md order
STATEMENTS = [lemma1, lemma2, theorem1, eq26_gamma, theorem2, critic_identity, td_identity, gae_equality]

__all__ = ["NEGATIVE_TOL", "STATEMENTS", "STATEMENT_TOL", "critic_identity", "eq26_gamma", "gae_equality",
           "lemma1", "lemma2", "td_identity", "theorem1", "theorem2"]
