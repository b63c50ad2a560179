"""Exact objective, values and gradient of a token MDP (float64).

Two independent computations of ``grad J``:

(a) :func:`solve`, a dynamic programme over the stored tree. Forward, the reach
    probability ``mu(s) = rho(x) P(s | x)``; backward,
    ``V(s) = sum_w pi(w|s) [r(s,w) + gamma V(s w)]`` and ``Q(s,w) = r(s,w) + gamma V(s w)``.
    With the analytic softmax score (``d log pi(w|s)/d logit_s = e_w - pi(.|s)``), Lemma 1
    gives, per node ``s`` at depth ``d`` (``d`` = tokens so far),

        dJ / d logit_s[w] = mu(s) gamma^d pi(w|s) (Q(s,w) - V(s))
                          = mu(s) pi(w|s) (Q'(s,w) - V'(s)),

    and the parameters' gradient follows by the chain rule through the policy's logit map
    (the identity for a tabular policy).
(b) :func:`enumerate_objective`, ``J = sum_W rho(x) P(W|x) RM(W)`` summed over every complete
    response with autograd (:func:`grad_by_enumeration`).

Also the exact sequence-level ``KL(pi || pi_ref)`` and its gradient (:func:`exact_kl`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._threads import intra_op_threads as _intra_op_threads
from ..mdp.mdp import TokenMDP
from ..mdp.tree import TokenTree


@dataclass
class ExactSolution:
    """Everything the exact engine knows about one (MDP, policy) pair.

    Node-indexed arrays have length ``tree.num_nodes``; ``[N_nt, V]`` arrays are indexed by
    non-terminal node and token (see :mod:`tpg.mdp.tree`).

    Attributes:
        J: the objective ``E_x E_W RM(W)``.
        logp: ``log pi(w|s)``, ``[N_nt, V]``.
        reach: ``mu(s) = rho(x) P(prefix | x)`` per node.
        value: token-level ``V(s)`` per node (0 at terminal nodes).
        past: ``c(s) = sum_{k<t} gamma^(k-1) r_k``, the reward already earned, per node.
        value_resp: response-level ``V'(s) = E[RM(W) | s] = c(s) + gamma^d V(s)`` per node.
        q: ``Q(s, w) = r(s,w) + gamma V(s w)``, ``[N_nt, V]``.
        advantage: ``Q(s,w) - V(s)``, ``[N_nt, V]``.
        grad_logits: ``dJ / d logit``, ``[N_nt, V]``.
        grads: ``dJ / d theta`` for each parameter of the policy (``None`` if not requested).
        leaf_ids, response_prob, response_rm: each complete response's node id, probability
            ``rho(x) P(W|x)`` and ``RM(W)``.
    """

    J: float
    logp: torch.Tensor
    reach: torch.Tensor
    value: torch.Tensor
    past: torch.Tensor
    value_resp: torch.Tensor
    q: torch.Tensor
    advantage: torch.Tensor
    grad_logits: torch.Tensor
    grads: list[torch.Tensor] | None
    leaf_ids: torch.Tensor
    response_prob: torch.Tensor
    response_rm: torch.Tensor
    gamma: float

    def flat_grad(self) -> torch.Tensor:
        """All parameter gradients concatenated into one vector."""
        if self.grads is None:
            raise ValueError("gradient was not requested (solve(..., with_grad=True))")
        return torch.cat([g.reshape(-1) for g in self.grads])


def _nt_children(block_nv: torch.Tensor, eos_token: int | None) -> torch.Tensor:
    """Entries of a level's child block ``[n, V]`` at the non-terminal children, in
    non-terminal index order (row-major over (parent, token), the EOS column dropped).

    Without EOS this is a view of the block (no copy)."""
    if eos_token is None:
        return block_nv.reshape(-1)
    return torch.cat([block_nv[:, :eos_token], block_nv[:, eos_token + 1:]], 1).reshape(-1)


def _set_nt_children(block_nv: torch.Tensor, nt_values: torch.Tensor, eos_token: int) -> None:
    """Inverse of :func:`_nt_children` (EOS case): write the values of the non-terminal
    children into their columns of the child block and 0 into the EOS column."""
    vals = nt_values.view(block_nv.shape[0], -1)
    block_nv[:, :eos_token] = vals[:, :eos_token]
    block_nv[:, eos_token] = 0.0
    block_nv[:, eos_token + 1:] = vals[:, eos_token:]


def _forward_pass(tree: TokenTree, pi: torch.Tensor, rho: torch.Tensor | None, r_kv: torch.Tensor | None,
                  gamma: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``mu(s)`` (if ``rho`` is given) and ``c(s)`` (if ``r_kv`` is given) for every node.

    Both are pushed down one level at a time, writing each level's child block ``[n_d, V]``
    in place (it is a contiguous slice of node ids): ``mu(s w) = mu(s) pi(w|s)`` and
    ``c(s w) = c(s) + gamma^d r(s, w)``. The non-terminal entries of a child block are the next
    level's non-terminal values, so no node-indexed gather or scatter is needed."""
    P, V, H, eos = tree.num_prompts, tree.vocab_size, tree.horizon, tree.eos_token
    mu = past = None
    if rho is not None:
        mu = torch.empty(tree.num_nodes, dtype=pi.dtype)
        mu[:P] = rho
        mu_lvl = mu[:P]
    if r_kv is not None:
        past = torch.empty(tree.num_nodes, dtype=r_kv.dtype)
        past[:P] = 0.0
        past_lvl = past[:P]
    for depth in range(H):
        lvl = tree.level_nt(depth)
        kids = tree.nt_children(depth)
        n = lvl.stop - lvl.start
        last = depth + 1 == H
        if mu is not None:
            block = mu[kids].view(n, V)
            torch.mul(mu_lvl.unsqueeze(1), pi[lvl], out=block)
            if not last:
                mu_lvl = _nt_children(block, eos)
        if past is not None:
            block = past[kids].view(n, V)
            g = gamma ** depth
            if depth == 0:
                block.copy_(r_kv[lvl])
            elif g == 1.0:
                torch.add(past_lvl.unsqueeze(1), r_kv[lvl], out=block)
            else:
                torch.add(past_lvl.unsqueeze(1), r_kv[lvl], alpha=g, out=block)
            if not last:
                past_lvl = _nt_children(block, eos)
    return mu, past


def _backward_pass(tree: TokenTree, pi: torch.Tensor, r_kv: torch.Tensor, gamma: float):
    """``V`` per node, ``V`` per non-terminal ``[N_nt]`` and ``Q`` ``[N_nt, V]``, deepest level first.

    ``Q(s, w) = r(s, w) + gamma V(s w)`` reads the level's child block of node values (a
    contiguous slice); ``V(s) = sum_w pi(w|s) Q(s, w)`` is written straight into the parent
    level's child block (without EOS the non-terminal nodes are node ids ``0 .. N_nt - 1``, so
    the per-non-terminal values are a view of the node values)."""
    P, V, H, eos = tree.num_prompts, tree.vocab_size, tree.horizon, tree.eos_token
    dtype = torch.promote_types(pi.dtype, r_kv.dtype)
    value = torch.empty(tree.num_nodes, dtype=dtype)
    value[tree.level_start[H]:] = 0.0  # the deepest level is all terminal
    n_nt = tree.num_nonterminal
    value_nt = value[:n_nt] if eos is None else torch.empty(n_nt, dtype=dtype)
    q = torch.empty(n_nt, V, dtype=dtype)
    widest = max(tree.nt_level_start[d + 1] - tree.nt_level_start[d] for d in range(H))
    prod = torch.empty(widest, V, dtype=dtype)
    for depth in reversed(range(H)):
        lvl = tree.level_nt(depth)
        n = lvl.stop - lvl.start
        child_value = value[tree.nt_children(depth)].view(n, V)
        q_lvl = q[lvl]
        if gamma == 1.0:
            torch.add(r_kv[lvl], child_value, out=q_lvl)
        else:
            torch.add(r_kv[lvl], child_value, alpha=gamma, out=q_lvl)
        scratch = prod[:n]
        torch.mul(pi[lvl], q_lvl, out=scratch)
        torch.sum(scratch, 1, out=value_nt[lvl])
        if eos is not None:
            if depth == 0:
                value[:P] = value_nt[lvl]
            else:
                parent = tree.level_nt(depth - 1)
                block = value[tree.nt_children(depth - 1)].view(parent.stop - parent.start, V)
                _set_nt_children(block, value_nt[lvl], eos)
    return value, value_nt, q


def backward_values(tree: TokenTree, pi: torch.Tensor, r_kv: torch.Tensor, gamma: float):
    """Token-level ``V`` per node and ``Q`` per (non-terminal, token) for rewards ``r_kv [N_nt, V]``."""
    value, _, q = _backward_pass(tree, pi, r_kv, gamma)
    return value, q


def nt_discount(tree: TokenTree, gamma: float) -> torch.Tensor:
    """``gamma^d`` for every non-terminal node (``d`` = its depth), ``[N_nt]``."""
    return gamma ** tree.depth_n[tree.nt_node_k].to(torch.float64)


def policy_gradient_from_logit_grad(policy, tree: TokenTree, grad_logits: torch.Tensor) -> list[torch.Tensor]:
    """Chain rule through the policy's logit map: ``sum_{s,w} dJ/dlogit[s,w] * dlogit[s,w]/dtheta``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.enable_grad():
        logits = policy.node_logits(tree)
        grads = torch.autograd.grad(logits, params, grad_outputs=grad_logits.to(logits.dtype),
                                    allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def solve(mdp: TokenMDP, policy, with_grad: bool = True, r_kv: torch.Tensor | None = None,
          gamma: float | None = None) -> ExactSolution:
    """Exact ``J``, values, ``Q``, advantages and ``grad J`` by dynamic programming (engine a).

    ``r_kv`` and ``gamma`` override the MDP's rewards and discount (used for the KL and the
    proof checks). Raises ``ValueError`` when the tree exceeds the MDP's size guard.

    The gradient uses ``mu(s) pi(w|s) = mu(s w)``: ``dJ/dlogit_s[w] = gamma^d mu(s w) (Q - V)``,
    so it is one product of the child-indexed reach ``mu[P:].view(N_nt, V)`` with the advantage.
    """
    tree = mdp.tree
    gamma = float(mdp.gamma if gamma is None else gamma)
    r_kv = mdp.reward_matrix() if r_kv is None else r_kv
    r_kv = torch.as_tensor(r_kv, dtype=torch.float64).contiguous()
    P, V, H = tree.num_prompts, tree.vocab_size, tree.horizon
    # One forward of the policy serves both the DP (detached, renormalised in float64) and the
    # chain rule to the parameters.
    params = [p for p in policy.parameters() if p.requires_grad] if with_grad else []
    with torch.set_grad_enabled(bool(params)):
        logits = policy.node_logits(tree)
    logp = torch.log_softmax(logits.detach().to(torch.float64), dim=-1)
    with torch.no_grad(), _intra_op_threads(1):
        pi = logp.exp()
        rho = mdp.prompt_weights
        mu, past = _forward_pass(tree, pi, rho, r_kv, gamma)
        value, value_nt, q = _backward_pass(tree, pi, r_kv, gamma)
        adv = torch.sub(q, value_nt.unsqueeze(1))
        grad_logits = torch.mul(mu[P:].view(-1, V), adv)
        if gamma == 1.0:
            value_resp = torch.add(past, value)
        else:
            value_resp = torch.empty_like(past)
            for depth in range(H + 1):
                nodes = slice(tree.level_start[depth], tree.level_start[depth + 1])
                torch.add(past[nodes], value[nodes], alpha=gamma ** depth, out=value_resp[nodes])
                if depth < H:
                    grad_logits[tree.level_nt(depth)] *= gamma ** depth
        J = float((rho * value[:P]).sum())
        leaves = tree.leaf_ids
        if tree.eos_token is None:  # the leaves are exactly the deepest level, a slice of node ids
            deepest = slice(tree.level_start[H], tree.num_nodes)
            response_prob, response_rm = mu[deepest].clone(), past[deepest].clone()
        else:
            response_prob, response_rm = mu[leaves], past[leaves]
    grads = None
    if with_grad:
        grads = [torch.zeros_like(p) for p in params]
        if params and logits.requires_grad:
            got = torch.autograd.grad(logits, params, grad_outputs=grad_logits.to(logits.dtype), allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
    return ExactSolution(J=J, logp=logp, reach=mu, value=value, past=past, value_resp=value_resp, q=q,
                         advantage=adv, grad_logits=grad_logits, grads=grads, leaf_ids=leaves,
                         response_prob=response_prob, response_rm=response_rm, gamma=gamma)


# ---------------------------------------------------------------------------- enumeration
def path_log_probs(tree: TokenTree, logp: torch.Tensor) -> torch.Tensor:
    """``log P(W | x)`` of every complete response, summed along its path (differentiable)."""
    nt_path, tok_path, _ = tree.leaf_paths()
    valid = nt_path >= 0
    lp = logp[nt_path.clamp(min=0), tok_path.clamp(min=0)]
    return torch.where(valid, lp, torch.zeros((), dtype=lp.dtype)).sum(1)


def path_returns(tree: TokenTree, edge_n: torch.Tensor, gamma: float) -> torch.Tensor:
    """``RM(W) = sum_t gamma^(t-1) r_t`` of every complete response, summed along its path."""
    nt_path, tok_path, _ = tree.leaf_paths()
    valid = nt_path >= 0
    child = tree.num_prompts + nt_path.clamp(min=0) * tree.vocab_size + tok_path.clamp(min=0)
    disc = gamma ** torch.arange(tree.horizon, dtype=torch.float64)
    return torch.where(valid, edge_n[child] * disc, torch.zeros((), dtype=torch.float64)).sum(1)


def enumerate_objective(mdp: TokenMDP, policy) -> torch.Tensor:
    """``J = sum_W rho(x) P(W|x) RM(W)`` over all responses, as a differentiable scalar (engine b)."""
    tree = mdp.tree
    logp = policy.node_log_probs(tree)
    lp = path_log_probs(tree, logp)
    rm = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
    rho = mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
    return (rho * lp.exp() * rm).sum()


def grad_by_enumeration(mdp: TokenMDP, policy) -> tuple[float, list[torch.Tensor]]:
    """``J`` and ``grad J`` by autograd through :func:`enumerate_objective`."""
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.enable_grad():
        J = enumerate_objective(mdp, policy)
        grads = torch.autograd.grad(J, params, allow_unused=True)
    return float(J.detach()), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# ---------------------------------------------------------------------------- KL
def exact_kl(mdp: TokenMDP, policy, ref_policy, with_grad: bool = True):
    """Sequence-level ``KL(pi || pi_ref) = E_x E_{W~pi} [log pi(W|x) - log pi_ref(W|x)]`` and its
    gradient in ``policy``'s parameters.

    The KL is the (undiscounted) objective of the "reward" ``log pi - log pi_ref``; since
    ``E_pi[grad log pi] = 0``, its gradient is the policy gradient of that reward held fixed,
    computed by the same dynamic programme as :func:`solve`.

    Returns ``(kl, grads)`` with ``grads`` a list aligned with the policy's parameters.
    """
    tree = mdp.tree
    with torch.no_grad():
        logp = policy.node_log_probs(tree).to(torch.float64)
        logp_ref = ref_policy.node_log_probs(tree).to(torch.float64)
    sol = solve(mdp, policy, with_grad=with_grad, r_kv=logp - logp_ref, gamma=1.0)
    return sol.J, sol.grads


def kl_by_enumeration(mdp: TokenMDP, policy, ref_policy) -> tuple[float, list[torch.Tensor]]:
    """``KL(pi || pi_ref)`` summed over all responses, and its gradient by autograd."""
    tree = mdp.tree
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        lp_ref = path_log_probs(tree, ref_policy.node_log_probs(tree))
    with torch.enable_grad():
        lp = path_log_probs(tree, policy.node_log_probs(tree))
        rho = mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
        kl = (rho * lp.exp() * (lp - lp_ref)).sum()
        grads = torch.autograd.grad(kl, params, allow_unused=True)
    return float(kl.detach()), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
