"""The complete response tree of a token MDP, stored in flat arrays.

Layout (every exact computation relies on it):

* node ids ``0 .. P-1`` are the prompts' roots (the empty prefix of prompt ``p``);
* the non-terminal nodes are numbered ``k = 0 .. N_nt-1`` in increasing node id
  (so level by level), and the child of non-terminal ``k`` by token ``v`` is node
  ``P + k * V + v``.

Hence the children of the non-terminal nodes of one level form one contiguous block
of node ids that reshapes to ``[n_nt(level), V]``, and every array indexed by
"(non-terminal node, token)" is simply ``node_array[P:].view(N_nt, V)``. A node is
terminal when its prefix has ``H`` tokens or ends with the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# the node counts and the size guard live in the torch-free .sizes (a spec's ranges are checked before torch
# loads); re-exported here, where they have always been imported from
from .sizes import (DEFAULT_MAX_NODES, TREE_BYTES_PER_NODE, check_tree_size, count_nodes,  # noqa: F401
                    describe_count, log_num_nodes, max_fitting_horizon, num_tree_nodes)


@dataclass(eq=False)
class TokenTree:
    """Flat, level-ordered response tree. Build it with :meth:`TokenTree.build`.

    Attributes (all ``torch.long`` on CPU unless stated):
        num_prompts, vocab_size, horizon, eos_token: the shape of the tree.
        depth_n: number of response tokens in each node's prefix.
        prompt_n: the prompt each node belongs to.
        parent_n: parent node id (-1 for roots).
        token_n: token that led into the node (-1 for roots).
        nt_index_n: non-terminal index ``k`` of each node, -1 for terminal nodes.
        nt_node_k: node id of each non-terminal node.
        level_start: node id where each depth starts (length ``horizon + 2``).
        nt_level_start: non-terminal index where each depth starts (length ``horizon + 2``).
        leaf_ids: node ids of the terminal nodes, i.e. of the complete responses.
    """

    num_prompts: int
    vocab_size: int
    horizon: int
    eos_token: int | None
    depth_n: torch.Tensor
    prompt_n: torch.Tensor
    parent_n: torch.Tensor
    token_n: torch.Tensor
    nt_index_n: torch.Tensor
    nt_node_k: torch.Tensor
    level_start: list[int]
    nt_level_start: list[int]
    leaf_ids: torch.Tensor
    _paths: tuple | None = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return int(self.depth_n.numel())

    @property
    def num_nonterminal(self) -> int:
        return int(self.nt_node_k.numel())

    @property
    def num_leaves(self) -> int:
        return int(self.leaf_ids.numel())

    @classmethod
    def build(cls, num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None,
              max_nodes: int = DEFAULT_MAX_NODES) -> "TokenTree":
        """Build the tree level by level (vectorised per depth), after the size guard."""
        check_tree_size(num_prompts, vocab_size, horizon, eos_token, max_nodes)
        counts = count_nodes(num_prompts, vocab_size, horizon, eos_token)
        depth_parts, prompt_parts, parent_parts, token_parts, nt_parts = [], [], [], [], []
        level_start, nt_level_start = [0], [0]
        # level 0: the roots, all non-terminal because horizon >= 1
        ids = torch.arange(num_prompts)
        depth_parts.append(torch.zeros(num_prompts, dtype=torch.long))
        prompt_parts.append(ids.clone())
        parent_parts.append(torch.full((num_prompts,), -1, dtype=torch.long))
        token_parts.append(torch.full((num_prompts,), -1, dtype=torch.long))
        level_nt_nodes = ids
        level_nt_prompts = ids
        nt_parts.append(ids)
        next_id = num_prompts
        nt_count = num_prompts
        for depth in range(1, horizon + 1):
            level_start.append(next_id)
            nt_level_start.append(nt_count)
            n_parent = level_nt_nodes.numel()
            n_level = n_parent * vocab_size
            assert n_level == counts[depth]
            tokens = torch.arange(vocab_size).repeat(n_parent)
            parents = level_nt_nodes.repeat_interleave(vocab_size)
            prompts = level_nt_prompts.repeat_interleave(vocab_size)
            depth_parts.append(torch.full((n_level,), depth, dtype=torch.long))
            prompt_parts.append(prompts)
            parent_parts.append(parents)
            token_parts.append(tokens)
            node_ids = torch.arange(next_id, next_id + n_level)
            if depth < horizon:
                nt_mask = tokens != eos_token if eos_token is not None else torch.ones(n_level, dtype=torch.bool)
            else:
                nt_mask = torch.zeros(n_level, dtype=torch.bool)
            level_nt_nodes = node_ids[nt_mask]
            level_nt_prompts = prompts[nt_mask]
            nt_parts.append(level_nt_nodes)
            nt_count += int(level_nt_nodes.numel())
            next_id += n_level
        level_start.append(next_id)
        nt_level_start.append(nt_count)
        nt_node_k = torch.cat(nt_parts)
        nt_index_n = torch.full((next_id,), -1, dtype=torch.long)
        nt_index_n[nt_node_k] = torch.arange(nt_node_k.numel())
        leaf_ids = torch.nonzero(nt_index_n < 0).flatten()
        return cls(num_prompts, vocab_size, horizon, eos_token,
                   torch.cat(depth_parts), torch.cat(prompt_parts), torch.cat(parent_parts),
                   torch.cat(token_parts), nt_index_n, nt_node_k, level_start, nt_level_start, leaf_ids)

    # ------------------------------------------------------------------ navigation
    def child(self, node: int | torch.Tensor, token: int | torch.Tensor):
        """Node id reached from non-terminal ``node`` by ``token`` (vectorised)."""
        k = self.nt_index_n[node]
        if isinstance(k, torch.Tensor) and k.dim() == 0:
            if int(k) < 0:
                raise ValueError(f"node {int(node)} is terminal and has no children")
        return self.num_prompts + k * self.vocab_size + token

    def node_id(self, prompt: int, prefix: list[int] | tuple[int, ...]) -> int:
        """Node id of ``(prompt, prefix)``; ``ValueError`` if the prefix is not in the tree."""
        if not 0 <= prompt < self.num_prompts:
            raise ValueError(f"prompt must be in [0, {self.num_prompts - 1}], got {prompt}")
        node = prompt
        for pos, tok in enumerate(prefix):
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"prefix token at position {pos} must be in [0, {self.vocab_size - 1}], "
                                 f"got {tok}")
            k = int(self.nt_index_n[node])
            if k < 0:
                raise ValueError(f"prefix {list(prefix)} of prompt {prompt} continues past a terminal "
                                 f"state at position {pos} (horizon {self.horizon}, eos_token "
                                 f"{self.eos_token})")
            node = self.num_prompts + k * self.vocab_size + tok
        return node

    def prefix(self, node: int) -> tuple[int, list[int]]:
        """``(prompt, prefix tokens)`` of a node id (the inverse of :meth:`node_id`)."""
        if not 0 <= int(node) < self.num_nodes:
            raise ValueError(f"node id must be in [0, {self.num_nodes - 1}], got {int(node)}")
        toks = []
        n = int(node)
        while self.parent_n[n] >= 0:
            toks.append(int(self.token_n[n]))
            n = int(self.parent_n[n])
        return int(self.prompt_n[node]), toks[::-1]

    def level_nt(self, depth: int) -> slice:
        """Slice of non-terminal indices at ``depth``."""
        return slice(self.nt_level_start[depth], self.nt_level_start[depth + 1])

    def nt_children(self, depth: int) -> slice:
        """Slice of node ids of the children of the non-terminals at ``depth`` (reshapes to [n, V])."""
        s = self.level_nt(depth)
        return slice(self.num_prompts + s.start * self.vocab_size, self.num_prompts + s.stop * self.vocab_size)

    def leaf_paths(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every leaf: non-terminal indices ``[L, H]`` and tokens ``[L, H]`` along its path
        (padded with -1), and its length ``[L]``. Computed once and cached."""
        if self._paths is None:
            leaves = self.leaf_ids
            lengths = self.depth_n[leaves]
            nt_path = torch.full((leaves.numel(), self.horizon), -1, dtype=torch.long)
            tok_path = torch.full((leaves.numel(), self.horizon), -1, dtype=torch.long)
            cur = leaves.clone()
            for step in range(self.horizon):
                active = self.parent_n[cur] >= 0
                if not bool(active.any()):
                    break
                pos = lengths - 1 - step
                rows = torch.nonzero(active).flatten()
                parent = self.parent_n[cur[rows]]
                nt_path[rows, pos[rows]] = self.nt_index_n[parent]
                tok_path[rows, pos[rows]] = self.token_n[cur[rows]]
                cur[rows] = parent
            self._paths = (nt_path, tok_path, lengths)
        return self._paths
