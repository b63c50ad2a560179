"""Theorem 1, the Trajectory Policy Gradient Theorem [21].

(i) With ``c(s_t) = sum_{k<t} gamma^(k-1) r_k``, for every non-terminal ``s_t`` and token ``w_t``

        c(s_t) + gamma^(t-1) Q(s_t, w_t) = V'(s_{t+1}) = E[RM(W^(t+1))],

    ``c`` and ``Q`` from the dynamic programme, ``V'`` by enumeration (``E[RM | prefix]``).
(ii) ``E_W sum_t RM(W) grad log pi(w_t | s_t) = grad J``: the response-level reward alone is
     an unbiased weight for every token (expectation by enumeration, ``grad J`` by autograd).

The check returns the larger of the two differences, each
``max |lhs - ref| / max(1, max |ref|)`` with ``ref = V'`` for (i) and ``ref = grad J`` for (ii).

Negative control: weight every token of ``W`` by ``RM(W')`` of an independent fresh response
``W'`` to the same prompt. Then ``E = E_x[V'(x) E_W[sum_t score_t | x]] = 0``, which misses
``grad J``; the control returns its difference from ``grad J`` (``max |grad J|`` when that is
below 1).
"""

from __future__ import annotations

from tpg.exact import solve
from tpg.exact.engine import nt_discount

from .common import (child_kv, enumerate_responses, grad_J_autograd, nt_column, rel_diff, response_values,
                     score_expectation)

NAME = "theorem1"
STATEMENT = "c(s_t) + gamma^(t-1) Q(s_t,w_t) = E[RM(W^(t+1))], hence grad J = E_W sum_t RM(W) grad log pi(w_t|s_t)"
NEGATIVE = "every token weighted by RM of an independent fresh response to the same prompt"


def check(mdp, policy) -> float:
    """Max of the differences of (i) the value identity per (node, token) and (ii) the RM estimator."""
    tree = mdp.tree
    sol = solve(mdp, policy, with_grad=False)
    resp = enumerate_responses(mdp, policy)
    vresp_n = response_values(resp)
    lhs_kv = nt_column(tree, sol.past) + nt_discount(tree, mdp.gamma).unsqueeze(1) * sol.q
    diff_values = rel_diff(lhs_kv, child_kv(tree, vresp_n))
    adv_lt = resp.rm_l.unsqueeze(1).expand_as(resp.mask_lt)
    diff_grad = rel_diff(score_expectation(resp, adv_lt), grad_J_autograd(mdp, policy))
    return max(diff_values, diff_grad)


def negative_control(mdp, policy) -> float:
    """Difference between ``E_{W, W'} sum_t RM(W') score_t(W)`` (``W'`` independent) and ``grad J``."""
    resp = enumerate_responses(mdp, policy)
    # E_{W'}[RM(W') | x] as an explicit sum over the pairs (W, W') with the same prompt
    same_ll = resp.prompt_l.unsqueeze(1) == resp.prompt_l.unsqueeze(0)
    fresh_l = (same_ll * (resp.cond_prob_l * resp.rm_l).unsqueeze(0)).sum(1)
    adv_lt = fresh_l.unsqueeze(1).expand_as(resp.mask_lt)
    return rel_diff(score_expectation(resp, adv_lt), grad_J_autograd(mdp, policy))
