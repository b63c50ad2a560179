"""ReMax in verl's plug-in form: the greedy response's reward as the baseline.

    fn(token_level_rewards [B, L], reward_baselines [B], response_mask [B, L]) -> (advantages, returns)

Written from the formulas of verl's ``compute_remax_outcome_advantage`` (no code taken from
verl). ``reward_baselines`` is a context keyword: tpg passes ``RM`` of the greedy (argmax)
response to each row's prompt, and counts its tokens as spent.

    G_t = sum_{k >= t} r_k   (undiscounted reward-to-go within the response),
    A_t = G_t - b(x)         on valid tokens, 0 on padding.

The baseline depends on the prompt only, so the expected gradient is grad J::

    tpg verify --mdp dense:vocab=3,horizon=3,eos=0,prompts=2 \
        --estimator examples/plugins/remax_verl.py:compute_advantage --estimator remax
"""

import torch


def compute_advantage(token_level_rewards, reward_baselines, response_mask):
    """ReMax outcome advantage, verl form: reward-to-go minus the greedy response's reward."""
    masked = token_level_rewards * response_mask
    returns = torch.flip(torch.cumsum(torch.flip(masked, [-1]), -1), [-1])
    advantages = (returns - reward_baselines.unsqueeze(-1)) * response_mask
    return advantages, returns
