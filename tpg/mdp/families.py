"""Seeded reward families and generated MDPs (``--mdp FAMILY:key=value,...``).

Families (each from a seed):

* ``dense``: Gaussian reward ``N(0, 1)`` on every token (the Zero-Reward Assumption is false);
* ``terminal``: ``N(0, 1)`` only on each response's last token (ZRA holds);
* ``sparse``: reward 1 on a few tokens, each (prefix, token) independently with probability ``p``;
* ``first_token``: binary terminal reward ``good[x, w_1]``, decided by the first token (hard
  credit assignment: the reward arrives at the end, the decision was made at the start);
* ``length``: a per-token cost ``-cost`` plus a ``N(0, 1)`` terminal reward.

With ``compact=true`` the rewards are a table over (position, previous token, token) and work
past the tree's size guard (``first_token`` has no compact form).
"""

from __future__ import annotations

import torch

from .._guards import check_fits, check_seed
from .mdp import TokenMDP, validate_shape
from .rewards import CompactRewards, Rewards, TreeRewards
# the spec grammar lives in the torch-free .specs (a mistyped --mdp is refused before torch loads)
from .specs import DEFAULT_MAX_NODES, FAMILIES, _check_family, parse_mdp_spec, spec_help, spec_items  # noqa: F401
from .tree import TokenTree


def tree_rewards(family: str, tree, seed: int, p: float = 0.2, cost: float = 0.1) -> TreeRewards:
    """Rewards of ``family`` on every (prompt, prefix, token) of ``tree``."""
    _check_family(family)
    gen = torch.Generator().manual_seed(int(seed))
    n = tree.num_nodes
    nonroot = torch.arange(n) >= tree.num_prompts
    is_last = (tree.nt_index_n < 0) & nonroot
    if family == "dense":
        values = torch.randn(n, generator=gen, dtype=torch.float64)
    elif family == "terminal":
        values = torch.randn(n, generator=gen, dtype=torch.float64) * is_last
    elif family == "sparse":
        values = (torch.rand(n, generator=gen, dtype=torch.float64) < p).to(torch.float64)
    elif family == "first_token":
        good = (torch.rand(tree.num_prompts, tree.vocab_size, generator=gen) < 0.5).to(torch.float64)
        first = torch.full((n,), -1, dtype=torch.long)
        first[tree.level_start[1]:tree.level_start[2]] = tree.token_n[tree.level_start[1]:tree.level_start[2]]
        for depth in range(2, tree.horizon + 1):
            lvl = slice(tree.level_start[depth], tree.level_start[depth + 1])
            first[lvl] = first[tree.parent_n[lvl]]
        values = torch.zeros(n, dtype=torch.float64)
        values[is_last] = good[tree.prompt_n[is_last], first[is_last]]
    else:  # length
        values = torch.randn(n, generator=gen, dtype=torch.float64) * is_last - cost
    values[~nonroot] = 0.0
    return TreeRewards(values)


def compact_rewards(family: str, num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None,
                    seed: int, p: float = 0.2, cost: float = 0.1) -> CompactRewards:
    """Rewards of ``family`` as a ``[H, V + P, V]`` table over (position, previous token, token)."""
    _check_family(family)
    if family == "first_token":
        raise ValueError("reward family 'first_token' has no compact form (its reward depends on the "
                         "first token, not on (position, previous token, token)); use compact=false")
    # the table and its float64 draws: ~17 bytes per entry (8 for the table, 8 for the draw, 1 for the mask)
    check_fits(17.0 * horizon * (vocab_size + num_prompts) * vocab_size, f"horizon={horizon}",
               f"the compact reward table of horizon x (vocab_size + prompts) x vocab_size = {horizon} x "
               f"{vocab_size + num_prompts} x {vocab_size} entries", "lower horizon")
    gen = torch.Generator().manual_seed(int(seed))
    shape = (horizon, vocab_size + num_prompts, vocab_size)
    last = torch.zeros(shape, dtype=torch.bool)
    last[horizon - 1] = True
    if eos_token is not None:
        last[:, :, eos_token] = True
    if family == "dense":
        table = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif family == "terminal":
        table = torch.randn(shape, generator=gen, dtype=torch.float64) * last
    elif family == "sparse":
        table = (torch.rand(shape, generator=gen, dtype=torch.float64) < p).to(torch.float64)
    else:  # length
        table = torch.randn(shape, generator=gen, dtype=torch.float64) * last - cost
    return CompactRewards(table)


def make_mdp(family: str = "dense", vocab: int = 3, horizon: int = 3, eos: int | None = None, prompts: int = 1,
             weights: str = "uniform", gamma: float = 1.0, seed: int = 0, compact: bool = False, p: float = 0.2,
             cost: float = 0.1, twin: bool = False, max_nodes: int = DEFAULT_MAX_NODES, **_policy) -> TokenMDP:
    """A seeded MDP of a reward family (see the module docstring). Policy keys are ignored."""
    _check_family(family)
    check_seed(seed, "seed")
    if not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"prompts must be an integer >= 1, got {prompts!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (sparse reward probability) must be in [0, 1], got {p!r}")
    if weights not in ("uniform", "random"):
        raise ValueError(f"weights must be 'uniform' or 'random', got {weights!r}")
    if weights == "random":
        gen = torch.Generator().manual_seed(int(seed) + 7)
        w = torch.rand(prompts, generator=gen, dtype=torch.float64) + 0.1
        rho = w / w.sum()
    else:
        rho = torch.full((prompts,), 1.0 / prompts, dtype=torch.float64)
    validate_shape(vocab, horizon, eos, gamma, rho)
    name = f"{family}:V={vocab},H={horizon},eos={eos},P={prompts},gamma={gamma:g},seed={seed}"
    if compact:
        rewards: Rewards = compact_rewards(family, prompts, vocab, horizon, eos, seed, p=p, cost=cost)
        mdp = TokenMDP(vocab, horizon, rho, rewards, eos, gamma, max_nodes, name=name)
    else:
        tree = TokenTree.build(prompts, vocab, horizon, eos, max_nodes)  # the size guard speaks first
        rewards = tree_rewards(family, tree, seed, p=p, cost=cost)
        mdp = TokenMDP(vocab, horizon, rho, rewards, eos, gamma, max_nodes, name=name, tree=tree)
    return mdp.zero_reward_twin() if twin else mdp
