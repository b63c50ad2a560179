"""tpg: put the Trajectory Policy Gradient Theorem to the test on problems with known token rewards.

The pipeline, in the order data flows: a simulator (:mod:`tpg.mdp` + :mod:`tpg.policies`)
produces rollouts (:mod:`tpg.rollouts`); estimators (:mod:`tpg.estimators`) turn them into
advantages and a surrogate loss; the exact engine (:mod:`tpg.exact`) produces the truth; the
verifier (:mod:`tpg.verify`) compares the two, on-policy or under a behaviour policy and a policy
loss (:mod:`tpg.offpolicy`); training (:mod:`tpg.train`) and experiments
(:mod:`tpg.experiments`) sit on top. :mod:`tpg.testing` turns verdicts into test assertions (and
:mod:`tpg.pytest_plugin` gives pytest a fixture).

The names below are the curated public API. ``tpg.verify`` is both the verifier's package and its
entry point: the package module is callable, ``tpg.verify(mdp, policy, "rloo")`` being
``tpg.verify.verify(mdp, policy, "rloo")`` (see :mod:`tpg.verify`), so ``import tpg.verify.harness``
and ``from tpg.verify import verify`` keep working.

Every name is imported on first use (PEP 562), so ``import tpg`` and ``tpg --help`` do not pay for
torch (see :mod:`tpg._lazy`).
"""

__version__ = "0.1.0"

from ._lazy import lazy_exports  # noqa: E402

_EXPORTS = {
    "load_case": ".cases", "load_problem": ".cases", "mdp_from_spec": ".cases", "problem_from_task_spec": ".cases",
    "save_case": ".cases",
    "EstimatorOutput": ".estimators", "ResponseBatch": ".estimators", "get_estimator": ".estimators",
    "plugin_from_callable": ".estimators",
    "exact_kl": ".exact", "grad_by_enumeration": ".exact", "solve": ".exact",
    "TokenMDP": ".mdp", "TokenTree": ".mdp", "make_mdp": ".mdp", "make_task": ".mdp",
    "Policy": ".policies", "SharedSoftmax": ".policies", "TabularSoftmax": ".policies",
    "TinyTransformerPolicy": ".policies",
    "Rollouts": ".rollouts", "sample": ".rollouts", "sample_continuations": ".rollouts",
}

__all__ = sorted([*_EXPORTS, "__version__", "verify", "testing"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
