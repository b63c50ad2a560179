"""Input guards that cost O(1): seeds, and allocations that cannot fit in memory.

Every guard runs before the work it protects and uses floating-point logarithms or byte
estimates, never the big integers or the tensors themselves, so a horizon of ``10**12`` or a
group size of ``10**12`` is refused in microseconds with the field named, instead of hanging in
an exact node count or failing inside the allocator. Nothing here imports the rest of tpg (the
lowest layer: ``mdp``, ``rollouts``, ``verify`` and ``train`` all use it).
"""

from __future__ import annotations

import math
import numbers
import os

#: Largest seed accepted anywhere (``seed=`` of ``--mdp``/``--task`` specs, ``--seed`` of
#: ``verify``/``train``): seeds are integers in ``[0, 2**32 - 1]``, numpy's range. tpg derives
#: further seeds from a user's seed (``seed + 1000`` for a policy, ``seed * 7919 + 17`` for the Monte
#: Carlo directions); below ``2**32`` all of them stay inside ``torch.Generator.manual_seed``'s
#: 64-bit range.
MAX_SEED = 2**32 - 1


def check_seed(value, field: str) -> int:
    """``int(value)`` when it is an integer (numpy integers included) in ``[0, MAX_SEED]``; else
    ``ValueError`` naming ``field`` and the allowed range (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{field} must be an integer in [0, {MAX_SEED}] (0 to 2^32 - 1), got {value!r}")
    value = int(value)
    if not 0 <= value <= MAX_SEED:
        shown = f"{value}" if abs(value) < 10**30 else f"{'-' if value < 0 else ''}~10^{math.log10(abs(value)):.0f}"
        raise ValueError(f"{field} must be an integer in [0, {MAX_SEED}] (0 to 2^32 - 1), got {shown}")
    return value


def memory_budget_bytes() -> int:
    """The machine's physical memory in bytes (``SC_PHYS_PAGES * SC_PAGE_SIZE``); ``2**40`` (1 TiB)
    where the platform does not say. The guards refuse only what cannot fit in it at all: an
    allocation below the budget may still be too slow or fail under other processes' load."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX platforms
        return 2**40
    if pages <= 0 or size <= 0:  # pragma: no cover
        return 2**40
    return int(pages) * int(size)


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in human units (B, kB, MB, GB, TB, PB, then powers of ten), from a float."""
    if not math.isfinite(nbytes):
        return "an unbounded number of bytes"
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            if nbytes >= 1e3 * 1e15:
                return f"about 10^{math.log10(nbytes):.1f} bytes"
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def check_fits(nbytes: float, field: str, what: str, hint: str = "", budget: int | None = None) -> None:
    """``ValueError`` naming ``field`` when an estimated ``nbytes`` (a float: estimates of absurd
    sizes overflow no integer) exceed the memory budget (:func:`memory_budget_bytes`).

    ``what`` says what would be allocated ("one batch of 10^12 responses x 3 positions"), ``hint``
    what to change. The message is one line."""
    limit = memory_budget_bytes() if budget is None else budget
    if not nbytes <= limit:  # also refuses NaN
        raise ValueError(f"{field}: {what} needs at least {format_bytes(nbytes)}, more than this machine's "
                         f"{format_bytes(limit)} of memory" + (f"; {hint}" if hint else ""))


__all__ = ["MAX_SEED", "check_seed", "memory_budget_bytes", "format_bytes", "check_fits"]
