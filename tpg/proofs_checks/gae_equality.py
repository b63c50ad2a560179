"""(tpg) GAE(lambda) at the response level equals GAE at the token level, and is unbiased
with an exact critic for every ``lambda``.

Per response, with the TD errors of :mod:`tpg.proofs_checks.td_identity`,

    A'_t = sum_l lambda^l delta'_{t+l}            (response level, ZRA rewards, no discount)
    A_t  = sum_l (gamma lambda)^l delta_{t+l}     (token level, true rewards, discount gamma)

(a) ``A'_t = gamma^(t-1) A_t`` for every response and token (``delta'_t = gamma^(t-1) delta_t``);
(b) ``E_W sum_t gamma^(t-1) A_t grad log pi(w_t|s_t) = grad J`` with the exact critic: for
    ``l >= 1``, ``E[delta_{t+l} | s_{t+l}] = 0`` and ``s_{t+l}`` fixes ``w_t``, so only
    ``E[delta_t score_t] = E[(Q - V) score_t]`` survives.
Both for ``lambda`` in :data:`LAMBDAS`; the check returns the largest difference, each
``max |lhs - ref| / max(1, max |ref|)`` with ``ref = A'`` for (a) and ``grad J`` for (b).

Negative control: an inexact critic ``V + e``, ``e`` a fixed seeded ``N(0, 0.5^2)`` draw per
non-terminal node (0 at end states), with ``lambda = 0.5``: ``E[gamma e(s_{t+1}) score_t] != 0``,
so the expected update is biased (only ``lambda = 1`` would cancel it).
"""

from __future__ import annotations

import torch

from tpg.exact import solve

from .common import (child_kv, discount_t, enumerate_responses, gather_kv, grad_J_autograd, nt_column, rel_diff,
                     score_expectation, seeded_normal, td_errors)

NAME = "gae_equality"
STATEMENT = "A'_t(lambda) = gamma^(t-1) A_t(gamma, lambda) per response; E sum_t gamma^(t-1) A_t grad log pi = grad J"
NEGATIVE = "inexact critic (V + N(0, 0.5^2) per node), lambda=0.5, is biased"

LAMBDAS = (0.0, 0.25, 0.5, 0.9, 1.0)
#: seed and standard deviation of the inexact critic's error
CRITIC_SEED = 7
CRITIC_STD = 0.5
NEGATIVE_LAMBDA = 0.5


def gae_lt(delta_lt: torch.Tensor, decay: float) -> torch.Tensor:
    """``A_t = sum_l decay^l delta_{t+l}`` by ``A_t = delta_t + decay A_{t+1}``, ``[L, H]``
    (``delta_lt`` must be 0 past the end of each response)."""
    L, H = delta_lt.shape
    adv = torch.zeros(L, H + 1, dtype=torch.float64)
    for t in reversed(range(H)):
        adv[:, t] = delta_lt[:, t] + decay * adv[:, t + 1]
    return adv[:, :H]


def check(mdp, policy) -> float:
    """Max over ``lambda`` of (a) ``gamma^(t-1) A_t`` vs ``A'_t`` and (b) the exact-critic update vs ``grad J``."""
    delta_prime_kv, delta_kv, resp = td_errors(mdp, policy)
    delta_prime_lt, delta_lt = gather_kv(resp, delta_prime_kv), gather_kv(resp, delta_kv)
    disc_t = discount_t(mdp.gamma, mdp.horizon)
    grad_kv = grad_J_autograd(mdp, policy)
    worst = 0.0
    for lam in LAMBDAS:
        resp_adv_lt = gae_lt(delta_prime_lt, lam)
        tok_adv_lt = disc_t * gae_lt(delta_lt, mdp.gamma * lam)
        worst = max(worst, rel_diff(tok_adv_lt, resp_adv_lt),
                    rel_diff(score_expectation(resp, tok_adv_lt), grad_kv))
    return worst


def negative_control(mdp, policy) -> float:
    """GAE(``gamma``, 0.5) from the perturbed critic ``V + e`` against ``grad J``."""
    tree = mdp.tree
    sol = solve(mdp, policy, with_grad=False)
    critic_n = sol.value.clone()
    critic_n[tree.nt_node_k] += seeded_normal(tree.num_nonterminal, CRITIC_SEED, CRITIC_STD)
    delta_kv = mdp.reward_matrix() + mdp.gamma * child_kv(tree, critic_n) - nt_column(tree, critic_n)
    resp = enumerate_responses(mdp, policy)
    adv_lt = discount_t(mdp.gamma, mdp.horizon) * gae_lt(gather_kv(resp, delta_kv), mdp.gamma * NEGATIVE_LAMBDA)
    return rel_diff(score_expectation(resp, adv_lt), grad_J_autograd(mdp, policy))
