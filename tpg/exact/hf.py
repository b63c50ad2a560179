"""Exact ``J`` and ``grad J`` for a real language model restricted to ``K`` allowed tokens.

The engine of :mod:`tpg.exact.engine` only needs ``[N_nt, K]`` logits of the response tree, and
:meth:`tpg.policies.hf.HFRestrictedPolicy.node_logits` computes them with every distinct prefix
forwarded once, so :func:`tpg.exact.solve` and :func:`tpg.exact.grad_by_enumeration` work
unchanged. This module adds:

* :func:`solve_lm`: the same solution with one forward and one backward through the LM (``solve``
  runs the policy twice: once for the values, once more for the chain rule);
* :func:`naive_node_logits`: the ``[N_nt, K]`` logits with one full forward per prefix (no cache);
* :func:`enumerate_lm`: ``J = sum_W rho(x) P(W|x) RM(W)`` and its gradient by naive full-sequence
  enumeration, one forward of ``prompt + W`` per complete response (in chunks, gradients
  accumulated), through the restricted head or the model's full-vocabulary head;
* :class:`LMTokenScorer` / :func:`lm_token_scorer`: a frozen second LM whose log-probability of each
  token, ``log p_RM(w | s)`` over its full vocabulary, is a token reward
  (:class:`tpg.mdp.lm_tasks.LMRewards`);
* :func:`make_lm_problem`: ``(LMTaskMDP, HFRestrictedPolicy)`` with ``table``, ``rule`` or ``lm``
  token rewards, or their zero-reward twins;
* :func:`work_counts`: tokens forwarded with and without prefix sharing.
"""

from __future__ import annotations

import copy
import os

import torch

from ..mdp.lm_tasks import (LM_REWARDS, LMRewards, LMTaskMDP, position_token_rewards, rule_answers, rule_rewards)
from ..mdp.mdp import TokenMDP
from ..mdp.tree import DEFAULT_MAX_NODES, TokenTree
from ..policies.hf import HFRestrictedPolicy
from .engine import ExactSolution, path_returns, solve
from .transformer import prefix_logits_by_depth


def trainable_parameters(policy) -> list[torch.Tensor]:
    return [p for p in policy.parameters() if p.requires_grad]


def solve_lm(mdp: TokenMDP, policy, with_grad: bool = True, r_kv: torch.Tensor | None = None,
             gamma: float | None = None) -> ExactSolution:
    """:func:`tpg.exact.solve` on a real-LM policy: one prefix-shared forward of every tree node
    and one backward pass with ``grad_outputs = dJ/dlogit`` (solve itself works this way; the name
    is kept for callers of the LM path)."""
    return solve(mdp, policy, with_grad=with_grad, r_kv=r_kv, gamma=gamma)


def naive_node_logits(policy, tree: TokenTree, full_head: bool = False) -> torch.Tensor:
    """``[N_nt, K]`` logits with no sharing: for each depth ``d``, one full forward of every
    non-terminal node's ``prompt + d`` tokens (differentiable)."""
    policy.check_tree(tree)
    logits = prefix_logits_by_depth(tree, lambda prompts, tokens: policy.sequence_logits(prompts, tokens,
                                                                                        full_head=full_head))
    return logits.to(device=policy.out_device, dtype=policy.out_dtype)


def enumerate_lm(mdp: TokenMDP, policy, with_grad: bool = True, max_tokens: int = 8192,
                 full_head: bool = False) -> tuple[float, list[torch.Tensor] | None]:
    """``J`` and ``grad J`` by naive full-sequence enumeration (the baseline prefix sharing beats).

    Every complete response ``W`` is one sequence ``prompt + W`` run through the model without
    any cache; ``log P(W|x) = sum_t log pi(w_t | s_t)`` from that one forward, and
    ``J = sum_W rho(x) P(W|x) RM(W)``. Sequences go in chunks of at most ``max_tokens`` positions;
    each chunk's share of ``J`` is back-propagated at once and the gradients summed, so memory is
    one chunk's activations. ``full_head``: the model's own full-vocabulary logits (what a plain
    ``model(input_ids)`` computes), restricted to the allowed tokens afterwards."""
    tree = mdp.tree
    nt_path, tok_path, _ = tree.leaf_paths()
    mask = nt_path >= 0
    tokens = tok_path.clamp(min=0)
    prompt = tree.prompt_n[tree.leaf_ids]
    rm = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
    rho = mdp.prompt_weights[prompt]
    params = trainable_parameters(policy) if with_grad else []
    grads = [torch.zeros_like(p) for p in params] if with_grad else None
    L = tokens.shape[0]
    per = max(1, int(max_tokens) // (policy.prompt_width + tree.horizon))
    J = 0.0
    for lo in range(0, L, per):
        hi = min(L, lo + per)
        with torch.set_grad_enabled(bool(params)):
            lp = policy.token_log_probs(prompt[lo:hi], tokens[lo:hi], mask[lo:hi], full_head=full_head)
            lp = lp.to(device="cpu", dtype=torch.float64).sum(1)
            part = (rho[lo:hi] * lp.exp() * rm[lo:hi]).sum()
            if params:
                for acc, g in zip(grads, torch.autograd.grad(part, params, allow_unused=True)):
                    if g is not None:
                        acc += g
        J += float(part.detach())
    return J, grads


def work_counts(mdp: TokenMDP, policy) -> dict:
    """Forward positions: with prefix sharing (prompts once plus one per non-root non-terminal node),
    and naive (every complete response as a padded full sequence)."""
    tree = mdp.tree
    W = policy.prompt_width
    return {"shared_tokens": int(policy.prompt_len.sum()) + tree.num_nonterminal - tree.num_prompts,
            "naive_tokens": tree.num_leaves * (W + tree.horizon), "responses": tree.num_leaves,
            "nonterminal": tree.num_nonterminal}


# ---------------------------------------------------------------------------- a token reward model
class LMTokenScorer:
    """A frozen language model scoring tokens: ``score(s, w) = log p_RM(allowed[w] | s)``, the
    model's log-probability of the token under its *full* vocabulary (so a token the model finds
    unlikely costs reward, wherever the policy's allowed set is). ``node_scores`` uses the
    prefix-shared tree forward, ``sequence_scores`` full-sequence forwards; they agree to rounding."""

    def __init__(self, policy: HFRestrictedPolicy):
        self.policy = policy
        for p in policy.parameters():
            p.requires_grad_(False)
        self.vocab_size = policy.vocab_size

    def node_scores(self, tree: TokenTree) -> torch.Tensor:
        with torch.no_grad():
            return self.policy.node_token_log_probs(tree).to(torch.float64).cpu()

    def sequence_scores(self, prompt_b, tokens_bt, mask_bt) -> torch.Tensor:
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long)
        tokens_bt = torch.as_tensor(tokens_bt, dtype=torch.long)
        B, H = tokens_bt.shape
        per = max(1, self.policy.max_batch // (self.policy.prompt_width + H))
        out = []
        with torch.no_grad():
            for lo in range(0, B, per):
                hi = min(B, lo + per)
                z, lse = self.policy.sequence_logits(prompt_b[lo:hi], tokens_bt[lo:hi, :H - 1], full_norm=True)
                lp = (z - lse.unsqueeze(2)).gather(2, tokens_bt[lo:hi].to(z.device).unsqueeze(2)).squeeze(2)
                out.append(lp.to(torch.float64).cpu())
        r = torch.cat(out) if out else torch.zeros(0, H, dtype=torch.float64)
        return torch.where(torch.as_tensor(mask_bt), r, torch.zeros((), dtype=torch.float64))


def lm_token_scorer(model, allowed_tokens, prompts, horizon: int, **policy_kwargs) -> LMTokenScorer:
    """:class:`LMTokenScorer` of ``model`` (any source :func:`tpg.policies.hf.load_causal_lm` takes),
    frozen, over the same allowed tokens and prompts as the policy."""
    policy_kwargs = dict(policy_kwargs, trainable="none")
    return LMTokenScorer(HFRestrictedPolicy(model, allowed_tokens, prompts, horizon, **policy_kwargs))


# ---------------------------------------------------------------------------- problems
def _default_reward_model(model, policy):
    """The policy's model source (a path, shorthand or config: a fresh model), else a frozen copy."""
    from transformers import PretrainedConfig
    if isinstance(model, (str, os.PathLike, PretrainedConfig)):
        return model
    return copy.deepcopy(policy.model)


def make_lm_problem(model, allowed_tokens, prompts, horizon: int, *, eos_token=None, prompt_weights=None,
                    reward: str = "table", reward_seed: int = 0, reward_scale: float = 1.0, target=None,
                    score: str = "token", reward_model=None, twin: bool = False, gamma: float = 1.0,
                    trainable: str = "all", dtype=None, device=None, seed: int = 0, tokenizer=None,
                    tree_mode: str = "auto", max_batch: int = 8192, max_nodes: int = DEFAULT_MAX_NODES,
                    policy: HFRestrictedPolicy | None = None) -> tuple[LMTaskMDP, HFRestrictedPolicy]:
    """``(mdp, policy)``: an :class:`HFRestrictedPolicy` and an :class:`LMTaskMDP` over its tokens.

    ``reward``: ``table`` (random (position, token) table from ``reward_seed``, times ``reward_scale``),
    ``rule`` (the answer ``target``, MDP token indices, or a random one from ``reward_seed``; ``score``
    ``token`` or ``whole``) or ``lm`` (``reward_scale * log p_RM``; ``reward_model`` defaults to the
    policy's model source initialised with ``seed + 1``, a copy of it for a model instance).
    ``twin``: the zero-reward twin. ``prompt_weights`` default uniform."""
    if reward not in LM_REWARDS:
        raise ValueError(f"reward must be one of {', '.join(LM_REWARDS)}; got {reward!r}")
    if score not in ("token", "whole"):
        raise ValueError(f"score must be 'token' or 'whole', got {score!r}")
    kw = dict(tokenizer=tokenizer, eos_token=eos_token, dtype=dtype, device=device, tree_mode=tree_mode,
              max_batch=max_batch)
    if policy is None:
        policy = HFRestrictedPolicy(model, allowed_tokens, prompts, horizon, trainable=trainable, seed=seed, **kw)
    P, K, H, eos = policy.num_prompts, policy.vocab_size, policy.horizon, policy.eos_index
    rho = torch.full((P,), 1.0 / P, dtype=torch.float64) if prompt_weights is None else prompt_weights
    answers = None
    if reward == "table":
        rewards = position_token_rewards(H, K, P, seed=reward_seed, scale=reward_scale)
    elif reward == "rule":
        answers = rule_answers(P, K, H, eos, seed=reward_seed, target=target)
        rewards = rule_rewards(answers, whole=score == "whole")
    else:
        if reward_model is None:
            reward_model = _default_reward_model(model, policy)
        rm_kw = dict(kw, tokenizer=policy.tokenizer, eos_token=(None if eos is None else policy.allowed_tokens[eos]))
        scorer = lm_token_scorer(reward_model, list(policy.allowed_tokens), [list(p) for p in policy.prompt_ids], H,
                                 seed=seed + 1, **rm_kw)
        rewards = LMRewards(scorer, scale=reward_scale)
    name = f"lm[{policy.model_name}]:K={K},H={H},reward={reward}"
    mdp = LMTaskMDP(K, H, rho, rewards, policy.prompt_ids, policy.allowed_tokens, eos, gamma, max_nodes, name=name,
                    reward_kind=reward, answers=answers)
    return (mdp.zero_reward_twin() if twin else mdp), policy


__all__ = ["LMTokenScorer", "enumerate_lm", "lm_token_scorer", "make_lm_problem", "naive_node_logits", "solve_lm",
           "work_counts"]
