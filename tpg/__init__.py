"""tpg: put the Trajectory Policy Gradient Theorem to the test on problems with known token rewards.

The pipeline, in the order data flows: a simulator (:mod:`tpg.mdp` + :mod:`tpg.policies`)
produces rollouts (:mod:`tpg.rollouts`); estimators (:mod:`tpg.estimators`) turn them into
advantages and a surrogate loss; the exact engine (:mod:`tpg.exact`) produces the truth; the
verifier (:mod:`tpg.verify`) compares the two, on-policy or under a behaviour policy and a policy
loss (:mod:`tpg.offpolicy`); training (:mod:`tpg.train`) and experiments
(:mod:`tpg.experiments`) sit on top. The names below are the curated public API; the
sub-packages export more (the verifier's entry point is ``tpg.verify.verify``: a top-level
``verify`` function would shadow the ``tpg.verify`` package).
"""

__version__ = "0.1.0"

from .cases import load_case, load_problem, mdp_from_spec, problem_from_task_spec, save_case  # noqa: E402
from .estimators import EstimatorOutput, ResponseBatch, get_estimator  # noqa: E402
from .exact import exact_kl, grad_by_enumeration, solve  # noqa: E402
from .mdp import TokenMDP, TokenTree, make_mdp, make_task  # noqa: E402
from .policies import Policy, SharedSoftmax, TabularSoftmax, TinyTransformerPolicy  # noqa: E402
from .rollouts import Rollouts, sample, sample_continuations  # noqa: E402

__all__ = ["EstimatorOutput", "Policy", "ResponseBatch", "Rollouts", "SharedSoftmax", "TabularSoftmax",
           "TinyTransformerPolicy", "TokenMDP", "TokenTree", "__version__", "exact_kl", "get_estimator",
           "grad_by_enumeration", "load_case", "load_problem", "make_mdp", "make_task", "mdp_from_spec",
           "problem_from_task_spec", "sample", "sample_continuations", "save_case", "solve"]
