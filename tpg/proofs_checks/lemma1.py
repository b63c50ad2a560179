"""Lemma 1 [4]: ``grad J = E_W sum_t gamma^(t-1) Q(s_t, w_t) grad log pi(w_t | s_t)``.

Left side: ``grad J`` w.r.t. the node logits by autograd through the enumerated objective.
Right side: the expectation over every response of ``sum_t gamma^(t-1) Q(s_t, w_t) (e_{w_t} -
pi(.|s_t))``, with ``Q`` from the dynamic programme; an equality with the on-policy state
distribution, for any rewards and any ``gamma``.

Negative control: drop the immediate reward, ``Q(s_t, w_t) -> gamma V(s_{t+1})``. The
expectation then misses ``E[sum_t gamma^(t-1) r_t score_t]``, whose row at ``s`` is
``mu(s) gamma^d pi(.|s) (r(s, .) - E_pi r(s, .))``: non-zero as soon as some state's reward
varies with the token.

Both functions return ``max |estimate - grad J| / max(1, max |grad J|)``.
"""

from __future__ import annotations

from tpg.exact import solve

from .common import (child_kv, discount_t, enumerate_responses, gather_kv, grad_J_autograd, rel_diff,
                     score_expectation)

NAME = "lemma1"
STATEMENT = "grad J = E_W sum_t gamma^(t-1) Q(s_t,w_t) grad log pi(w_t|s_t)"
NEGATIVE = "Q(s_t,w_t) replaced by gamma V(s_{t+1}) (immediate reward dropped)"


def _weighted_by(mdp, policy, weight_kv) -> float:
    resp = enumerate_responses(mdp, policy)
    adv_lt = discount_t(mdp.gamma, mdp.horizon) * gather_kv(resp, weight_kv)
    return rel_diff(score_expectation(resp, adv_lt), grad_J_autograd(mdp, policy))


def check(mdp, policy) -> float:
    """Difference between ``E_W sum_t gamma^(t-1) Q score_t`` and autograd ``grad J`` (node logits)."""
    sol = solve(mdp, policy, with_grad=False)
    return _weighted_by(mdp, policy, sol.q)


def negative_control(mdp, policy) -> float:
    """Difference between ``E_W sum_t gamma^(t-1) gamma V(s_{t+1}) score_t`` and ``grad J``."""
    sol = solve(mdp, policy, with_grad=False)
    return _weighted_by(mdp, policy, mdp.gamma * child_kv(mdp.tree, sol.value))
