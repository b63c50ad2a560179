"""REINFORCE++ (Hu 2025, arXiv 2501.03262) and REINFORCE++-baseline: batch-whitened advantages.

Whitening is verl's ``masked_whiten`` over all valid tokens of a batch id, exactly
(:func:`~.functional.whiten_by_batch`): ``(x - mean) * rsqrt(var + 1e-8)``, mean and variance
with verl's ``N + 1e-8`` denominators, the variance Bessel-corrected.
"""

from __future__ import annotations

from .estimator import Estimator
from .functional import dense_ids, discounted_returns, grpo_advantages, whiten_by_batch
from .options import ESTIMATOR_OPTIONS


class ReinforcePP(Estimator):
    """REINFORCE++: whitened reward-to-go of the ZRA rewards (with the KL penalty, if any).

    Advantage: ``G_{i,t} = sum_{k >= t} gamma^(k-t) r'_k`` with ``r'`` verl's ``token_level_rewards``
    (``R_i`` on the last token) minus ``beta Delta_k`` when ``kl=k1_reward``; then
    ``A = whiten(G)`` over the tokens of the batch id. ``gamma`` is the method's own discount
    (verl's ``algorithm.gamma``, default 1), not the MDP's.
    Expected gradient: biased (the batch mean and std depend on the response itself; the bias
    shrinks as the batch grows, and the std rescales the step). Customary aggregation:
    ``token-mean``.
    """

    name = "reinforce_pp"
    batch_coupled = True
    customary_agg = "token-mean"
    OPTIONS = ESTIMATOR_OPTIONS["reinforce_pp"]

    def compute(self, batch, ctx, penalty_bt):
        G = discounted_returns(self.token_rewards(batch, penalty_bt), batch.mask, self.options["gamma"])
        return whiten_by_batch(G, batch.mask, batch.batch), 0, {}


class ReinforcePPBaseline(Estimator):
    """REINFORCE++-baseline: subtract the group mean, then whiten over the batch.

    Advantage: ``A_{i,t} = whiten(R_i - mean_g R)`` over the tokens of the batch id (a group of
    one keeps ``R_i`` before whitening, as in verl).
    Expected gradient: biased (batch whitening; the group mean also scales by ``1 - 1/G``).
    Customary aggregation: ``token-mean``.
    """

    name = "reinforce_pp_baseline"
    needs_groups = True
    batch_coupled = True
    customary_agg = "token-mean"

    def compute(self, batch, ctx, penalty_bt):
        ids, _ = dense_ids(batch.batch, batch.group)
        centred = grpo_advantages(self.outcome_rewards(batch, penalty_bt), ids, std_norm=False)
        tiled = centred.unsqueeze(1) * batch.mask.to(centred.dtype)
        return whiten_by_batch(tiled, batch.mask, batch.batch), 0, {}


__all__ = ["ReinforcePP", "ReinforcePPBaseline"]
