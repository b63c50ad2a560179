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
from .tree import DEFAULT_MAX_NODES, TokenTree

FAMILIES = ("dense", "terminal", "sparse", "first_token", "length")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"reward family must be one of {', '.join(FAMILIES)}; got {family!r}")


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


# ------------------------------------------------------------------------- MDP specs
_SPEC_KEYS = {
    "vocab": "vocabulary size V >= 2 (default 3)",
    "horizon": "max response length H >= 1 (default 3)",
    "eos": "EOS token id in [0, V-1], or 'none' (default none)",
    "prompts": "number of prompts >= 1 (default 1)",
    "weights": "'uniform' or 'random' prompt weights (default uniform)",
    "gamma": "discount in (0, 1] (default 1)",
    "seed": "seed of the rewards, in [0, 2^32 - 1] (default 0); the policy uses seed + 1000 unless policy_seed "
            "is set",
    "policy": "'tabular' or 'shared' (default tabular)",
    "policy_seed": "seed of the random policy logits, in [0, 2^32 - 1]",
    "scale": "standard deviation of the random logits (default 1)",
    "compact": "true to store rewards as a (position, previous token, token) table (default false)",
    "p": "probability of a rewarded token for the sparse family (default 0.2)",
    "cost": "per-token cost of the length family (default 0.1)",
    "twin": "true for the zero-reward twin (same RM, all on the last token) (default false)",
    "max_nodes": f"size guard of the stored tree (default {DEFAULT_MAX_NODES})",
}


def spec_help() -> str:
    """One line per key accepted by :func:`parse_mdp_spec`."""
    return "\n".join(f"  {k}: {v}" for k, v in _SPEC_KEYS.items())


def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--mdp key {key!r} must be true or false, got {text!r}")


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--mdp key {key!r} must be an integer, got {text!r}") from None


def _parse_float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--mdp key {key!r} must be a number, got {text!r}") from None


def spec_items(rest: str, flag: str):
    """The ``key=value`` entries of a spec's option part (after ``NAME:``) as ``(key, value)`` pairs,
    the key stripped, one at a time; ``ValueError`` naming ``flag`` for an entry without ``=``."""
    if not rest.strip():
        return
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{flag} entries must look like key=value, got {item!r}")
        yield key.strip(), value


def parse_mdp_spec(spec: str) -> dict:
    """Parse ``FAMILY:key=value,...`` into the keyword arguments of :func:`make_mdp`."""
    family, _, rest = spec.partition(":")
    family = family.strip()
    _check_family(family)
    out: dict = {"family": family}
    for key, value in spec_items(rest, "--mdp"):
        if key not in _SPEC_KEYS:
            raise ValueError(f"unknown --mdp key {key!r}; allowed keys: {', '.join(_SPEC_KEYS)}")
        if key in out:
            raise ValueError(f"--mdp key {key!r} given twice")
        if key in ("vocab", "horizon", "prompts", "seed", "policy_seed", "max_nodes"):
            out[key] = _parse_int(key, value)
            if key in ("seed", "policy_seed"):
                check_seed(out[key], f"--mdp key {key!r}")
        elif key == "eos":
            out[key] = None if value.strip().lower() in ("none", "null", "") else _parse_int(key, value)
        elif key in ("gamma", "scale", "p", "cost"):
            out[key] = _parse_float(key, value)
        elif key in ("compact", "twin"):
            out[key] = _parse_bool(key, value)
        elif key == "policy":
            if value not in ("tabular", "shared"):
                raise ValueError(f"--mdp key 'policy' must be 'tabular' or 'shared', got {value!r}")
            out[key] = value
        elif key == "weights":
            if value not in ("uniform", "random"):
                raise ValueError(f"--mdp key 'weights' must be 'uniform' or 'random', got {value!r}")
            out[key] = value
    return out


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
