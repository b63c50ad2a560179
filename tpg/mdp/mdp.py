"""The token MDP of an LLM (docs/THEORY.md section 1).

A prompt ``x`` is drawn from ``prompt_weights``; the policy then emits tokens
``w_1 .. w_T`` from a vocabulary of ``vocab_size``; a response ends when it emits
``eos_token`` (if any) or reaches ``horizon`` tokens. Transitions are deterministic, so
the states form a tree. ``RM(W) = sum_t gamma^(t-1) r(s_t, w_t)``.
"""

from __future__ import annotations

import math

import torch

from .rewards import Rewards, TwinRewards
from .tree import DEFAULT_MAX_NODES, TokenTree, check_tree_size, describe_count, log_num_nodes, num_tree_nodes


def validate_shape(vocab_size, horizon, eos_token, gamma, prompt_weights) -> torch.Tensor:
    """Check the scalar fields of an MDP; returns the prompt weights as float64."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    if eos_token is not None:
        if not isinstance(eos_token, int) or isinstance(eos_token, bool) or not 0 <= eos_token < vocab_size:
            raise ValueError(f"eos_token must be null/None or an integer in [0, {vocab_size - 1}], "
                             f"got {eos_token!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) \
            or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    try:
        w = torch.as_tensor(prompt_weights, dtype=torch.float64).flatten()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompt_weights must be a list of numbers, got {prompt_weights!r}") from exc
    if w.numel() < 1:
        raise ValueError("prompt_weights must have at least one entry")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"prompt_weights must be finite, got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"prompt_weights must be >= 0, got {w.tolist()}")
    if abs(float(w.sum()) - 1.0) > 1e-9:
        raise ValueError(f"prompt_weights must sum to 1 (within 1e-9), got sum {float(w.sum())!r}")
    return w


def checked_prefixes(mdp, prompt_b, prefix_bt, prefix_len_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt_b [B], prefix_bt [B, L], prefix_len_b [B])`` of continuation prefixes (each prompt's
    first ``prefix_len`` tokens) as long tensors, checked against ``mdp``: ``L <= H``, lengths in
    ``[0, L]``, prompt ids in ``[0, P - 1]``, the given tokens in ``[0, V - 1]``; ``ValueError`` saying
    which. An EOS inside a prefix is for the caller to refuse (it knows its own words for it)."""
    H, V, P = mdp.horizon, mdp.vocab_size, mdp.num_prompts
    prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
    prefix_bt = torch.as_tensor(prefix_bt, dtype=torch.long)
    prefix_len_b = torch.as_tensor(prefix_len_b, dtype=torch.long).flatten()
    B = prompt_b.numel()
    if prefix_bt.dim() != 2 or prefix_bt.shape[0] != B or prefix_bt.shape[1] > H:
        raise ValueError(f"prefix tokens must have shape [B, L] with B={B} and L <= horizon={H}, "
                         f"got {list(prefix_bt.shape)}")
    L = prefix_bt.shape[1]
    if prefix_len_b.numel() != B or bool(((prefix_len_b < 0) | (prefix_len_b > L)).any()):
        raise ValueError(f"prefix lengths must be B={B} integers in [0, {L}], got {prefix_len_b.tolist()[:10]}")
    if bool(((prompt_b < 0) | (prompt_b >= P)).any()):
        raise ValueError(f"prompt ids must be in [0, {P - 1}]")
    given = torch.arange(L).expand(B, L) < prefix_len_b.unsqueeze(1)
    if bool(((prefix_bt < 0) | (prefix_bt >= V))[given].any()):
        raise ValueError(f"prefix tokens must be in [0, {V - 1}]")
    return prompt_b, prefix_bt, prefix_len_b


class TokenMDP:
    """A token-tree MDP with known token-level rewards.

    Args:
        vocab_size: number of tokens ``V >= 2``.
        horizon: maximum response length ``H >= 1``.
        prompt_weights: distribution ``rho`` over the prompts (non-negative, sums to 1).
        rewards: a :class:`~tpg.mdp.rewards.Rewards` (tree or compact).
        eos_token: token id that ends a response, or ``None``.
        gamma: discount in ``(0, 1]``.
        max_nodes: size guard for the stored tree.
        name: a label used in tables.
        tree: an already built tree of the same shape (saves rebuilding it).
    """

    def __init__(self, vocab_size: int, horizon: int, prompt_weights, rewards: Rewards,
                 eos_token: int | None = None, gamma: float = 1.0,
                 max_nodes: int = DEFAULT_MAX_NODES, name: str = "mdp", tree: TokenTree | None = None):
        self.prompt_weights = validate_shape(vocab_size, horizon, eos_token, gamma, prompt_weights)
        self.vocab_size = vocab_size
        self.horizon = horizon
        self.eos_token = eos_token
        self.gamma = float(gamma)
        self.max_nodes = int(max_nodes)
        self.name = name
        if not isinstance(rewards, Rewards):
            raise ValueError(f"rewards must be a tpg Rewards object, got {type(rewards).__name__}")
        self.rewards = rewards
        self._tree: TokenTree | None = tree
        self._edge: torch.Tensor | None = None
        if not rewards.needs_tree or self.tree_fits():
            rewards.validate(self)

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_weights.numel())

    @property
    def log_num_nodes(self) -> float:
        """``ln`` of the response tree's node count, O(1) (:func:`~tpg.mdp.tree.log_num_nodes`)."""
        return log_num_nodes(self.num_prompts, self.vocab_size, self.horizon, self.eos_token)

    @property
    def num_nodes(self) -> int:
        """The exact node count of the response tree; ``ValueError`` past ``10^4000`` nodes (a
        horizon of thousands), where an exact count is of no use and costly."""
        if self.log_num_nodes > 4000 * math.log(10):
            raise ValueError(f"horizon={self.horizon}: the response tree has "
                             f"{describe_count(self.log_num_nodes)} nodes, too many to count exactly")
        return num_tree_nodes(self.num_prompts, self.vocab_size, self.horizon, self.eos_token)

    def tree_fits(self) -> bool:
        """Whether the response tree is within the size guard (O(1): compares logarithms first)."""
        if self.log_num_nodes > math.log(max(self.max_nodes, 1)) + 1e-6:
            return False
        return self.num_nodes <= self.max_nodes

    @property
    def tree(self) -> TokenTree:
        """The stored response tree (built on first use; ``ValueError`` past the size guard)."""
        if self._tree is None:
            check_tree_size(self.num_prompts, self.vocab_size, self.horizon, self.eos_token, self.max_nodes)
            self._tree = TokenTree.build(self.num_prompts, self.vocab_size, self.horizon, self.eos_token,
                                         self.max_nodes)
        return self._tree

    def edge_rewards(self) -> torch.Tensor:
        """``r`` of the token leading into every tree node, ``[num_nodes]`` float64."""
        if self._edge is None:
            self._edge = self.rewards.edge_rewards(self, self.tree)
        return self._edge

    def reward_matrix(self) -> torch.Tensor:
        """``r(s, w)`` for every non-terminal node ``s`` and token ``w``: ``[N_nt, V]``."""
        return self.edge_rewards()[self.num_prompts:].view(-1, self.vocab_size)

    def zero_reward_twin(self) -> "TokenMDP":
        """Same ``RM(W)`` for every response, all of it on the last token (ZRA holds)."""
        base = self.rewards.base if isinstance(self.rewards, TwinRewards) else self.rewards
        return TokenMDP(self.vocab_size, self.horizon, self.prompt_weights.clone(), TwinRewards(base),
                        self.eos_token, self.gamma, self.max_nodes, name=f"{self.name}/zra-twin", tree=self._tree)

    def with_gamma(self, gamma: float) -> "TokenMDP":
        """The same rewards and tree under another discount."""
        return TokenMDP(self.vocab_size, self.horizon, self.prompt_weights.clone(), self.rewards,
                        self.eos_token, gamma, self.max_nodes, name=f"{self.name}/gamma={gamma:g}", tree=self._tree)

    def describe(self) -> str:
        eos = "none" if self.eos_token is None else str(self.eos_token)
        return (f"{self.name}: V={self.vocab_size} H={self.horizon} eos={eos} gamma={self.gamma:g} "
                f"prompts={self.num_prompts} nodes={self._nodes_text()}")

    def _nodes_text(self) -> str:
        log_n = self.log_num_nodes
        return describe_count(log_n, self.num_nodes if log_n < 30 * math.log(10) else None)

    def __repr__(self) -> str:
        return f"TokenMDP({self.describe()})"
