"""Statistics and the verification harness: estimators against the exact gradient.

    from tpg.verify import verify
    records = verify(mdp, policy, ["rloo", "grpo:std_norm=false"], group_size=3)   # exact mode
    records = verify(mdp, policy, "all", mode="mc", samples=4000, seed=0)          # Monte Carlo
    records = verify(mdp, policy, "grpo", behaviour="top_p:0.9", loss="tis:2")     # off-policy (tpg.offpolicy)

Modules: :mod:`.context` (the exact and Monte Carlo estimator contexts), :mod:`.score` (per-batch
gradients from the analytic score, the logit-to-parameter map), :mod:`.exact_moments` (``E[g]`` and
``Cov[g]`` by enumerating the sample space), :mod:`.montecarlo` (sampled batches and the split
Hotelling test, the power model, Holm across estimators), :mod:`.verdict` (the vocabularies: exact
unbiased / scaled / biased, Monte Carlo consistent / consistent-scaled / biased), :mod:`.harness`
(:func:`verify`), :mod:`.suite` (the standard suite), :mod:`.cli` (``tpg verify``, ``tpg probe``).
"""

from .context import ExactContext, MonteCarloContext
from .exact_moments import ExactMoments, batch_layout, exact_moments
from .harness import default_reference, format_records, verify
from .montecarlo import GradientSamples, MCResult, PowerModel, family_verdicts, mc_test, sample_gradient_terms
from .score import ParamMap
from .suite import ENTRIES, SETTINGS, format_suite, run_suite
from .verdict import EXACT_VERDICTS, MC_VERDICTS, VERDICTS, Verdict, exact_verdict, holm_adjust, hotelling_test

__all__ = [
    "verify", "format_records", "default_reference",
    "ExactContext", "MonteCarloContext",
    "exact_moments", "ExactMoments", "batch_layout",
    "sample_gradient_terms", "GradientSamples", "mc_test", "MCResult", "PowerModel", "family_verdicts",
    "exact_verdict", "hotelling_test", "holm_adjust", "Verdict", "VERDICTS", "EXACT_VERDICTS", "MC_VERDICTS",
    "ParamMap",
    "run_suite", "format_suite", "SETTINGS", "ENTRIES",
]
