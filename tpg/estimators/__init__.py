"""Policy-gradient estimators: rollouts in, per-token advantages and aggregation weights out.

Every estimator follows one contract (:mod:`.base`): ``est(batch, ctx) -> EstimatorOutput`` with
``g = sum score_coef() * grad log pi``. Build one from a spec string::

    from tpg.estimators import get_estimator
    est = get_estimator("grpo:std_norm=false,agg=token-mean")
    out = est(batch, ctx)

The catalog (:data:`CATALOG`, in order): ``reinforce``, ``reward_to_go`` (token oracle),
``reinforce_baseline``, ``rloo``, ``remax``, ``grpo``, ``dr_grpo``, ``opo``, ``reinforce_pp``,
``reinforce_pp_baseline``, ``ppo_gae``, ``trepo``; plug-ins as ``FILE.py:FUNCTION``.
"""

from .base import (
    AGG_MODES,
    EstimatorContext,
    EstimatorOutput,
    ResponseBatch,
    aggregation_weights,
    stack_batches,
)
from .estimator import Estimator, Option
from .group import GRPO, OPO, RLOO, DrGRPO
from .kl import KL_KINDS, kl_loss_coef, kl_value
from .plugin import PluginError, PluginEstimator, format_probe, load_plugin, probe, probe_report
from .ppo import PPOGAE, ppo_clip_loss
from .registry import CATALOG, ESTIMATORS, describe, expand_spec, get_estimator, parse_spec
from .reinforce import Reinforce, ReinforceBaseline, ReMax, RewardToGo
from .reinforce_pp import ReinforcePP, ReinforcePPBaseline
from .trepo import TRePO

__all__ = [
    # the contract
    "ResponseBatch", "EstimatorOutput", "EstimatorContext", "aggregation_weights", "AGG_MODES", "stack_batches",
    # the base class and the catalog
    "Estimator", "Option", "CATALOG", "ESTIMATORS", "get_estimator", "expand_spec", "describe", "parse_spec",
    "Reinforce", "RewardToGo", "ReinforceBaseline", "RLOO", "ReMax", "GRPO", "DrGRPO", "OPO",
    "ReinforcePP", "ReinforcePPBaseline", "PPOGAE", "TRePO",
    # losses and KL
    "ppo_clip_loss", "KL_KINDS", "kl_value", "kl_loss_coef",
    # plug-ins
    "PluginEstimator", "PluginError", "load_plugin", "probe", "probe_report", "format_probe",
]
