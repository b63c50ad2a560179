"""Tabular and shared-parameter softmax policies (float64)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Policy


def _init_logits(shape, scale: float, seed: int | None, dtype) -> torch.Tensor:
    if seed is None:
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=dtype) * scale


class TabularSoftmax(Policy):
    """One free logit row per non-terminal node: ``pi(.|s) = softmax(theta_s)``.

    Its analytic score is ``d log pi(w|s) / d theta_s = e_w - pi(.|s)``.

    Args:
        tree: the :class:`~tpg.mdp.tree.TokenTree` whose non-terminal nodes get a row.
        logits: initial logits ``[N_nt, V]``; otherwise zeros, or Gaussian with ``scale`` when
            ``seed`` is given.
    """

    needs_tree = True

    def __init__(self, tree, logits: torch.Tensor | None = None, seed: int | None = None,
                 scale: float = 1.0, dtype=torch.float64):
        super().__init__(tree.vocab_size)
        shape = (tree.num_nonterminal, tree.vocab_size)
        if logits is None:
            logits = _init_logits(shape, scale, seed, dtype)
        logits = torch.as_tensor(logits, dtype=dtype)
        if tuple(logits.shape) != shape:
            raise ValueError(f"tabular logits must have shape [N_nt, V] = {list(shape)}, got {list(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("tabular logits must be finite")
        self.num_nonterminal = shape[0]
        self.logits = nn.Parameter(logits.clone())

    def node_logits(self, tree) -> torch.Tensor:
        if tree.num_nonterminal != self.num_nonterminal or tree.vocab_size != self.vocab_size:
            raise ValueError(f"tabular policy has {self.num_nonterminal} rows of {self.vocab_size} logits, "
                             f"the tree has {tree.num_nonterminal} non-terminal nodes with vocab {tree.vocab_size}")
        return self.logits

    def log_prob_rows(self):
        return torch.log_softmax(self.logits.detach(), dim=-1)

    def row_index(self, position, prev_b, nt_b):
        return nt_b


class SharedSoftmax(Policy):
    """Logits that depend only on (position, previous token): ``theta[t, prev]``.

    ``prev`` is the previous response token, or ``V + prompt`` for the first token, so the
    parameter has shape ``[H, V + P, V]``. It works for any horizon (no tree needed).
    """

    def __init__(self, vocab_size: int, horizon: int, num_prompts: int, logits: torch.Tensor | None = None,
                 seed: int | None = None, scale: float = 1.0, dtype=torch.float64):
        super().__init__(vocab_size)
        shape = (horizon, vocab_size + num_prompts, vocab_size)
        if logits is None:
            logits = _init_logits(shape, scale, seed, dtype)
        logits = torch.as_tensor(logits, dtype=dtype)
        if tuple(logits.shape) != shape:
            raise ValueError(f"shared logits must have shape [H, V + P, V] = {list(shape)}, got {list(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("shared logits must be finite")
        self.horizon = horizon
        self.num_prompts = num_prompts
        self.logits = nn.Parameter(logits.clone())

    def _node_rows(self, tree) -> torch.Tensor:
        nodes = tree.nt_node_k
        parent = tree.parent_n[nodes]
        prev = torch.where(parent >= 0, tree.token_n[nodes], tree.vocab_size + tree.prompt_n[nodes])
        return tree.depth_n[nodes] * (self.vocab_size + self.num_prompts) + prev

    def node_logits(self, tree) -> torch.Tensor:
        if tree.horizon > self.horizon or tree.num_prompts != self.num_prompts or tree.vocab_size != self.vocab_size:
            raise ValueError("shared policy shape does not match the tree (horizon, prompts or vocab)")
        flat = self.logits.reshape(-1, self.vocab_size)
        return flat[self._node_rows(tree)]

    def log_prob_rows(self):
        return torch.log_softmax(self.logits.detach(), dim=-1).reshape(-1, self.vocab_size)

    def row_index(self, position, prev_b, nt_b):
        return prev_b + position * (self.vocab_size + self.num_prompts)
