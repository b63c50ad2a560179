"""Theorem 2 [28]: the advantage of token ``t`` may be ``E[RM(W^(t+1))] - E[RM(W^(t))]``.

(a) ``E_W sum_t (V'(s_{t+1}) - V'(s_t)) grad log pi(w_t|s_t) = grad J``, with ``V'`` by
    enumeration (``E[RM | prefix]``, ``RM`` itself at the end state) and ``grad J`` by autograd.
(b) Under ZRA this is PPO's advantage: on the zero-reward twin with ``gamma = 1``,
    ``V'(s w) - V'(s) = Q(s, w) - V(s)`` for every non-terminal ``s`` and token ``w`` (the
    twin's token-level ``Q`` and ``V`` from the DP). For any ``gamma`` the twin gives
    ``V'(s w) - V'(s) = gamma^d (Q(s, w) - V(s))`` (``d`` = depth of ``s``), also checked.

The check returns the largest difference, each ``max |lhs - ref| / max(1, max |ref|)`` with
``ref = grad J`` for (a) and the DP advantage for (b).

Negative control: the token-level advantage without the immediate reward,
``gamma^(t-1) (gamma V(s_{t+1}) - V(s_t))``, against ``grad J``; it misses
``E[sum_t gamma^(t-1) r_t score_t]``.
"""

from __future__ import annotations

from tpg.exact import solve
from tpg.exact.engine import nt_discount

from .common import (child_kv, discount_t, enumerate_responses, gather_n, grad_J_autograd, nt_column, rel_diff,
                     response_values, score_expectation)

NAME = "theorem2"
STATEMENT = "grad J = E_W sum_t (V'(s_{t+1}) - V'(s_t)) grad log pi(w_t|s_t); under ZRA, gamma=1: = Q - V"
NEGATIVE = "advantage gamma^(t-1) (gamma V(s_{t+1}) - V(s_t)) (token-level values, immediate reward dropped)"


def _twin_advantage_diff(mdp, policy, gamma: float) -> float:
    twin = mdp.with_gamma(gamma).zero_reward_twin()
    tree = twin.tree
    vresp_n = response_values(enumerate_responses(twin, policy))
    lhs_kv = child_kv(tree, vresp_n) - nt_column(tree, vresp_n)
    sol = solve(twin, policy, with_grad=False)
    return rel_diff(lhs_kv, nt_discount(tree, gamma).unsqueeze(1) * sol.advantage)


def check(mdp, policy) -> float:
    """Max difference of (a) the ``V'`` advantage estimator vs ``grad J`` and (b) the twin identities."""
    resp = enumerate_responses(mdp, policy)
    vresp_n = response_values(resp)
    adv_lt = gather_n(resp, vresp_n, resp.child_lt) - gather_n(resp, vresp_n, resp.state_lt)
    diff_grad = rel_diff(score_expectation(resp, adv_lt), grad_J_autograd(mdp, policy))
    diff_twin = max(_twin_advantage_diff(mdp, policy, g) for g in {1.0, mdp.gamma})
    return max(diff_grad, diff_twin)


def negative_control(mdp, policy) -> float:
    """Difference between ``E_W sum_t gamma^(t-1) (gamma V(s_{t+1}) - V(s_t)) score_t`` and ``grad J``."""
    sol = solve(mdp, policy, with_grad=False)
    resp = enumerate_responses(mdp, policy)
    adv_lt = discount_t(mdp.gamma, mdp.horizon) * (mdp.gamma * gather_n(resp, sol.value, resp.child_lt)
                                                   - gather_n(resp, sol.value, resp.state_lt))
    return rel_diff(score_expectation(resp, adv_lt), grad_J_autograd(mdp, policy))
