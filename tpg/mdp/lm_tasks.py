"""Token-reward MDPs for a real language model restricted to ``K`` allowed tokens.

The MDP's vocabulary is the policy's: index ``k`` is LM token ``allowed_tokens[k]``, EOS (when
given) one of them; prompts are LM token-id sequences. Three kinds of known token rewards:

* ``table``: a random (position, token) table ``r(s_t, w_t) = R[t, w_t]``, ``R ~ N(0, scale^2)``
  (:func:`position_token_rewards`, a :class:`~tpg.mdp.rewards.CompactRewards` that ignores the
  previous token);
* ``rule``: one right answer per prompt, 1 per correct token or 1 for the whole answer
  (:class:`~tpg.mdp.tasks.TargetRewards`);
* ``lm``: a frozen second LM as a token reward model, ``r(s, w) = scale * log p_RM(w | s)``, its
  log-probability of each token under its full vocabulary (:class:`LMRewards`; the scorer comes
  from :func:`tpg.exact.hf.lm_token_scorer`).

Each has its zero-reward twin (:meth:`LMTaskMDP.zero_reward_twin`: the same ``RM(W)``, all of it
on the last token), as for any :class:`~tpg.mdp.rewards.Rewards`.
"""

from __future__ import annotations

import math

import torch

from .mdp import TokenMDP
from .rewards import CompactRewards, Rewards, TwinRewards, _check_finite
from .tasks import TargetRewards
from .tree import DEFAULT_MAX_NODES, TokenTree

from .specs import LM_REWARDS  # noqa: E402  (torch-free home: tpg verify --help)


class LMTaskMDP(TokenMDP):
    """A :class:`TokenMDP` over the allowed tokens of a language model.

    Extra attributes: ``prompt_ids`` (the LM token ids of each prompt, a tuple of tuples),
    ``allowed_tokens`` (the LM token id of each MDP token), ``reward_kind`` (``table``, ``rule``,
    ``lm``) and ``answers`` (rule rewards: the right response of each prompt ``[P, Lt]``, else
    ``None``). Its zero-reward twin and ``with_gamma`` copies keep them.
    """

    def __init__(self, vocab_size: int, horizon: int, prompt_weights, rewards: Rewards, prompt_ids, allowed_tokens,
                 eos_token: int | None = None, gamma: float = 1.0, max_nodes: int = DEFAULT_MAX_NODES,
                 name: str = "lm", tree: TokenTree | None = None, reward_kind: str = "",
                 answers: torch.Tensor | None = None):
        self.prompt_ids = tuple(tuple(int(t) for t in p) for p in prompt_ids)
        self.allowed_tokens = tuple(int(t) for t in allowed_tokens)
        self.reward_kind = reward_kind
        self.answers = answers
        if len(self.allowed_tokens) != vocab_size:
            raise ValueError(f"{len(self.allowed_tokens)} allowed tokens for a vocabulary of {vocab_size}")
        super().__init__(vocab_size, horizon, prompt_weights, rewards, eos_token, gamma, max_nodes, name, tree)
        if len(self.prompt_ids) != self.num_prompts:
            raise ValueError(f"{len(self.prompt_ids)} prompts for {self.num_prompts} prompt weights")

    def _derive(self, rewards: Rewards, gamma: float, name: str) -> "LMTaskMDP":
        return LMTaskMDP(self.vocab_size, self.horizon, self.prompt_weights.clone(), rewards, self.prompt_ids,
                         self.allowed_tokens, self.eos_token, gamma, self.max_nodes, name=name, tree=self._tree,
                         reward_kind=self.reward_kind, answers=self.answers)

    def zero_reward_twin(self) -> "LMTaskMDP":
        base = self.rewards.base if isinstance(self.rewards, TwinRewards) else self.rewards
        return self._derive(TwinRewards(base), self.gamma, f"{self.name}/zra-twin")

    def with_gamma(self, gamma: float) -> "LMTaskMDP":
        return self._derive(self.rewards, gamma, f"{self.name}/gamma={gamma:g}")


def position_token_rewards(horizon: int, vocab_size: int, num_prompts: int, seed: int = 0,
                           scale: float = 1.0) -> CompactRewards:
    """``r(s_t, w_t) = R[t, w_t]`` with ``R ~ N(0, scale^2)`` from ``seed`` (a compact table
    ``[H, V + P, V]`` constant along the previous-token axis)."""
    gen = torch.Generator().manual_seed(int(seed))
    R = torch.randn(horizon, 1, vocab_size, generator=gen, dtype=torch.float64) * float(scale)
    return CompactRewards(R.expand(horizon, vocab_size + num_prompts, vocab_size).clone())


def rule_answers(num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None, seed: int = 0,
                 target=None) -> torch.Tensor:
    """The right answer of each prompt ``[P, Lt]`` (MDP token indices): ``target`` for every prompt
    when given, else random content tokens from ``seed`` (``H`` of them, or ``H - 1`` and EOS)."""
    if target is not None:
        t = torch.as_tensor(target, dtype=torch.long)
        t = t.unsqueeze(0) if t.dim() == 1 else t
        if t.shape[0] == 1:
            t = t.expand(num_prompts, -1)
        if t.shape[0] != num_prompts or t.numel() == 0:
            raise ValueError(f"target must be one answer or one per prompt ({num_prompts}), got shape {list(t.shape)}")
        return t.clone()
    content = [k for k in range(vocab_size) if k != eos_token]
    gen = torch.Generator().manual_seed(int(seed))
    n = horizon if eos_token is None else max(horizon - 1, 1)
    ans = torch.tensor(content)[torch.randint(len(content), (num_prompts, n), generator=gen)]
    if eos_token is not None and horizon > 1:
        ans = torch.cat([ans, torch.full((num_prompts, 1), eos_token, dtype=torch.long)], 1)
    return ans


class LMRewards(Rewards):
    """A frozen language model as a token reward model: ``r(s, w) = scale * score(s, w)``.

    ``scorer`` is any object with ``node_scores(tree) -> [N_nt, V]`` (a score for every
    non-terminal state and token of the stored tree) and ``sequence_scores(prompt_b, tokens_bt,
    mask_bt) -> [B, H]`` (the score of each token of given responses); both float64 and equal up to
    rounding (:func:`tpg.exact.hf.lm_token_scorer` gives ``log p_RM(w | s)``). Scores on the tree are
    computed once per tree; rollouts that carry node ids read them, others are scored by the model.
    """

    def __init__(self, scorer, scale: float = 1.0, name: str = "lm"):
        self.scorer = scorer
        self.scale = float(scale)
        self.name = name
        self._edges: dict = {}

    def validate(self, mdp) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"reward scale must be finite, got {self.scale}")
        vocab = getattr(self.scorer, "vocab_size", mdp.vocab_size)
        if vocab != mdp.vocab_size:
            raise ValueError(f"the reward model scores {vocab} tokens, the MDP has {mdp.vocab_size}")

    def edge_rewards(self, mdp, tree):
        key = id(tree)
        if key not in self._edges:
            with torch.no_grad():
                r_kv = self.scorer.node_scores(tree).detach().to(torch.float64).cpu() * self.scale
            if tuple(r_kv.shape) != (tree.num_nonterminal, tree.vocab_size):
                raise ValueError(f"reward model scores have shape {list(r_kv.shape)}, expected "
                                 f"{[tree.num_nonterminal, tree.vocab_size]}")
            out = torch.zeros(tree.num_nodes, dtype=torch.float64)
            out[tree.num_prompts:] = r_kv.reshape(-1)
            _check_finite("LM token rewards", out)
            self._edges = {key: (tree, out)}  # keep the tree alive with its rewards
        return self._edges[key][1]

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        zero = torch.zeros((), dtype=torch.float64)
        if child_bt is not None and mdp._tree is not None:
            edge = self.edge_rewards(mdp, mdp._tree)
            return torch.where(mask_bt, edge[child_bt.clamp(min=0)], zero)
        with torch.no_grad():
            r = self.scorer.sequence_scores(prompt_b, tokens_bt, mask_bt).detach().to(torch.float64).cpu()
        return torch.where(mask_bt, r * self.scale, zero)


def rule_rewards(answers: torch.Tensor, whole: bool = False) -> TargetRewards:
    """1 per token equal to the answer's token at its position (``whole=False``), or 1 on the token
    completing the whole answer (``whole=True``)."""
    return TargetRewards(answers, whole=whole)


__all__ = ["LM_REWARDS", "LMRewards", "LMTaskMDP", "position_token_rewards", "rule_answers", "rule_rewards"]
