"""A PPO policy loss with a truncated importance-sampling correction, in verl's policy-loss form
(a reimplementation for tpg's loss plug-in loader).

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_log_probs) -> loss

``old_log_prob`` is the trainer's recomputed ``log pi_old`` (tpg: pass ``old=pi``), ``rollout_log_probs``
the inference engine's ``log mu``. Per token ``r = exp(log_prob - old_log_prob)``,
``l = max(-A r, -A clip(r, 1 - eps, 1 + eps))`` times the detached weight ``min(exp(old - rollout), C)``,
aggregated by ``loss_agg_mode``. With ``C`` above every ratio it is token-level IS; ``tis_cap=inf``
turns the cap off.

    tpg verify --mdp dense:vocab=3,horizon=3,eos=0,prompts=2 --estimator grpo --group-size 3 \\
        --behaviour top_p:0.9 --loss examples/plugins/ppo_tis_loss_verl.py:compute_policy_loss:old=pi,tis_cap=2
"""

import torch


def agg_loss(loss_mat, loss_mask, loss_agg_mode):
    """verl's aggregation modes over one batch ``[B, L]``."""
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum":
        return (loss_mat * loss_mask).sum(-1).mean()
    if loss_agg_mode == "seq-mean-token-mean":
        return ((loss_mat * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1)).mean()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return (loss_mat * loss_mask).sum(-1).mean() / loss_mask.shape[-1]
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum()
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                        rollout_log_probs=None):
    """PPO clip with a truncated IS weight ``min(pi_old / mu, C)`` (``config.tis_cap``, default 2)."""
    eps = float(config.clip_ratio)
    cap = float(config.get("tis_cap", 2.0))
    ratio = torch.exp(log_prob - old_log_prob)
    losses = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - eps, 1 + eps))
    if rollout_log_probs is not None:
        weight = torch.exp(old_log_prob - rollout_log_probs).detach().clamp(max=cap)
        losses = losses * weight
    return agg_loss(losses, response_mask, loss_agg_mode), torch.zeros(())
