"""Group estimators: ``G`` responses per prompt draw, a baseline from the group.

Notation: group ``g`` of ``G`` responses to one prompt, ``R_i = RM(W_i)``, ``|o_i| = T_i`` the
length. Statistics are per ``(batch, group)`` pair (:func:`~.functional.dense_ids`). A group of
one response follows verl: mean 0 and std 1, i.e. it keeps its own reward as its advantage
(an unbaselined REINFORCE term).
"""

from __future__ import annotations

from .estimator import Estimator
from .functional import dense_ids, grpo_advantages, opo_advantages, rloo_advantages
from .options import ESTIMATOR_OPTIONS


def _broadcast(adv_b, batch):
    return adv_b.unsqueeze(1).expand_as(batch.logp).clone()


class RLOO(Estimator):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): leave-one-out group baseline.

    Advantage: ``A_{i,t} = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_g R)``.
    Expected gradient: ``grad J`` (the baseline is independent of response ``i``).
    """

    name = "rloo"
    needs_groups = True

    def compute(self, batch, ctx, penalty_bt):
        ids, _ = dense_ids(batch.batch, batch.group)
        return _broadcast(rloo_advantages(self.outcome_rewards(batch, penalty_bt), ids), batch), 0, {}


class GRPO(Estimator):
    """GRPO (Shao et al. 2024): group-normalised reward, as verl and TRL compute it.

    Advantage: ``A_{i,t} = (R_i - mean_g R) / (std_g R + eps)`` with the Bessel-corrected std
    (``std_norm=true``), or ``R_i - mean_g R`` (``std_norm=false``).
    Expected gradient: mean only, ``(1 - 1/G) grad J`` (direction exact: the mean contains
    ``R_i / G``); std-normalised, a biased direction (the std depends on ``R_i``; cosine
    ~0.93-0.97 with ``grad J`` on tiny random MDPs). Customary aggregation: ``seq-mean-token-mean``
    (the original GRPO objective's ``1/|o_i|``).
    """

    name = "grpo"
    needs_groups = True
    customary_agg = "seq-mean-token-mean"
    OPTIONS = ESTIMATOR_OPTIONS["grpo"]

    def compute(self, batch, ctx, penalty_bt):
        ids, _ = dense_ids(batch.batch, batch.group)
        adv = grpo_advantages(self.outcome_rewards(batch, penalty_bt), ids, std_norm=self.options["std_norm"],
                              eps=self.options["eps"])
        return _broadcast(adv, batch), 0, {}


class DrGRPO(Estimator):
    """Dr. GRPO (Liu et al. 2025): GRPO without the std and without the length normalisation.

    Advantage: ``A_{i,t} = R_i - mean_g R``.
    Expected gradient: ``(1 - 1/G) grad J`` (direction exact). Customary aggregation:
    ``seq-mean-token-sum-norm`` (a constant divisor, the maximum length, instead of ``|o_i|``).
    """

    name = "dr_grpo"
    needs_groups = True
    customary_agg = "seq-mean-token-sum-norm"

    def compute(self, batch, ctx, penalty_bt):
        ids, _ = dense_ids(batch.batch, batch.group)
        adv = grpo_advantages(self.outcome_rewards(batch, penalty_bt), ids, std_norm=False)
        return _broadcast(adv, batch), 0, {}


class OPO(Estimator):
    """OPO (Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline"), as verl computes it.

    Advantage: ``A_{i,t} = R_i - b_g`` with ``b_g = sum_j |o_j| R_j / sum_j |o_j|`` (the
    length-weighted group mean, the variance-optimal constant baseline when the squared score
    norm grows like the length).
    Expected gradient: biased in general: ``b_g`` contains ``R_i`` itself with the random
    weight ``|o_i| / sum_j |o_j|`` (GRPO's mean has the constant weight ``1/G``, which only
    rescales). With equal lengths it is GRPO's mean-only ``(1 - 1/G) grad J``. Customary
    aggregation: ``token-mean`` (verl's default, which its OPO recipe keeps).
    """

    name = "opo"
    needs_groups = True
    customary_agg = "token-mean"

    def compute(self, batch, ctx, penalty_bt):
        ids, _ = dense_ids(batch.batch, batch.group)
        adv = opo_advantages(self.outcome_rewards(batch, penalty_bt), batch.length, ids)
        return _broadcast(adv, batch), 0, {}


__all__ = ["RLOO", "GRPO", "DrGRPO", "OPO"]
