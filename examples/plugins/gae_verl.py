"""GAE from a critic in verl's plug-in form, whitened over the batch (verl) or not.

    fn(token_level_rewards [B, L], values [B, L], response_mask [B, L], gamma, lam) -> (advantages, returns)

Written from the formulas of verl's ``compute_gae_advantage_return`` (no code taken from verl).
``values``, ``gamma`` and ``lam`` are context keywords: tpg passes a critic's ``V(s_t)`` for each
response token (``critic=exact|tabular|zero|noisy`` on the spec, with ``sigma``, ``noise``,
``steps``, ``samples``, ``lr``; the critic fits the return discounted with ``gamma``) and the
``gamma``/``lam`` options (default: this function's defaults).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t)      (V = 0 after the last token),
    A_t     = delta_t + gamma lam A_{t+1},          returns = A + V,

padded positions carry nothing over. ``compute_advantage`` then whitens ``A`` over the batch's
valid tokens (verl's ``masked_whiten``: a batch statistic, so biased, the bias shrinking with the
batch); ``compute_advantage_raw`` does not (tpg's ``ppo_gae``: unbiased with an exact critic or
``lam = 1``)::

    tpg verify --mdp dense:vocab=3,horizon=3,eos=0,prompts=2 --estimator ppo_gae:lambda=0.9 \
        --estimator examples/plugins/gae_verl.py:compute_advantage_raw:lam=0.9,critic=exact
"""

import torch


def _gae(token_level_rewards, values, response_mask, gamma, lam):
    B, L = token_level_rewards.shape
    advantages = torch.zeros_like(token_level_rewards)
    next_value = torch.zeros(B, dtype=token_level_rewards.dtype)
    running = torch.zeros(B, dtype=token_level_rewards.dtype)
    for t in reversed(range(L)):
        m = response_mask[:, t]
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        # on padding keep what comes after: the response has ended there
        next_value = values[:, t] * m + (1 - m) * next_value
        running = step * m + (1 - m) * running
        advantages[:, t] = running
    return advantages * response_mask, (advantages + values) * response_mask


def _masked_whiten(values, mask):
    """verl's masked_whiten with shift_mean=True: N + 1e-8 denominators, Bessel factor N / (N - 1)."""
    n = mask.sum()
    mean = (values * mask).sum() / (n + 1e-8)
    centred = values - mean
    var = (centred ** 2 * mask).sum() / (n + 1e-8)
    var = var * n / (n - 1)
    return centred * torch.rsqrt(var + 1e-8)


def compute_advantage(token_level_rewards, values, response_mask, gamma=1.0, lam=1.0):
    """GAE advantage, verl form: whitened over the batch's valid tokens."""
    advantages, returns = _gae(token_level_rewards, values, response_mask, gamma, lam)
    return _masked_whiten(advantages, response_mask) * response_mask, returns


def compute_advantage_raw(token_level_rewards, values, response_mask, gamma=1.0, lam=1.0):
    """GAE advantage without whitening (tpg's ppo_gae)."""
    return _gae(token_level_rewards, values, response_mask, gamma, lam)
