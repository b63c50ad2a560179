"""How big a response tree is, in O(1) floating point and exact integers, free of torch.

The node counts and the size guard of the stored tree (:class:`~tpg.mdp.tree.TokenTree`, which re-exports
every name here): a spec's ranges are checked before torch is imported (:mod:`.specs`), so the guard must
not need it.
"""

from __future__ import annotations

import math

from .._guards import check_fits

# the default upper bound on the number of stored nodes (about 40 MB per float64 array); its torch-free
# home is .specs, whose help text shows it
from .specs import DEFAULT_MAX_NODES  # noqa: F401


def count_nodes(num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None) -> list[int]:
    """Number of nodes at each depth ``0 .. horizon`` of the response tree (exact integers; O(horizon)
    big-integer work, so call it below the size guard, :func:`check_tree_size`)."""
    counts = [num_prompts]
    nonterminal = num_prompts
    branching_nt = vocab_size - 1 if eos_token is not None else vocab_size
    for depth in range(1, horizon + 1):
        counts.append(nonterminal * vocab_size)
        nonterminal = nonterminal * branching_nt if depth < horizon else 0
    return counts


def log_num_nodes(num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None) -> float:
    """``ln N`` of the tree's node count in O(1) floating point (no big integers)::

        N = P (1 + V S),   S = sum_{d=0}^{H-1} B^d = (B^H - 1) / (B - 1)   (S = H when B = 1),

    ``B`` the non-terminal children of a non-terminal node (``V - 1`` with an EOS token, else ``V``).
    Accurate to a few ulps of ``ln N``: ``log1p`` keeps the small terms."""
    P, V, H = num_prompts, vocab_size, horizon
    B = V - 1 if eos_token is not None else V
    if B == 1:
        log_s = math.log(H)
    else:  # ln((B^H - 1) / (B - 1)) = H ln B + ln(1 - B^-H) - ln(B - 1); B^-H underflows to 0 for large H
        log_s = H * math.log(B) + math.log1p(-math.exp(-H * math.log(B))) - math.log(B - 1)
    log_vs = math.log(V) + log_s
    return math.log(P) + log_vs + math.log1p(math.exp(-log_vs))


def num_tree_nodes(num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None) -> int:
    """The exact node count ``N = P (1 + V S)`` of :func:`log_num_nodes`, from the closed form (one
    big-integer power; use it once :func:`log_num_nodes` says ``N`` is of a sensible size)."""
    B = vocab_size - 1 if eos_token is not None else vocab_size
    S = horizon if B == 1 else (B ** horizon - 1) // (B - 1)
    return num_prompts * (1 + vocab_size * S)


def describe_count(log_n: float, exact: int | None = None) -> str:
    """A node count for messages: exact with thousands separators below ``10^30``, else ``about 10^k``."""
    if exact is not None and log_n < 30 * math.log(10):
        return f"{exact:,}"
    return f"about 10^{log_n / math.log(10):,.1f}"


def max_fitting_horizon(num_prompts: int, vocab_size: int, eos_token: int | None, max_nodes: int) -> int:
    """The largest horizon whose tree has at most ``max_nodes`` nodes (0 when not even horizon 1
    fits); O(log max_nodes) steps of exact arithmetic on numbers below ``max_nodes``."""
    B = vocab_size - 1 if eos_token is not None else vocab_size
    if B == 1:  # N = P (1 + V H)
        return max(0, (max_nodes // num_prompts - 1) // vocab_size) if max_nodes >= num_prompts else 0
    H = 0
    while num_tree_nodes(num_prompts, vocab_size, H + 1, eos_token) <= max_nodes:
        H += 1
    return H


#: Bytes the stored tree and an exact solve hold per node, at least: five int64 index arrays
#: (depth, prompt, parent, token, non-terminal index) and three float64 arrays (rewards, reach
#: probabilities, values).
TREE_BYTES_PER_NODE = 64


def check_tree_size(num_prompts: int, vocab_size: int, horizon: int, eos_token: int | None,
                    max_nodes: int) -> int:
    """Return the node count, or raise ``ValueError`` when it exceeds ``max_nodes`` (or when the
    tree could not fit in this machine's memory at all).

    O(1) whatever the horizon: ``ln N`` (:func:`log_num_nodes`) is compared with ``ln max_nodes``
    first, and the exact count is computed only when the two are close, so ``horizon=10**12`` is
    refused in microseconds."""
    log_total = log_num_nodes(num_prompts, vocab_size, horizon, eos_token)
    total = None
    if log_total <= math.log(max(max_nodes, 1)) + 1e-6:  # near or below the guard: count exactly
        total = num_tree_nodes(num_prompts, vocab_size, horizon, eos_token)
        if total <= max_nodes:
            check_fits(total * float(TREE_BYTES_PER_NODE), "max_nodes",
                       f"the response tree of {total:,} nodes (horizon={horizon}, vocab_size={vocab_size})",
                       "lower max_nodes, horizon or vocab_size")
            return total
    fits = max_fitting_horizon(num_prompts, vocab_size, eos_token, max_nodes)
    allowed = (f"at most horizon={fits} fits" if fits >= 1 else
               "not even horizon=1 fits: lower prompts or vocab_size")
    raise ValueError(
        f"horizon={horizon}: the response tree has {describe_count(log_total, total)} nodes (prompts={num_prompts}, "
        f"vocab_size={vocab_size}, horizon={horizon}, eos_token={eos_token}), above max_nodes={max_nodes:,} "
        f"({allowed}): the exact engine needs the stored tree; lower horizon or vocab_size, or raise max_nodes"
        + (f" (allowed: max_nodes >= {total:,})" if total is not None else ""))


__all__ = ["count_nodes", "log_num_nodes", "num_tree_nodes", "describe_count", "max_fitting_horizon",
           "TREE_BYTES_PER_NODE", "check_tree_size", "DEFAULT_MAX_NODES"]
