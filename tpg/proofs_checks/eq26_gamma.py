"""Eq. 26: the Zero-Reward Assumption and a discount ``gamma < 1`` do not mix.

Under ZRA a reward model reports the response's reward ``RM(W)`` on its last token ``T``,
undiscounted. A token MDP that discounts by ``gamma`` credits a reward on token ``t`` with
``gamma^(t-1)``, so for it to credit ``RM(W)`` in full (and so to have the objective ``J = E RM``
and its gradient) the reward on token ``t`` must carry the weight

    omega_t = (1/gamma)^(t-1),

a weight that grows with the response's length: ZRA and ``gamma < 1`` contradict each other
unless every response has one token, hence ``gamma = 1`` with ZRA (docs/THEORY.md section 2.4, Eq. 26).

Check, on every case at a real discount below 1 (the case's own, or 0.9 when the case has
``gamma = 1``):

(i) the forced weights, computed without the closed form: for each response length ``t``, put a
    unit reward on the last token of every response of that length and run the exact engine's
    backward recursion ``Q = r + gamma V`` (:func:`tpg.exact.engine.backward_values`) once with
    ``gamma`` and once with 1; ``omega_t = J_1(t) / J_gamma(t)`` is the factor the discounted MDP
    misses. Compared with the closed form :func:`theory_weight` ``(1/gamma)^(t-1)``;
(ii) what the weights are for: the ZRA rewards (``RM(W)`` on the last token, undiscounted) with
    each multiplied by the ``omega_t`` of (i), solved by the dynamic programme under ``gamma``
    (:func:`tpg.exact.solve`), give the case's ``J`` and ``grad J`` (autograd through the
    enumeration of every response). (The zero-reward twin :meth:`~tpg.mdp.TokenMDP.zero_reward_twin`
    stores exactly these weighted rewards, which is how it keeps ``RM`` under ``gamma < 1``.)

The check returns the largest of the three differences (weights, ``J``, ``grad J``).

Negative control: what PPO/GAE does with ZRA rewards and ``gamma < 1``, no weights. Its returns
are ``G_t = sum_{k >= t} gamma^(k-t) r'_k = gamma^(T-t) RM(W)`` and its expected update
``E_W sum_t gamma^(T-t) RM(W) grad log pi(w_t|s_t)`` is compared with ``grad J`` at the same
discount (0.9 when the case has ``gamma = 1``). Biased in general (not when every response has
one token).

Every difference is ``max |lhs - ref| / max(1, max |ref|)``. :func:`mismatch_bias` gives the
uncorrected estimator's relative bias in parameter space as a function of the GAE discount (the
``gamma`` study).
"""

from __future__ import annotations

import torch

from tpg.exact import solve
from tpg.exact.engine import backward_values, policy_gradient_from_logit_grad

from .common import (enumerate_responses, grad_J_autograd, negative_gamma, node_log_probs, rel_diff,
                     score_expectation)

NAME = "eq26_gamma"
STATEMENT = ("ZRA with gamma<1 forces weight (1/gamma)^(t-1) on RM at a last token t (exact DP); with it the "
             "discounted MDP has grad J")
NEGATIVE = "uncorrected E_W sum_t gamma^(T-t) RM(W) grad log pi vs grad J at gamma=0.9"


def theory_weight(gamma: float, t_n: torch.Tensor) -> torch.Tensor:
    """``(1/gamma)^(t-1)``: the weight Eq. 26 says a ZRA reward on token ``t`` needs under discount ``gamma``."""
    return (1.0 / gamma) ** (t_n.to(torch.float64) - 1.0)


def terminal_edges_kv(tree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(is_last_kv, t_kv)``: whether token ``w`` in state ``s`` ends the response, and its position
    ``t = depth(s) + 1``, for every non-terminal ``s`` and token ``w`` (``[N_nt, V]`` each)."""
    V = tree.vocab_size
    child_kv = tree.num_prompts + torch.arange(tree.num_nonterminal).unsqueeze(1) * V + torch.arange(V)
    is_last_kv = tree.nt_index_n[child_kv] < 0
    t_kv = (tree.depth_n[tree.nt_node_k] + 1).unsqueeze(1).expand(-1, V)
    return is_last_kv, t_kv


def forced_weights(mdp, policy, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_n, omega_n)``: for every response length ``t`` that has probability > 0, the weight
    ``omega_t = J_1(t) / J_gamma(t)`` a ZRA reward on the last token needs under ``gamma``.

    ``J_g(t) = sum_x rho(x) V_g(x)`` with ``V_g`` from the exact backward recursion
    ``Q(s, w) = r(s, w) + g V(s w)``, ``V(s) = sum_w pi(w|s) Q(s, w)`` on unit rewards at the last
    token of every response of length ``t`` (0 elsewhere); no power of ``gamma`` is taken here.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    tree = mdp.tree
    pi_kv = node_log_probs(mdp, policy).exp()
    is_last_kv, t_kv = terminal_edges_kv(tree)
    rho_x = mdp.prompt_weights.to(torch.float64)
    lengths, weights = [], []
    for t in range(1, tree.horizon + 1):
        unit_kv = (is_last_kv & (t_kv == t)).to(torch.float64)
        if not bool(unit_kv.any()):
            continue
        j = [float(rho_x @ backward_values(tree, pi_kv, unit_kv, g)[0][:tree.num_prompts]) for g in (1.0, gamma)]
        if j[0] > 0:
            lengths.append(t)
            weights.append(j[0] / j[1])
    return torch.tensor(lengths, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)


def check(mdp, policy) -> float:
    """(i) forced weights against ``(1/gamma)^(t-1)``, (ii) the weighted ZRA twin's ``J`` and
    ``grad J`` (DP under ``gamma``) against the case's (enumeration), at ``gamma < 1``."""
    gamma = negative_gamma(mdp)
    t_n, omega_n = forced_weights(mdp, policy, gamma)
    diff_weights = rel_diff(omega_n, theory_weight(gamma, t_n))
    tree = mdp.tree
    ref = solve(mdp, policy, with_grad=False)
    # ZRA rewards as a reward model reports them: RM(W) on the last token, undiscounted
    zra_n = torch.zeros(tree.num_nodes, dtype=torch.float64)
    zra_n[ref.leaf_ids] = ref.response_rm.to(torch.float64)
    is_last_kv, t_kv = terminal_edges_kv(tree)
    omega_of_t = torch.ones(tree.horizon + 1, dtype=torch.float64)
    omega_of_t[t_n] = omega_n
    weighted_kv = zra_n[tree.num_prompts:].view(-1, tree.vocab_size) * torch.where(is_last_kv, omega_of_t[t_kv], 1.0)
    sol = solve(mdp, policy, r_kv=weighted_kv, gamma=gamma, with_grad=False)
    diff_j = rel_diff(torch.tensor([sol.J]), torch.tensor([ref.J]))
    diff_grad = rel_diff(sol.grad_logits, grad_J_autograd(mdp, policy))
    return max(diff_weights, diff_j, diff_grad)


def zra_returns(resp, gamma: float) -> torch.Tensor:
    """``G_t = sum_{k>=t} gamma^(k-t) r'_k`` with ``r' = RM(W)`` on the last token, ``[L, H]``."""
    L, H = resp.mask_lt.shape
    rprime_lt = torch.zeros(L, H, dtype=torch.float64)
    rprime_lt[torch.arange(L), resp.length_l - 1] = resp.rm_l
    G_lt = torch.zeros(L, H + 1, dtype=torch.float64)
    for t in reversed(range(H)):
        G_lt[:, t] = rprime_lt[:, t] + gamma * G_lt[:, t + 1]
    return G_lt[:, :H] * resp.mask_lt


def uncorrected_expectation(mdp, policy, gamma: float) -> torch.Tensor:
    """``E_W sum_t gamma^(T-t) RM(W) score_t`` (node logits, ``[N_nt, V]``), ``RM`` under ``mdp``'s own discount."""
    resp = enumerate_responses(mdp, policy)
    return score_expectation(resp, zra_returns(resp, gamma))


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
