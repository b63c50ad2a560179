"""GRPO's advantage in verl's plug-in form (a reimplementation for tpg's plug-in loader).

    fn(token_level_rewards [B, L], response_mask [B, L], index: np.ndarray [B]) -> (advantages, returns)

Each response's score is the sum of its token-level rewards; within a group (same ``index``)
``A_i = (R_i - mean) / (std + epsilon)`` with the Bessel-corrected std; a group of one has
mean 0 and std 1. The advantage is broadcast over the response's tokens and zero on padding.

    tpg probe examples/plugins/grpo_verl.py:compute_advantage
"""

import numpy as np
import torch


def compute_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """GRPO outcome advantage, verl form (std-normalised unless ``norm_adv_by_std_in_grpo=False``)."""
    scores = token_level_rewards.sum(dim=-1)
    adv = torch.empty_like(scores)
    index = np.asarray(index)
    for gid in np.unique(index):
        rows = torch.as_tensor(np.nonzero(index == gid)[0])
        group = scores[rows]
        if group.numel() == 1:
            mean, std = torch.zeros((), dtype=scores.dtype), torch.ones((), dtype=scores.dtype)
        else:
            mean, std = group.mean(), group.std()
        centred = group - mean
        adv[rows] = centred / (std + epsilon) if norm_adv_by_std_in_grpo else centred
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv
