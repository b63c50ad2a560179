"""Statistics and the verification harness: estimators against the exact gradient.

    import tpg
    records = tpg.verify(mdp, policy, ["rloo", "grpo:std_norm=false"], group_size=3)   # exact mode
    records = tpg.verify(mdp, policy, "all", mode="mc", samples=4000, seed=0)          # Monte Carlo
    records = tpg.verify(mdp, policy, "grpo", behaviour="top_p:0.9", loss="tis:2")     # off-policy (tpg.offpolicy)
    records = tpg.verify(mdp, policy, [my_advantage_fn, "rloo"])                       # your own function
    records = tpg.verify(mdp, policy, "rloo", target_reward="length_penalty:0.1")      # another objective

**The package is callable.** ``tpg.verify(...)`` is :func:`tpg.verify.harness.verify` (also importable
as ``from tpg.verify import verify``): this package's module object is an instance of
:class:`CallableModule`, a :class:`types.ModuleType` subclass whose ``__call__`` delegates to it
(assigning a module's ``__class__`` to a ``ModuleType`` subclass is supported since Python 3.5).
A package rather than a function keeps ``import tpg.verify.harness``, ``tpg.verify.montecarlo`` and
the other modules where they are; ``isinstance(tpg.verify, types.ModuleType)`` stays true. (Its base,
:class:`tpg._lazy.LazyPackage`, keeps ``tpg.verify.exact_moments`` the function, as before.)

Modules: :mod:`.context` (the exact and Monte Carlo estimator contexts), :mod:`.score` (per-batch
gradients from the analytic score, the logit-to-parameter map), :mod:`.exact_moments` (``E[g]`` and
``Cov[g]`` by enumerating the sample space), :mod:`.montecarlo` (sampled batches and the split
Hotelling test, the power model, Holm across estimators), :mod:`.verdict` (the vocabularies: exact
unbiased / scaled / biased, Monte Carlo consistent / consistent-scaled / biased), :mod:`.harness`
(:func:`verify`), :mod:`.record_fields` (the verdict fields of a record, shared with :mod:`tpg.offpolicy`),
:mod:`.suite` (the standard suite), :mod:`.cli` (``tpg verify``, ``tpg probe``),
:mod:`.defaults` (the defaults and choices the command line shows, free of torch).

The names below are imported on first use (:mod:`tpg._lazy`).
"""

import sys

from .._lazy import LazyPackage, lazy_exports


class CallableModule(LazyPackage):
    """The class of the ``tpg.verify`` module: calling the module calls :func:`tpg.verify.harness.verify`
    with the same arguments (see its docstring for them and for the records it returns)."""

    def __call__(self, *args, **kwargs) -> list[dict]:
        from .harness import verify

        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = CallableModule

_EXPORTS = {
    "verify": ".harness", "format_records": ".harness", "default_reference": ".harness",
    "ExactContext": ".context", "MonteCarloContext": ".context",
    "exact_moments": ".exact_moments", "ExactMoments": ".exact_moments", "batch_layout": ".exact_moments",
    "sample_gradient_terms": ".montecarlo", "GradientSamples": ".montecarlo", "mc_test": ".montecarlo",
    "MCResult": ".montecarlo", "PowerModel": ".montecarlo", "family_verdicts": ".montecarlo",
    "exact_verdict": ".verdict", "hotelling_test": ".verdict", "holm_adjust": ".verdict", "Verdict": ".verdict",
    "VERDICTS": ".verdict", "EXACT_VERDICTS": ".verdict", "MC_VERDICTS": ".verdict",
    "ParamMap": ".score",
    "run_suite": ".suite", "format_suite": ".suite", "SETTINGS": ".suite", "ENTRIES": ".suite",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
