"""PPO with GAE (Schulman et al. 2016, 2017) and the clipped surrogate loss.

tpg checks PPO at its first on-policy step, ratio 1, where the clipped surrogate's gradient is
``sum w A grad log pi`` (:func:`ppo_clip_loss`); the estimator itself returns the GAE advantages.
"""

from __future__ import annotations

import torch

from .estimator import Estimator
from .functional import gae_advantages
from .options import CRITIC_OPTIONS, CRITICS, ESTIMATOR_OPTIONS  # noqa: F401  (declared torch-free; re-exported)


class PPOGAE(Estimator):
    """PPO / GAE(gamma, lambda) on ZRA rewards with a critic from the context.

    Advantage: ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)`` on verl's ``token_level_rewards``
    (``R_i`` on the last token; minus ``beta Delta_t`` with ``kl=k1_reward``), ``V = 0`` after the
    last token, ``A_t = sum_l (gamma lambda)^l delta_{t+l}`` (not whitened; verl whitens GAE over
    the batch, a rescaling tpg leaves out so the expectation can be checked).
    ``V`` comes from ``ctx.critic_values(batch, critic, gamma, options) -> [B, H+1]``, the critic's
    estimate of the discounted ZRA return ``E[gamma^(T-t) RM | s_t]``:

    * ``critic=exact`` — the true value; ``critic=zero`` — ``V = 0`` (computed here, the context
      is not asked); ``critic=tabular`` — a table fitted by the context (``steps`` rounds of
      ``samples`` sampled responses, step size ``lr``; the defaults are the verifier's);
    * ``critic=noisy`` — exact plus noise of std ``sigma``: ``noise=fixed`` a seeded per-state
      perturbation (a wrong but fixed critic), ``noise=fresh`` new zero-mean noise at every call
      (its expectation is the exact critic's; in exact mode the context returns the exact values).

    ``options`` passed to the context are this estimator's options (``kl``/``beta`` included,
    for a context that fits the critic to the penalised return).
    Expected gradient (first step, ratio 1): with ``gamma = 1`` (ZRA), ``grad J`` iff the critic
    is exact (any ``lambda``) or ``lambda = 1`` (any critic that does not depend on the sampled
    action); ``gamma < 1`` on ZRA rewards is biased (docs/THEORY.md section 2.4, Eq. 26). Customary aggregation:
    ``token-mean`` (verl's default).
    """

    name = "ppo_gae"
    customary_agg = "token-mean"
    OPTIONS = ESTIMATOR_OPTIONS["ppo_gae"]

    def compute(self, batch, ctx, penalty_bt):
        B, H = batch.mask.shape
        dt = batch.rm.dtype
        gamma, lam = self.options["gamma"], self.options["lambda"]
        kind = self.options["critic"]
        if kind == "zero":
            values = torch.zeros(B, H + 1, dtype=dt)
        else:
            hook = self._need_ctx(ctx, "critic_values")
            values = torch.as_tensor(hook(batch, kind, gamma, dict(self.options)))
            if values.shape != (B, H + 1):
                raise ValueError(f"{self.name}: ctx.critic_values must return shape [B, H+1] = [{B}, {H + 1}], "
                                 f"got {list(values.shape)}")
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{self.name}: ctx.critic_values returned non-finite values")
            values = values.to(dt)
        adv = gae_advantages(self.token_rewards(batch, penalty_bt), values, batch.mask, gamma, lam)
        return adv, 0, {}


def ppo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                  weights: torch.Tensor, clip_eps: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate loss, aggregated with per-token weights (0 on padding):

        L = - sum_{b,t} w * min(rho A, clip(rho, 1 - eps, 1 + eps) A),   rho = exp(logp_new - logp_old).

    At ``logp_new == logp_old`` its gradient is ``- sum w A grad logp_new``, the estimator's
    ``g`` with the sign of a loss."""
    if not (logp_new.shape == logp_old.shape == advantages.shape == weights.shape):
        raise ValueError(f"ppo_clip_loss: shapes differ: logp_new {list(logp_new.shape)}, logp_old "
                         f"{list(logp_old.shape)}, advantages {list(advantages.shape)}, weights {list(weights.shape)}")
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    ratio = torch.exp(logp_new - logp_old.detach())
    adv = advantages.detach()
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    return -(weights.detach() * surrogate).sum()


__all__ = ["PPOGAE", "ppo_clip_loss", "CRITICS", "CRITIC_OPTIONS"]
