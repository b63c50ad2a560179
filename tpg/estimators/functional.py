"""Pure, vectorised building blocks of the estimators: group and batch statistics, discounted
returns, GAE, whitening.

Every function maps tensors to tensors, has no state, and works on a whole stacked batch at
once: group statistics are taken per group id (``ids_b``, dense ``0 .. n-1``, from
:func:`dense_ids`) with ``index_add``/``bincount``, batch statistics per batch id, so stacking
independent batches gives the same numbers as processing them one at a time.

Conventions follow verl's ``core_algos`` (formulas only): group std with Bessel's correction;
a group of one response has mean 0 and std 1 (its advantage is its own reward); whitening is
verl's ``masked_whiten`` over the batch's tokens, ``(x - mean) * rsqrt(var + 1e-8)`` with verl's
``N + 1e-8`` denominators and the Bessel factor ``N / (N - 1)`` (:func:`whiten_by_batch`).
"""

from __future__ import annotations

import torch

#: verl's ``masked_whiten``: ``rsqrt(var + 1e-8)``.
WHITEN_EPS = 1e-8
#: verl's ``masked_mean``: ``sum(x * mask) / (mask.sum() + 1e-8)``.
MASKED_MEAN_EPS = 1e-8


def dense_ids(*keys_b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense ids ``0 .. n-1`` of the distinct tuples ``(keys_b[0][i], keys_b[1][i], ...)``, ``[B]``,
    and ``n``. ``dense_ids(batch_b, group_b)`` numbers the groups of a stacked batch."""
    if not keys_b:
        raise ValueError("dense_ids needs at least one key")
    B = keys_b[0].numel()
    if B == 0:
        return torch.zeros(0, dtype=torch.long), 0
    # mixed-radix 1-D key: a 1-D unique is a plain sort, many times faster than unique(dim=0)
    key = torch.zeros(B, dtype=torch.long)
    span = 1
    for k in keys_b:
        k = k.reshape(-1).to(torch.long)
        k = k - k.min()
        radix = int(k.max()) + 1
        span *= radix
        if span >= 2 ** 62:  # the key would overflow: fall back to row-wise unique
            stacked = torch.stack([x.reshape(-1).to(torch.long) for x in keys_b], 1)
            _, inv = torch.unique(stacked, dim=0, return_inverse=True)
            return inv, int(inv.max()) + 1
        key = key * radix + k
    _, inv = torch.unique(key, return_inverse=True)
    return inv, int(inv.max()) + 1


def segment_sum(x_b: torch.Tensor, ids_b: torch.Tensor, n: int) -> torch.Tensor:
    """``sum_{i: ids_i = g} x_i`` for each id ``g``, ``[n]``."""
    return torch.zeros(n, dtype=x_b.dtype).index_add_(0, ids_b, x_b)


def group_counts(ids_b: torch.Tensor, n: int) -> torch.Tensor:
    """Responses per group, ``[n]`` (long)."""
    return torch.bincount(ids_b, minlength=n)


def group_mean(rewards_b: torch.Tensor, ids_b: torch.Tensor, singleton_zero: bool = True) -> torch.Tensor:
    """Each response's group mean ``mean_{j in g(i)} R_j``, ``[B]``; 0 for a group of one
    (verl's convention) when ``singleton_zero``."""
    n = int(ids_b.max()) + 1 if ids_b.numel() else 0
    cnt = group_counts(ids_b, n).to(rewards_b.dtype)
    mean_g = segment_sum(rewards_b, ids_b, n) / cnt.clamp(min=1)
    if singleton_zero:
        mean_g = torch.where(cnt > 1, mean_g, torch.zeros_like(mean_g))
    return mean_g[ids_b]


def group_std(rewards_b: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """Each response's group std with Bessel's correction, ``sqrt(sum_j (R_j - mean)^2 / (G - 1))``,
    ``[B]``; 1 for a group of one (verl's convention)."""
    n = int(ids_b.max()) + 1 if ids_b.numel() else 0
    cnt = group_counts(ids_b, n).to(rewards_b.dtype)
    mean_g = segment_sum(rewards_b, ids_b, n) / cnt.clamp(min=1)
    ss_g = segment_sum((rewards_b - mean_g[ids_b]) ** 2, ids_b, n)
    std_g = torch.sqrt(ss_g / (cnt - 1).clamp(min=1))
    std_g = torch.where(cnt > 1, std_g, torch.ones_like(std_g))
    return std_g[ids_b]


def grpo_advantages(rewards_b: torch.Tensor, ids_b: torch.Tensor, std_norm: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` (``std_norm``) or ``R_i - mean_g R``, ``[B]``.

    A group of one keeps its reward: ``R_i / (1 + eps)`` or ``R_i`` (verl: mean 0, std 1)."""
    centred = rewards_b - group_mean(rewards_b, ids_b)
    if not std_norm:
        return centred
    return centred / (group_std(rewards_b, ids_b) + eps)


def rloo_advantages(rewards_b: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """RLOO: ``A_i = R_i - mean_{j != i} R_j = G / (G - 1) (R_i - mean_g R)``, ``[B]``; a group of
    one keeps its reward (verl)."""
    n = int(ids_b.max()) + 1 if ids_b.numel() else 0
    cnt = group_counts(ids_b, n).to(rewards_b.dtype)[ids_b]
    mean = segment_sum(rewards_b, ids_b, n)[ids_b] / cnt
    loo = (rewards_b - mean) * cnt / (cnt - 1).clamp(min=1)
    return torch.where(cnt > 1, loo, rewards_b)


def opo_advantages(rewards_b: torch.Tensor, lengths_b: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """OPO: ``A_i = R_i - b_g`` with the length-weighted baseline ``b_g = sum_j |o_j| R_j / sum_j |o_j|``,
    ``[B]``; baseline 0 for a group of one (verl)."""
    n = int(ids_b.max()) + 1 if ids_b.numel() else 0
    cnt = group_counts(ids_b, n)
    L = lengths_b.to(rewards_b.dtype)
    b_g = segment_sum(L * rewards_b, ids_b, n) / segment_sum(L, ids_b, n).clamp(min=1)
    b_g = torch.where(cnt > 1, b_g, torch.zeros_like(b_g))
    return rewards_b - b_g[ids_b]


def discount_matrix(horizon: int, discount: float, dtype=torch.float64) -> torch.Tensor:
    """``M[k, t] = discount^(k - t)`` for ``k >= t``, else 0, ``[H, H]``: ``x_bt @ M`` is the
    discounted reverse cumulative sum ``sum_{k >= t} discount^(k-t) x_k``."""
    k = torch.arange(horizon).unsqueeze(1)
    t = torch.arange(horizon).unsqueeze(0)
    expo = (k - t).clamp(min=0).to(dtype)
    return torch.where(k >= t, torch.as_tensor(discount, dtype=dtype) ** expo, torch.zeros((), dtype=dtype))


def discounted_returns(rewards_bt: torch.Tensor, mask_bt: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{k >= t} gamma^(k-t) r_k`` within each response, 0 on padding, ``[B, H]``."""
    m = mask_bt.to(rewards_bt.dtype)
    H = rewards_bt.shape[1]
    return ((rewards_bt * m) @ discount_matrix(H, gamma, rewards_bt.dtype)) * m


def gae_advantages(rewards_bt: torch.Tensor, values_bt1: torch.Tensor, mask_bt: torch.Tensor,
                   gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al. 2016), ``[B, H]``:

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),     A_t = sum_{l >= 0} (gamma lambda)^l delta_{t+l},

    with ``V = 0`` after the last token whatever ``values_bt1 [B, H+1]`` holds there, and
    ``A = 0`` on padding. ``lambda = 1`` gives ``A_t = G_t - V(s_t)`` (Monte Carlo);
    ``lambda = 0`` gives the TD error."""
    B, H = rewards_bt.shape
    if values_bt1.shape != (B, H + 1):
        raise ValueError(f"critic values must have shape [B, H+1] = [{B}, {H + 1}], got {list(values_bt1.shape)}")
    m = mask_bt.to(rewards_bt.dtype)
    v_bt = values_bt1[:, :H].to(rewards_bt.dtype) * m
    v_next = torch.cat([v_bt[:, 1:], torch.zeros(B, 1, dtype=rewards_bt.dtype)], 1)
    delta = (rewards_bt + gamma * v_next - v_bt) * m
    return (delta @ discount_matrix(H, gamma * lam, rewards_bt.dtype)) * m


def whiten_by_batch(values_bt: torch.Tensor, mask_bt: torch.Tensor, batch_b: torch.Tensor,
                    eps: float = WHITEN_EPS) -> torch.Tensor:
    """verl's ``masked_whiten(values, mask)`` (``shift_mean=True``) within each batch id, then
    multiplied by the mask (as verl's REINFORCE++ does), ``[B, H]``.

    With ``N`` the batch id's valid tokens and sums over them, exactly verl's ``masked_mean`` /
    ``masked_var`` / ``masked_whiten``, including their ``N + 1e-8`` denominators:

        mean = sum x / (N + 1e-8),
        var  = [sum (x - mean)^2 / (N + 1e-8)] * N / (N - 1),        (Bessel factor)
        out  = (x - mean) * rsqrt(var + eps)  on valid tokens, 0 on padding.

    The one difference: a batch id with ``N <= 1`` valid tokens gives 0 (verl raises
    ``ValueError`` there: "the sum of the mask is one"; with ``N = 1`` the formula would be
    ``x (1e-8 / (1 + 1e-8)) / sqrt(eps)``, rounding noise scaled by 1e4), so that a batch of one
    single-token response is an all-zero advantage rather than an abort."""
    if values_bt.dim() != 2 or mask_bt.shape != values_bt.shape:
        raise ValueError(f"whiten_by_batch: values and mask must be [B, H] of one shape, got "
                         f"{list(values_bt.shape)} and {list(mask_bt.shape)}")
    if batch_b.shape != values_bt.shape[:1]:
        raise ValueError(f"whiten_by_batch: batch ids must have shape [B] = [{values_bt.shape[0]}], "
                         f"got {list(batch_b.shape)}")
    m = mask_bt.to(values_bt.dtype)
    ids, n = dense_ids(batch_b)
    tokens = segment_sum(m.sum(1), ids, n)
    # verl's masked_mean divides by (mask.sum() + 1e-8) and masked_var is a masked_mean too
    denom = tokens + MASKED_MEAN_EPS
    mean = segment_sum((values_bt * m).sum(1), ids, n) / denom
    centred = values_bt - mean[ids].unsqueeze(1)
    var = segment_sum((centred ** 2 * m).sum(1), ids, n) / denom
    var = var * (tokens / (tokens - 1).clamp(min=1))
    out = centred * torch.rsqrt(var + eps)[ids].unsqueeze(1) * m
    return torch.where((tokens > 1)[ids].unsqueeze(1), out, torch.zeros((), dtype=out.dtype))
