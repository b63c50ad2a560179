"""Exact machinery shared by the proof checks (float64, no sampling).

Every check compares two sides computed independently:

* an **expectation over responses** ``E_W sum_t A(W, t) grad log pi(w_t | s_t)``, obtained by
  enumerating every complete response ``W`` (``tree.leaf_paths()``), weighting it by
  ``rho(x) P(W | x)`` and scatter-adding ``P(W) A(W, t) (e_{w_t} - pi(.|s_t))`` into the
  ``[N_nt, V]`` row of each visited state (:func:`score_expectation`). ``e_w - pi(.|s)`` is
  ``d log pi(w|s) / d logits_s``, the score in node-logit space, valid for *any* policy
  whose next-token distribution is ``softmax(node_logits)``;
* ``grad J`` in the same node-logit space, by autograd through
  ``J = sum_W rho(x) P(W|x) RM(W)`` with ``P`` from ``log_softmax(node_logits)``
  (:func:`grad_J_autograd`) -- not the dynamic programme's ``grad_logits``;
* the response-level value ``V'(s) = E[RM(W) | s]`` by enumeration, the sum over the leaves
  below ``s`` of ``P(leaf | x) RM(leaf)`` divided by ``P(s | x)`` (:func:`response_values`);
* token-level ``V``, ``Q`` and the reward already earned ``c(s)`` from the dynamic programme
  :func:`tpg.exact.solve` (the "DP" side).

The reported difference is ``max |lhs - ref| / max(1, max |ref|)`` (:func:`rel_diff`): absolute
for quantities of order one or less, relative for larger ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpg.exact import path_log_probs, path_returns, solve
from tpg.mdp.mdp import TokenMDP
from tpg.mdp.tree import TokenTree

#: a statement holds when its difference is at most this
STATEMENT_TOL = 1e-10
#: a negative control fails as it must when its difference exceeds this
NEGATIVE_TOL = 1e-6
#: the discount a negative control forces when the case itself has ``gamma = 1``
NEGATIVE_GAMMA = 0.9


@dataclass
class Responses:
    """Every complete response of an MDP under a policy, as padded ``[L, H]`` paths.

    Attributes:
        tree: the response tree.
        pi_kv: ``pi(w | s)`` per non-terminal node and token (detached float64).
        nt_lt: non-terminal index of ``s_t`` (``-1`` past the end of the response).
        tok_lt: token ``w_t`` (``-1`` past the end).
        mask_lt: ``t <= T``.
        length_l: ``T``.
        state_lt: node id of ``s_t`` (``-1`` past the end).
        child_lt: node id of ``s_{t+1}`` (``-1`` past the end).
        prompt_l: the prompt of each response.
        cond_prob_l: ``P(W | x)``.
        prob_l: ``rho(x) P(W | x)``.
        rm_l: ``RM(W) = sum_t gamma^(t-1) r_t`` under the MDP's own rewards and discount.
    """

    tree: TokenTree
    pi_kv: torch.Tensor
    nt_lt: torch.Tensor
    tok_lt: torch.Tensor
    mask_lt: torch.Tensor
    length_l: torch.Tensor
    state_lt: torch.Tensor
    child_lt: torch.Tensor
    prompt_l: torch.Tensor
    cond_prob_l: torch.Tensor
    prob_l: torch.Tensor
    rm_l: torch.Tensor


def node_log_probs(mdp: TokenMDP, policy) -> torch.Tensor:
    """``log_softmax(node_logits)``, detached float64, ``[N_nt, V]``."""
    with torch.no_grad():
        return torch.log_softmax(policy.node_logits(mdp.tree).detach().to(torch.float64), dim=-1)


def enumerate_responses(mdp: TokenMDP, policy) -> Responses:
    """All complete responses of ``mdp`` with their probabilities and ``RM`` (see :class:`Responses`)."""
    tree = mdp.tree
    logp_kv = node_log_probs(mdp, policy)
    nt_lt, tok_lt, length_l = tree.leaf_paths()
    mask_lt = nt_lt >= 0
    state_lt = torch.where(mask_lt, tree.nt_node_k[nt_lt.clamp(min=0)], -1)
    child_lt = torch.where(mask_lt, tree.num_prompts + nt_lt * tree.vocab_size + tok_lt, -1)
    prompt_l = tree.prompt_n[tree.leaf_ids]
    cond_prob_l = path_log_probs(tree, logp_kv).exp()
    prob_l = mdp.prompt_weights[prompt_l] * cond_prob_l
    rm_l = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
    return Responses(tree, logp_kv.exp(), nt_lt, tok_lt, mask_lt, length_l, state_lt, child_lt, prompt_l,
                     cond_prob_l, prob_l, rm_l)


def score_expectation(resp: Responses, adv_lt: torch.Tensor) -> torch.Tensor:
    """``E_W sum_t A(W, t) d log pi(w_t|s_t) / d logits``, ``[N_nt, V]``, by enumeration.

    ``sum_W rho(x) P(W|x) sum_{t <= T} A(W, t) (e_{w_t} - pi(.|s_t))``, each term added into the
    row of ``s_t``. Entries of ``adv_lt [L, H]`` past the end of a response are ignored.
    """
    L, H = resp.nt_lt.shape
    if tuple(adv_lt.shape) != (L, H):
        raise ValueError(f"adv_lt must have shape [L, H] = {[L, H]}, got {list(adv_lt.shape)}")
    w_lt = resp.prob_l.unsqueeze(1) * adv_lt.to(torch.float64)
    rows = resp.nt_lt[resp.mask_lt]
    toks = resp.tok_lt[resp.mask_lt]
    w = w_lt[resp.mask_lt]
    contrib = -w.unsqueeze(1) * resp.pi_kv[rows]
    contrib[torch.arange(rows.numel()), toks] += w
    return torch.zeros_like(resp.pi_kv).index_add_(0, rows, contrib)


def grad_J_autograd(mdp: TokenMDP, policy) -> torch.Tensor:
    """``dJ / d node_logits`` ``[N_nt, V]`` by autograd through ``sum_W rho P(W) RM(W)``."""
    tree = mdp.tree
    logits = policy.node_logits(tree).detach().to(torch.float64).requires_grad_()
    with torch.enable_grad():
        lp_l = path_log_probs(tree, torch.log_softmax(logits, dim=-1))
        rm_l = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
        rho_l = mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
        J = (rho_l * lp_l.exp() * rm_l).sum()
        (grad_kv,) = torch.autograd.grad(J, logits)
    return grad_kv


def response_values(resp: Responses) -> torch.Tensor:
    """``V'(s) = E[RM(W) | s]`` for every node (``RM`` itself at a leaf), by enumeration.

    ``V'(s) = sum_{leaf below s} P(leaf|x) RM(leaf) / sum_{leaf below s} P(leaf|x)``; the
    denominator is ``P(s | x)`` because the leaves below ``s`` partition its continuations.
    """
    tree = resp.tree
    anc_la = torch.cat([resp.state_lt, tree.leaf_ids.unsqueeze(1)], dim=1)  # s_1 .. s_T and the leaf
    keep = anc_la >= 0
    rows = keep.nonzero()[:, 0]
    ids = anc_la[keep]
    num = torch.zeros(tree.num_nodes, dtype=torch.float64).index_add_(0, ids, (resp.cond_prob_l * resp.rm_l)[rows])
    den = torch.zeros(tree.num_nodes, dtype=torch.float64).index_add_(0, ids, resp.cond_prob_l[rows])
    return num / den


def gather_kv(resp: Responses, arr_kv: torch.Tensor) -> torch.Tensor:
    """``arr[s_t, w_t]`` along every response, ``[L, H]``, 0 past the end."""
    vals = arr_kv[resp.nt_lt.clamp(min=0), resp.tok_lt.clamp(min=0)]
    return torch.where(resp.mask_lt, vals, torch.zeros((), dtype=vals.dtype))


def gather_n(resp: Responses, arr_n: torch.Tensor, ids_lt: torch.Tensor) -> torch.Tensor:
    """``arr[ids]`` for node ids ``[L, H]`` (``state_lt`` or ``child_lt``), 0 past the end."""
    vals = arr_n[ids_lt.clamp(min=0)]
    return torch.where(resp.mask_lt, vals, torch.zeros((), dtype=vals.dtype))


def discount_t(gamma: float, horizon: int) -> torch.Tensor:
    """``gamma^(t-1)`` for ``t = 1 .. H`` (the discount of token ``t``), ``[H]``."""
    return gamma ** torch.arange(horizon, dtype=torch.float64)


def child_kv(tree: TokenTree, arr_n: torch.Tensor) -> torch.Tensor:
    """``arr[s w]`` (the value at the child) for every non-terminal ``s`` and token ``w``, ``[N_nt, V]``."""
    return arr_n[tree.num_prompts:].view(-1, tree.vocab_size)


def nt_column(tree: TokenTree, arr_n: torch.Tensor) -> torch.Tensor:
    """``arr[s]`` for every non-terminal ``s`` as a column ``[N_nt, 1]`` (broadcasts over tokens)."""
    return arr_n[tree.nt_node_k].unsqueeze(1)


def rel_diff(lhs: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |lhs - ref| / max(1, max |ref|)``: the reported difference of every check."""
    if lhs.shape != ref.shape:
        raise ValueError(f"the two sides differ in shape: {list(lhs.shape)} vs {list(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    scale = max(1.0, float(ref.abs().max()))
    return float((lhs - ref).abs().max()) / scale


def negative_gamma(mdp: TokenMDP) -> float:
    """The discount of a gamma-mismatch negative control: the case's own if below 1, else 0.9."""
    return mdp.gamma if mdp.gamma < 1.0 else NEGATIVE_GAMMA


def seeded_normal(n: int, seed: int, std: float = 1.0) -> torch.Tensor:
    """``n`` draws of ``N(0, std^2)`` from a fixed seed (float64)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=gen, dtype=torch.float64) * std


def td_errors(mdp: TokenMDP, policy, sol=None):
    """Response-level and token-level TD errors per (non-terminal ``s``, token ``w``), ``[N_nt, V]`` each.

    ``delta'(s, w) = r'(s, w) + V'_end(s w) - V'(s)`` with ``r' = RM(W)`` on the last token
    (undiscounted, 0 elsewhere), ``V'`` by enumeration and ``V'_end`` equal to ``V'`` except 0
    at the end state; ``delta(s, w) = r(s, w) + gamma V(s w) - V(s)`` from the DP (``V = 0`` at
    the end state). Returns ``(delta_prime_kv, delta_kv, responses)``.
    """
    tree = mdp.tree
    resp = enumerate_responses(mdp, policy)
    vresp_n = response_values(resp)
    sol = solve(mdp, policy, with_grad=False) if sol is None else sol
    is_end_n = tree.nt_index_n < 0
    rprime_n = torch.zeros(tree.num_nodes, dtype=torch.float64)
    rprime_n[tree.leaf_ids] = resp.rm_l
    vend_n = torch.where(is_end_n, torch.zeros((), dtype=torch.float64), vresp_n)
    delta_prime_kv = child_kv(tree, rprime_n) + child_kv(tree, vend_n) - nt_column(tree, vresp_n)
    delta_kv = mdp.reward_matrix() + mdp.gamma * child_kv(tree, sol.value) - nt_column(tree, sol.value)
    return delta_prime_kv, delta_kv, resp
