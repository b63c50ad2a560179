"""Exact enumeration for transformer policies: the prefix-shared engine and its naive references.

:meth:`tpg.policies.transformer.TinyTransformerPolicy.node_logits` already expands the
response tree level by level with a key/value cache (one new token per tree node), so
:func:`tpg.exact.solve` and :func:`tpg.exact.grad_by_enumeration` work unchanged on a
transformer and cost ``O(#nodes)`` forward tokens. This module holds what checks and times
that engine:

* :func:`node_logits_naive`: the same ``[N_nt, V]`` logits without sharing, one full forward per
  prefix (``by="prefix"``) or per complete response (``by="response"``);
* :func:`objective_brute_force`: ``J = sum_W rho(x) P(W|x) RM(W)`` with one separate forward per
  response, in a Python loop: the most independent reference (small trees only);
* :func:`objective_full_sequences`: the same ``J`` by batching every complete response as one
  padded full sequence (the "naive full-sequence batching" baseline of the benchmark);
* :func:`work_counts`: forward positions either way, and the mean response length.
"""

from __future__ import annotations

import torch

from ..mdp.mdp import TokenMDP
from ..mdp.tree import TokenTree
from .engine import path_returns


def _check_policy(policy) -> None:
    for name in ("prompt_tokens", "forward_tokens", "prompt_len"):
        if not hasattr(policy, name):
            raise ValueError(f"expected a transformer policy (with {name}), got {type(policy).__name__}")


def node_prefixes(tree: TokenTree, depth: int) -> torch.Tensor:
    """Response tokens of every non-terminal node at ``depth``, ``[n_d, depth]`` (level order)."""
    lvl = tree.level_nt(depth)
    nodes = tree.nt_node_k[lvl]
    out = torch.empty(nodes.numel(), depth, dtype=torch.long)
    cur = nodes.clone()
    for pos in reversed(range(depth)):
        out[:, pos] = tree.token_n[cur]
        cur = tree.parent_n[cur]
    return out


def _leaf_inputs(tree: TokenTree, policy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every complete response: prompt ``[L]``, tokens ``[L, H]`` (0-padded), mask ``[L, H]``,
    and non-terminal path ``[L, H]`` (-1 padded)."""
    nt_path, tok_path, _ = tree.leaf_paths()
    mask = nt_path >= 0
    return tree.prompt_n[tree.leaf_ids], tok_path.clamp(min=0), mask, nt_path


def prefix_logits_by_depth(tree: TokenTree, sequence_logits) -> torch.Tensor:
    """``[N_nt, V]`` logits with no prefix sharing: for each depth ``d``, one full forward
    ``sequence_logits(prompts, tokens)`` of every non-terminal node's prompt and ``d`` tokens,
    its last position's logits kept (differentiable; rows in the tree's non-terminal order)."""
    out = []
    for depth in range(tree.horizon):
        lvl = tree.level_nt(depth)
        if lvl.stop == lvl.start:
            break
        prompts = tree.prompt_n[tree.nt_node_k[lvl]]
        logits = sequence_logits(prompts, node_prefixes(tree, depth))
        out.append(logits[:, -1])
    return torch.cat(out, 0)


def node_logits_naive(policy, tree: TokenTree, by: str = "prefix") -> torch.Tensor:
    """``[N_nt, V]`` logits with no prefix sharing (differentiable).

    ``by="prefix"``: for each depth ``d``, one full causal forward of every non-terminal
    node's ``Lp + d`` tokens (no cache). ``by="response"``: one full forward of every complete
    response; each non-terminal node takes its logits from the first response through it."""
    _check_policy(policy)
    policy._check_tree(tree)
    if by == "prefix":
        return prefix_logits_by_depth(tree, policy.sequence_logits)
    if by == "response":
        prompt_l, tok_lh, mask_lh, nt_lh = _leaf_inputs(tree, policy)
        L, H = tok_lh.shape
        logits = policy.sequence_logits(prompt_l, tok_lh[:, :H - 1])  # [L, H, V]: states s_1 .. s_H
        flat_pos = torch.arange(L * H).view(L, H)
        src = torch.full((tree.num_nonterminal,), L * H, dtype=torch.long)
        src = src.scatter_reduce(0, nt_lh[mask_lh], flat_pos[mask_lh], reduce="amin")
        return logits.reshape(L * H, -1)[src]
    raise ValueError(f"by must be 'prefix' or 'response', got {by!r}")


def _response_returns(mdp: TokenMDP) -> torch.Tensor:
    return path_returns(mdp.tree, mdp.edge_rewards(), mdp.gamma)


def _response_inputs(mdp: TokenMDP, policy):
    """The policy and tree checked, then for every complete response: prompt ``[L]``, tokens and
    mask ``[L, H]`` (:func:`_leaf_inputs`), return ``RM(W)`` and prompt weight ``rho(x)`` ``[L]``."""
    _check_policy(policy)
    tree = mdp.tree
    policy._check_tree(tree)
    prompt_l, tok_lh, mask_lh, _ = _leaf_inputs(tree, policy)
    return prompt_l, tok_lh, mask_lh, _response_returns(mdp), mdp.prompt_weights[prompt_l]


def objective_brute_force(mdp: TokenMDP, policy) -> torch.Tensor:
    """``J = sum_W rho(x) P(W|x) RM(W)`` with one separate full forward per complete response
    (a Python loop; differentiable). ``P(W|x) = prod_t pi(w_t | x, w_<t)`` from that sequence's
    own logits, ``RM(W)`` from the MDP's edge rewards."""
    prompt_l, tok_lh, mask_lh, rm_l, rho_l = _response_inputs(mdp, policy)
    terms = []
    for i in range(prompt_l.numel()):
        T = int(mask_lh[i].sum())
        toks = tok_lh[i:i + 1, :T]
        logp = torch.log_softmax(policy.sequence_logits(prompt_l[i:i + 1], toks[:, :T - 1]), dim=-1)
        lp = logp[0, torch.arange(T), toks[0]].sum()
        terms.append(rho_l[i] * lp.exp() * rm_l[i])
    return torch.stack(terms).sum()


def objective_full_sequences(mdp: TokenMDP, policy, batch_size: int | None = None) -> torch.Tensor:
    """``J`` by batching every complete response as one right-padded full sequence
    (causal attention makes right padding harmless); ``batch_size`` responses per forward
    (default all). Differentiable."""
    prompt_l, tok_lh, mask_lh, rm_l, rho_l = _response_inputs(mdp, policy)
    L = prompt_l.numel()
    step = L if batch_size is None else int(batch_size)
    J = torch.zeros((), dtype=torch.float64)
    for a in range(0, L, step):
        rows = slice(a, min(a + step, L))
        lp = policy.token_log_probs(prompt_l[rows], tok_lh[rows], mask_lh[rows]).sum(1)
        J = J + (rho_l[rows] * lp.to(torch.float64).exp() * rm_l[rows]).sum()
    return J


def _grad_of(objective, policy) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.enable_grad():
        J = objective()
        grads = torch.autograd.grad(J, params, allow_unused=True)
    return float(J.detach()), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def grad_brute_force(mdp: TokenMDP, policy) -> tuple[float, list[torch.Tensor]]:
    """``J`` and ``grad J`` through :func:`objective_brute_force`."""
    return _grad_of(lambda: objective_brute_force(mdp, policy), policy)


def grad_full_sequences(mdp: TokenMDP, policy, batch_size: int | None = None) -> tuple[float, list[torch.Tensor]]:
    """``J`` and ``grad J`` through :func:`objective_full_sequences`."""
    return _grad_of(lambda: objective_full_sequences(mdp, policy, batch_size), policy)


def work_counts(tree: TokenTree, prompt_len: int) -> dict:
    """Forward positions of the two enumerations, and the mean response length.

    Prefix sharing runs ``P Lp`` prompt positions plus one position per non-root
    non-terminal node; full-sequence batching runs ``Lp + T - 1`` positions per complete
    response of length ``T``."""
    lengths = tree.depth_n[tree.leaf_ids].to(torch.float64)
    shared = tree.num_prompts * prompt_len + tree.num_nonterminal - tree.num_prompts
    naive = float((prompt_len + lengths - 1).sum())
    return dict(shared_positions=int(shared), naive_positions=int(naive), position_ratio=naive / shared,
                num_responses=tree.num_leaves, num_nonterminal=tree.num_nonterminal,
                mean_response_length=float(lengths.mean()))
