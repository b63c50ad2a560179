"""Eq. 26: the Zero-Reward Assumption and a discount ``gamma < 1`` do not mix.

Under ZRA a reward model reports ``r'_T = RM(W)`` on the last token, undiscounted. PPO/GAE run
with ``gamma`` on those rewards has returns

    G_t = sum_{k >= t} gamma^(k-t) r'_k = gamma^(T-t) RM(W),

and its (uncorrected, ``lambda = 1``, critic-free) expected update is
``E_W sum_t gamma^(T-t) RM(W) grad log pi(w_t|s_t)``. Re-weighting token ``t`` by
``(1/gamma)^(T-t)`` (the inverse-discount weights Eq. 26 says ZRA with ``gamma < 1`` would need)
restores ``sum_t RM(W) score_t``, unbiased by Theorem 1.

Check (on the zero-reward twin under the case's ``gamma``, where ``RM`` is unchanged):
``E_W sum_t (1/gamma)^(T-t) G_t score_t`` against autograd ``grad J``.

Negative control: the uncorrected ``E_W sum_t gamma^(T-t) RM(W) score_t`` against ``grad J``,
with ``gamma`` forced to 0.9 when the case has ``gamma = 1``; everything (``RM``, ``grad J``,
the returns) on that same MDP. Biased in general (not when every response has one token).

Both return ``max |estimate - grad J| / max(1, max |grad J|)``.
:func:`mismatch_bias` gives the uncorrected estimator's relative bias in parameter space as a
function of the GAE discount.
"""

from __future__ import annotations

import torch

from tpg.exact.engine import policy_gradient_from_logit_grad

from .common import enumerate_responses, grad_J_autograd, negative_gamma, rel_diff, score_expectation

NAME = "eq26_gamma"
STATEMENT = "ZRA with gamma<1: E_W sum_t (1/gamma)^(T-t) G_t grad log pi = grad J, G_t = gamma^(T-t) RM(W)"
NEGATIVE = "uncorrected E_W sum_t gamma^(T-t) RM(W) grad log pi vs grad J at gamma=0.9"


def zra_returns(resp, gamma: float) -> torch.Tensor:
    """``G_t = sum_{k>=t} gamma^(k-t) r'_k`` with ``r' = RM(W)`` on the last token, ``[L, H]``."""
    L, H = resp.mask_lt.shape
    rprime_lt = torch.zeros(L, H, dtype=torch.float64)
    rprime_lt[torch.arange(L), resp.length_l - 1] = resp.rm_l
    G_lt = torch.zeros(L, H + 1, dtype=torch.float64)
    for t in reversed(range(H)):
        G_lt[:, t] = rprime_lt[:, t] + gamma * G_lt[:, t + 1]
    return G_lt[:, :H] * resp.mask_lt


def _to_go(resp) -> torch.Tensor:
    """``T - t`` for every token ``t`` of every response (negative past the end), ``[L, H]``."""
    H = resp.mask_lt.shape[1]
    return resp.length_l.unsqueeze(1) - 1 - torch.arange(H).unsqueeze(0)


def uncorrected_expectation(mdp, policy, gamma: float) -> torch.Tensor:
    """``E_W sum_t gamma^(T-t) RM(W) score_t`` (node logits, ``[N_nt, V]``), ``RM`` under ``mdp``'s own discount."""
    resp = enumerate_responses(mdp, policy)
    return score_expectation(resp, zra_returns(resp, gamma))


def check(mdp, policy) -> float:
    """Corrected ZRA returns on the zero-reward twin against ``grad J``."""
    twin = mdp.zero_reward_twin()
    resp = enumerate_responses(twin, policy)
    G_lt = zra_returns(resp, twin.gamma)
    weight_lt = torch.where(resp.mask_lt, (1.0 / twin.gamma) ** _to_go(resp).clamp(min=0).to(torch.float64),
                            torch.zeros((), dtype=torch.float64))
    return rel_diff(score_expectation(resp, weight_lt * G_lt), grad_J_autograd(twin, policy))


def negative_control(mdp, policy) -> float:
    """Uncorrected ZRA returns against ``grad J``, both at ``gamma = 0.9`` when the case has ``gamma = 1``."""
    twin = mdp.with_gamma(negative_gamma(mdp)).zero_reward_twin()
    return rel_diff(uncorrected_expectation(twin, policy, twin.gamma), grad_J_autograd(twin, policy))


def mismatch_bias(mdp, policy, gamma: float) -> float:
    """Relative bias ``||E[g] - grad J|| / ||grad J||`` of PPO/GAE's ZRA returns at discount ``gamma``.

    ``E[g] = E_W sum_t gamma^(T-t) RM(W) grad log pi(w_t|s_t)``, where ``RM`` and ``J`` are the
    MDP's own (its ``gamma`` defines ``RM``; the argument is the discount of the estimator's
    returns). Euclidean norms of the parameter gradients (the chain rule through the policy's
    logit map; for a tabular policy, the node-logit gradients). Zero at ``gamma = 1``
    (Theorem 1); ``nan`` when ``grad J = 0``.
    """
    tree = mdp.tree
    expect_kv = uncorrected_expectation(mdp, policy, gamma)
    grad_kv = grad_J_autograd(mdp, policy)
    flat = [torch.cat([g.reshape(-1) for g in policy_gradient_from_logit_grad(policy, tree, x)])
            for x in (expect_kv, grad_kv)]
    norm = float(flat[1].norm())
    return float((flat[0] - flat[1]).norm()) / norm if norm > 0 else float("nan")
