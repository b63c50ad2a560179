"""REINFORCE++ in verl's plug-in form: discounted returns, whitened over the whole batch.

    fn(token_level_rewards [B, L], response_mask [B, L], gamma) -> (advantages, returns)

Written from the formulas of verl's ``compute_reinforce_plus_plus_outcome_advantage`` (no code
taken from verl). It does not take ``index``: the whitening runs over every valid token of the
batch, whatever prompt each response answers:

    G_t = r_t + gamma G_{t+1}   (within a response; 0 after its end),
    A   = (G - mean) * rsqrt(var + 1e-8),   mean = sum G / (N + 1e-8),
          var = [sum (G - mean)^2 / (N + 1e-8)] * N / (N - 1),

with ``N`` the batch's valid tokens and the sums over them (verl's ``masked_whiten``); ``A`` is
zeroed on padding. Verify it as verl runs it, ``P`` prompts of ``N`` responses per batch::

    tpg verify --mdp dense:vocab=3,horizon=3,eos=0,prompts=3 \
        --estimator examples/plugins/reinforce_pp_verl.py:compute_advantage:layout=batch:2x2

With ``layout=independent`` it sees what tpg's built-in ``reinforce_pp`` sees (``G`` independent
prompt-response pairs) and gets its numbers.
"""

import torch


def _masked_whiten(values, mask):
    """verl's masked_whiten with shift_mean=True: N + 1e-8 denominators, Bessel factor N / (N - 1)."""
    n = mask.sum()
    mean = (values * mask).sum() / (n + 1e-8)
    centred = values - mean
    var = (centred ** 2 * mask).sum() / (n + 1e-8)
    var = var * n / (n - 1)
    return centred * torch.rsqrt(var + 1e-8)


def compute_advantage(token_level_rewards, response_mask, gamma=1.0):
    """REINFORCE++ outcome advantage, verl form: whitened discounted returns over the batch (no index)."""
    B, L = token_level_rewards.shape
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros(B, dtype=token_level_rewards.dtype)
    for t in reversed(range(L)):
        running = token_level_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * response_mask[:, t]  # a new response starts before its last token
    advantages = _masked_whiten(returns, response_mask) * response_mask
    return advantages, returns
