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


def reach_probabilities(tree: TokenTree, pi: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``mu(s) = rho(x) P(s | x)`` for every node, level by level."""
    mu = torch.zeros(tree.num_nodes, dtype=pi.dtype)
    mu[: tree.num_prompts] = rho
    for depth in range(tree.horizon):
        lvl = tree.level_nt(depth)
        parents = tree.nt_node_k[lvl]
        mu[tree.nt_children(depth)] = (mu[parents].unsqueeze(1) * pi[lvl]).reshape(-1)
    return mu


def backward_values(tree: TokenTree, pi: torch.Tensor, r_kv: torch.Tensor, gamma: float):
    """Token-level ``V`` per node and ``Q`` per (non-terminal, token) for rewards ``r_kv [N_nt, V]``."""
    value = torch.zeros(tree.num_nodes, dtype=pi.dtype)
    V = tree.vocab_size
    for depth in reversed(range(tree.horizon)):
        lvl = tree.level_nt(depth)
        q = r_kv[lvl] + gamma * value[tree.nt_children(depth)].view(-1, V)
        value[tree.nt_node_k[lvl]] = (pi[lvl] * q).sum(1)
    q_all = r_kv + gamma * value[tree.num_prompts:].view(-1, V)
    return value, q_all


def _past_rewards(tree: TokenTree, r_kv: torch.Tensor, gamma: float) -> torch.Tensor:
    past = torch.zeros(tree.num_nodes, dtype=r_kv.dtype)
    for depth in range(tree.horizon):
        lvl = tree.level_nt(depth)
        parents = tree.nt_node_k[lvl]
        past[tree.nt_children(depth)] = (past[parents].unsqueeze(1) + gamma ** depth * r_kv[lvl]).reshape(-1)
    return past


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
    """
    tree = mdp.tree
    gamma = mdp.gamma if gamma is None else gamma
    r_kv = mdp.reward_matrix() if r_kv is None else r_kv
    with torch.no_grad():
        logp = policy.node_log_probs(tree).to(torch.float64)
        pi = logp.exp()
        rho = mdp.prompt_weights
        mu = reach_probabilities(tree, pi, rho)
        value, q = backward_values(tree, pi, r_kv, gamma)
        past = _past_rewards(tree, r_kv, gamma)
        disc_n = gamma ** tree.depth_n.to(torch.float64)
        value_resp = past + disc_n * value
        v_nt = value[tree.nt_node_k]
        adv = q - v_nt.unsqueeze(1)
        mu_nt = mu[tree.nt_node_k]
        grad_logits = (mu_nt * nt_discount(tree, gamma)).unsqueeze(1) * pi * adv
        J = float((rho * value[: tree.num_prompts]).sum())
    grads = policy_gradient_from_logit_grad(policy, tree, grad_logits) if with_grad else None
    leaves = tree.leaf_ids
    return ExactSolution(J=J, logp=logp, reach=mu, value=value, past=past, value_resp=value_resp, q=q,
                         advantage=adv, grad_logits=grad_logits, grads=grads, leaf_ids=leaves,
                         response_prob=mu[leaves], response_rm=past[leaves], gamma=gamma)


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
