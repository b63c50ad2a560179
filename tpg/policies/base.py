"""The policy interface shared by every simulator policy.

A policy is a ``torch.nn.Module`` over a vocabulary of ``V`` tokens. The exact engine asks
for the logits of every non-terminal node of the stored tree at once
(:meth:`Policy.node_logits`, ``[N_nt, V]``); the sampler asks for the next-token
log-probabilities of a batch of states (:meth:`Policy.step_log_probs`). Policies whose
logits come from a finite table also expose :meth:`Policy.log_prob_rows` and
:meth:`Policy.row_index`, the fast path of the sampler.
"""

from __future__ import annotations

import torch
from torch import nn


class Policy(nn.Module):
    """Base class: softmax policies over ``vocab_size`` tokens, float64 by default."""

    #: whether sampling needs the node ids of the stored tree
    needs_tree: bool = False

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def node_logits(self, tree) -> torch.Tensor:
        """Logits of every non-terminal node of ``tree``, ``[N_nt, V]`` (differentiable)."""
        raise NotImplementedError

    def node_log_probs(self, tree) -> torch.Tensor:
        """``log pi(w | s)`` for every non-terminal node ``s``, ``[N_nt, V]`` (differentiable)."""
        return torch.log_softmax(self.node_logits(tree), dim=-1)

    def forward(self, tree) -> torch.Tensor:
        return self.node_log_probs(tree)

    # ---------------------------------------------------------------- sampling
    def log_prob_rows(self) -> torch.Tensor | None:
        """A table of next-token log-probabilities ``[R, V]`` (detached), or ``None`` when the
        policy has no finite table (then the sampler calls :meth:`step_log_probs`)."""
        return None

    def row_index(self, position: int, prev_b: torch.Tensor, nt_b: torch.Tensor | None) -> torch.Tensor:
        """Row of :meth:`log_prob_rows` for each state in a batch."""
        raise NotImplementedError

    def step_log_probs(self, position: int, prompt_b: torch.Tensor, tokens_bt: torch.Tensor,
                       prev_b: torch.Tensor, nt_b: torch.Tensor | None) -> torch.Tensor:
        """Next-token log-probabilities ``[B, V]`` for states whose prefixes are ``tokens_bt[:, :position]``."""
        rows = self.log_prob_rows()
        if rows is None:
            raise NotImplementedError(f"{type(self).__name__} must implement step_log_probs")
        return rows[self.row_index(position, prev_b, nt_b)]
