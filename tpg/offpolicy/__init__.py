"""Off-policy verification: behaviour policies, policy losses, and their exact and Monte Carlo verdicts.

``pi`` is the training policy (the target is ``grad J(pi)``); ``mu`` the behaviour policy the responses
are sampled from; the loss says how the trainer forms its gradient from ``mu``'s batch::

    from tpg.verify import verify
    records = verify(mdp, policy, "grpo", group_size=4, behaviour="top_p:0.9", loss="tis:2")

    # per cell of a study, without the harness:
    from tpg.offpolicy import resolve_behaviour, offpolicy_moments
    beh = resolve_behaviour("temperature:1.3", mdp, policy)       # log mu, sampler, exact mismatch
    mom = offpolicy_moments(mdp, policy, get_estimator("rloo"), beh, "is_seq", group_size=4)
    mom.mean, mom.variance_trace, mom.mismatch

Modules: :mod:`.behaviour` (the behaviour specs, ``mu`` on the tree, the mismatch report), :mod:`.losses`
(the policy-loss catalog, plug-ins, the coefficients by autograd), :mod:`.exact` (``E_mu[g]``,
``Cov_mu[g]`` by enumeration; dynamic sampling's conditioning), :mod:`.montecarlo` (batches sampled
from ``mu``), :mod:`.record` (the verifier's off-policy record fields).

:mod:`.specs` declares and parses the behaviour and loss specs without torch; the names below are imported
on first use (:mod:`tpg._lazy`).

Layering: this package sits between the verifier's engines (:mod:`tpg.verify.exact_moments`,
:mod:`tpg.verify.score`, :mod:`tpg.verify.montecarlo`, :mod:`tpg.verify.verdict`) and its harness
(:func:`tpg.verify.verify`), which imports it lazily.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    **{n: ".behaviour" for n in ("STAGES", "Behaviour", "BehaviourPolicy", "behaviour_log_probs",
                                 "describe_behaviours", "mismatch_report", "parse_chain", "resolve_behaviour",
                                 "stale_policy")},
    **{n: ".exact" for n in ("HOOKS", "OffPolicyMoments", "keep_probabilities", "offpolicy_moments")},
    **{n: ".losses" for n in ("LOSSES", "Loss", "LossInputs", "PluginLoss", "describe_losses", "get_loss",
                              "loss_coefficients")},
    "sample_offpolicy_terms": ".montecarlo",
    **{n: ".record" for n in ("OffPolicySetup", "format_offpolicy_header", "prepare_offpolicy")},
    **{n: ".specs" for n in ("check_loss_spec", "parse_behaviour")},
}

__all__ = [
    # behaviours
    "resolve_behaviour", "Behaviour", "BehaviourPolicy", "behaviour_log_probs", "mismatch_report", "parse_chain",
    "stale_policy", "describe_behaviours", "STAGES",
    # losses
    "get_loss", "Loss", "LossInputs", "PluginLoss", "loss_coefficients", "describe_losses", "LOSSES",
    # moments and samples
    "offpolicy_moments", "OffPolicyMoments", "keep_probabilities", "sample_offpolicy_terms", "HOOKS",
    # the verifier's records
    "prepare_offpolicy", "OffPolicySetup", "format_offpolicy_header",
    # the spec grammar, torch-free (the command line checks specs with it before torch loads)
    "parse_behaviour", "check_loss_spec",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
