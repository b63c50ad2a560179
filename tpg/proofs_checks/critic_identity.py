"""(tpg) Response-level critic identity: ``V'(s_t) = sum_{k<t} gamma^(k-1) r_k + gamma^(t-1) V(s_t)``.

Left side (reference): ``V'(s) = E[RM(W) | s]`` by enumeration, for every node of the tree
(at an end state ``V' = RM``). Right side: the reward already earned ``c(s)`` plus the
discounted token-level value ``gamma^d V(s)``, both from the dynamic programme.

Negative control: the greedy value ``c(s) + gamma^d max_w Q(s, w)`` in place of the
expectation over the policy; it differs wherever ``Q(s, .)`` varies with the token.

Both return ``max |rhs - V'| / max(1, max |V'|)`` over all nodes.
"""

from __future__ import annotations

import torch

from tpg.exact import solve

from .common import enumerate_responses, rel_diff, response_values

NAME = "critic_identity"
STATEMENT = "V'(s_t) = sum_{k<t} gamma^(k-1) r_k + gamma^(t-1) V(s_t)"
NEGATIVE = "greedy value c(s_t) + gamma^(t-1) max_w Q(s_t, w) in place of the expectation"


def _against_enumeration(mdp, policy, value_n_from_sol) -> float:
    tree = mdp.tree
    sol = solve(mdp, policy, with_grad=False)
    vresp_n = response_values(enumerate_responses(mdp, policy))
    disc_n = mdp.gamma ** tree.depth_n.to(torch.float64)
    return rel_diff(sol.past + disc_n * value_n_from_sol(tree, sol), vresp_n)


def check(mdp, policy) -> float:
    """``c(s) + gamma^d V(s)`` (DP) against ``E[RM | s]`` (enumeration), every node."""
    return _against_enumeration(mdp, policy, lambda tree, sol: sol.value)


def _greedy_value(tree, sol) -> torch.Tensor:
    greedy_n = torch.zeros_like(sol.value)  # 0 at end states, like V
    greedy_n[tree.nt_node_k] = sol.q.max(dim=1).values
    return greedy_n


def negative_control(mdp, policy) -> float:
    """``c(s) + gamma^d max_w Q(s, w)`` against ``E[RM | s]``."""
    return _against_enumeration(mdp, policy, _greedy_value)
