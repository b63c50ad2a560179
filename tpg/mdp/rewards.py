"""True token-level rewards ``r(s_t, w_t)`` of a token MDP.

Two storage forms:

* :class:`TreeRewards`: one reward per (prompt, prefix, token), i.e. per non-root node of
  the :class:`~tpg.mdp.tree.TokenTree` (the reward of the token that leads into it);
* :class:`CompactRewards`: a table ``r[t, prev, w]`` over (position ``t`` = 0-based index
  of the token, previous token, token). The "previous token" of the first response token
  is the prompt, encoded as ``V + prompt``, so the table has shape ``[H, V + P, V]``.
  Compact rewards work for any horizon; the exact engine materialises them on the tree
  only below the size guard.

:class:`TwinRewards` is the zero-reward twin of any of them: the same response-level
reward ``RM(W)`` with all of it on the last token (``RM(W) / gamma^(T-1)`` there, so that
the discounted sum is unchanged).
"""

from __future__ import annotations

import torch

from .tree import TokenTree


def _check_finite(name: str, values: torch.Tensor) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name} must be finite (no NaN or inf); entry {idx} is {values[idx].item()}")


class Rewards:
    """Interface of a token reward function."""

    #: whether evaluating on rollouts needs the node ids of the stored tree
    needs_tree: bool = False

    def edge_rewards(self, mdp, tree: TokenTree) -> torch.Tensor:
        """Reward of the token leading into every node, ``[num_nodes]`` float64 (0 at roots)."""
        raise NotImplementedError

    def rollout_rewards(self, mdp, prompt_b: torch.Tensor, tokens_bt: torch.Tensor,
                        mask_bt: torch.Tensor, child_bt: torch.Tensor | None) -> torch.Tensor:
        """True reward of each sampled token, ``[B, H]`` float64, zero where ``mask_bt`` is False.

        ``child_bt`` holds the node id reached by each token when the tree is stored."""
        raise NotImplementedError

    def validate(self, mdp) -> None:
        """Raise ``ValueError`` if the rewards do not fit ``mdp``."""


class TreeRewards(Rewards):
    """Explicit rewards per node of the tree: ``values_n[n]`` is ``r(parent(n), token(n))``."""

    needs_tree = True

    def __init__(self, values_n: torch.Tensor):
        self.values_n = torch.as_tensor(values_n, dtype=torch.float64)

    def validate(self, mdp) -> None:
        _check_finite("token_rewards", self.values_n)
        n = mdp.tree.num_nodes
        if self.values_n.shape != (n,):
            raise ValueError(f"token_rewards must have one entry per tree node ({n}), got shape "
                             f"{tuple(self.values_n.shape)}")
        if bool((self.values_n[: mdp.num_prompts] != 0).any()):
            raise ValueError("token_rewards of the root nodes (empty prefixes) must be 0")

    def edge_rewards(self, mdp, tree):
        return self.values_n

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        if child_bt is None:
            raise ValueError("tree rewards need node ids; sample with the tree stored")
        return torch.where(mask_bt, self.values_n[child_bt.clamp(min=0)], torch.zeros((), dtype=torch.float64))


class CompactRewards(Rewards):
    """Rewards ``table[t, prev, w]`` that depend only on (position, previous token, token)."""

    def __init__(self, table: torch.Tensor):
        self.table = torch.as_tensor(table, dtype=torch.float64)

    def validate(self, mdp) -> None:
        shape = (mdp.horizon, mdp.vocab_size + mdp.num_prompts, mdp.vocab_size)
        if tuple(self.table.shape) != shape:
            raise ValueError(f"compact reward table must have shape [horizon, vocab_size + prompts, "
                             f"vocab_size] = {list(shape)}, got {list(self.table.shape)}")
        _check_finite("compact reward table", self.table)

    def edge_rewards(self, mdp, tree):
        out = torch.zeros(tree.num_nodes, dtype=torch.float64)
        child = slice(tree.num_prompts, tree.num_nodes)
        parent = tree.parent_n[child]
        pos = tree.depth_n[child] - 1
        prev = torch.where(tree.parent_n[parent] >= 0, tree.token_n[parent],
                           tree.vocab_size + tree.prompt_n[parent])
        out[child] = self.table[pos, prev, tree.token_n[child]]
        return out

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        B, H = tokens_bt.shape
        prev = torch.empty_like(tokens_bt)
        prev[:, 0] = mdp.vocab_size + prompt_b
        prev[:, 1:] = tokens_bt[:, :-1]
        pos = torch.arange(H).expand(B, H)
        r = self.table[pos, prev, tokens_bt]
        return torch.where(mask_bt, r, torch.zeros((), dtype=torch.float64))


class TwinRewards(Rewards):
    """Zero-reward twin of ``base``: ``RM(W)`` unchanged, all of it on the last token."""

    def __init__(self, base: Rewards):
        self.base = base
        self.needs_tree = base.needs_tree

    def validate(self, mdp) -> None:
        self.base.validate(mdp)

    def edge_rewards(self, mdp, tree):
        base = self.base.edge_rewards(mdp, tree)
        rm = discounted_prefix_sums(tree, base, mdp.gamma)
        out = torch.zeros_like(base)
        leaves = tree.leaf_ids
        out[leaves] = rm[leaves] / mdp.gamma ** (tree.depth_n[leaves] - 1).to(torch.float64)
        return out

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        base = self.base.rollout_rewards(mdp, prompt_b, tokens_bt, mask_bt, child_bt)
        H = tokens_bt.shape[1]
        disc = mdp.gamma ** torch.arange(H, dtype=torch.float64)
        rm = (base * disc).sum(1)
        length = mask_bt.sum(1)
        out = torch.zeros_like(base)
        rows = torch.nonzero(length > 0).flatten()
        last = length[rows] - 1
        out[rows, last] = rm[rows] / mdp.gamma ** last.to(torch.float64)
        return out


def discounted_prefix_sums(tree: TokenTree, edge_n: torch.Tensor, gamma: float) -> torch.Tensor:
    """``c(n) = sum_{k <= depth(n)} gamma^(k-1) r_k`` along the path to every node (level by level)."""
    c = torch.zeros_like(edge_n)
    for depth in range(tree.horizon):
        kids = tree.nt_children(depth)
        parents = tree.nt_node_k[tree.level_nt(depth)]
        c[kids] = (c[parents].unsqueeze(1) + gamma ** depth * edge_n[kids].view(-1, tree.vocab_size)).reshape(-1)
    return c
