"""(tpg) Response-level and token-level TD errors: ``delta'_t = gamma^(t-1) delta_t``.

``delta'_t = r'_t + V'(s_{t+1}) - V'(s_t)`` with ``r'`` the ZRA reward (``RM(W)`` on the last
token, undiscounted), ``V'`` the response-level value by enumeration and ``V'`` of the end
state 0; ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)`` with the token-level values of the DP.
Since ``V'(s) = c(s) + gamma^d V(s)``, ``delta' = gamma^d delta`` for every non-terminal ``s``
(depth ``d = t - 1``) and token; at ``gamma = 1`` this is docs/THEORY.md's ``delta' = delta``.

Negative control: the plain claim ``delta' = delta`` on the MDP under ``gamma = 0.9`` (the
case's own ``gamma`` when already below 1); wrong at every depth ``>= 1`` where ``delta != 0``.

Both return ``max |lhs - delta'| / max(1, max |delta'|)`` over all (non-terminal, token).
"""

from __future__ import annotations

from tpg.exact.engine import nt_discount

from .common import negative_gamma, rel_diff, td_errors

NAME = "td_identity"
STATEMENT = "delta'_t = r'_t + V'(s_{t+1}) - V'(s_t) = gamma^(t-1) (r_t + gamma V(s_{t+1}) - V(s_t))"
NEGATIVE = "delta' = delta (no gamma^(t-1) factor) at gamma=0.9"


def check(mdp, policy) -> float:
    """``gamma^d delta(s, w)`` against ``delta'(s, w)`` for every non-terminal ``s`` and token ``w``."""
    delta_prime_kv, delta_kv, _ = td_errors(mdp, policy)
    return rel_diff(nt_discount(mdp.tree, mdp.gamma).unsqueeze(1) * delta_kv, delta_prime_kv)


def negative_control(mdp, policy) -> float:
    """``delta(s, w)`` against ``delta'(s, w)`` under ``gamma = 0.9``."""
    delta_prime_kv, delta_kv, _ = td_errors(mdp.with_gamma(negative_gamma(mdp)), policy)
    return rel_diff(delta_kv, delta_prime_kv)
