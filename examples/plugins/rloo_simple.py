"""RLOO's advantage in tpg's simple plug-in form.

    fn(rewards [B], group_ids [B]) -> advantages [B]

``A_i = R_i - mean_{j != i} R_j`` within each group; a group of one keeps its reward.

    tpg probe examples/plugins/rloo_simple.py:advantage
"""

import torch


def advantage(rewards, group_ids):
    """Leave-one-out baseline per group."""
    n = int(group_ids.max()) + 1
    sums = torch.zeros(n, dtype=rewards.dtype).index_add_(0, group_ids, rewards)
    counts = torch.bincount(group_ids, minlength=n).to(rewards.dtype)
    size = counts[group_ids]
    loo_mean = (sums[group_ids] - rewards) / (size - 1).clamp(min=1)
    return torch.where(size > 1, rewards - loo_mean, rewards)
