"""Policy-gradient estimators: rollouts in, per-token advantages and aggregation weights out.

Every estimator follows one contract (:mod:`.base`): ``est(batch, ctx) -> EstimatorOutput`` with
``g = sum score_coef() * grad log pi``. Build one from a spec string::

    from tpg.estimators import get_estimator
    est = get_estimator("grpo:std_norm=false,agg=token-mean")
    out = est(batch, ctx)

The catalog (:data:`CATALOG`, in order): ``reinforce``, ``reward_to_go`` (token oracle),
``reinforce_baseline``, ``rloo``, ``remax``, ``grpo``, ``dr_grpo``, ``opo``, ``reinforce_pp``,
``reinforce_pp_baseline``, ``ppo_gae``, ``trepo``; plug-ins as ``FILE.py:FUNCTION``, and Python
callables through :func:`plugin_from_callable` (or passed to :func:`get_estimator` and ``tpg.verify``
directly).

The names below are imported on first use (:mod:`tpg._lazy`).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AGG_MODES": ".base", "EstimatorContext": ".base", "EstimatorOutput": ".base", "ResponseBatch": ".base",
    "aggregation_weights": ".base", "stack_batches": ".base",
    "Estimator": ".estimator", "Option": ".estimator",
    "GRPO": ".group", "OPO": ".group", "RLOO": ".group", "DrGRPO": ".group",
    "KL_KINDS": ".kl", "kl_loss_coef": ".kl", "kl_value": ".kl",
    "PluginError": ".plugin", "PluginEstimator": ".plugin", "format_probe": ".plugin", "load_plugin": ".plugin",
    "plugin_from_callable": ".plugin", "probe": ".plugin", "probe_report": ".plugin",
    "PPOGAE": ".ppo", "ppo_clip_loss": ".ppo",
    "CATALOG": ".registry", "ESTIMATORS": ".registry", "describe": ".registry", "expand_spec": ".registry",
    "get_estimator": ".registry", "parse_spec": ".registry",
    "Reinforce": ".reinforce", "ReinforceBaseline": ".reinforce", "ReMax": ".reinforce",
    "RewardToGo": ".reinforce",
    "ReinforcePP": ".reinforce_pp", "ReinforcePPBaseline": ".reinforce_pp",
    "TRePO": ".trepo",
}

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
    "PluginEstimator", "PluginError", "load_plugin", "plugin_from_callable", "probe", "probe_report", "format_probe",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
