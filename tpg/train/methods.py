"""From ``TrainConfig.estimator`` to an estimator of the catalog, with the options training uses.

``estimator`` is a method name or any catalog spec ``NAME[:key=value,...]`` (or a plug-in
``FILE.py:FUNCTION``). Training defaults, applied unless the spec sets the option:

* ``agg``: each method's customary aggregation (written out in the spec) (GRPO ``seq-mean-token-mean``, Dr. GRPO
  ``seq-mean-token-sum-norm``, PPO and REINFORCE++ ``token-mean``, the rest ``seq-mean-token-sum``);
* ``ppo`` is ``ppo_gae:critic=tabular,lambda=0.95``: GAE(gamma = 1, lambda = 0.95) with the
  trainer's learned critic (``critic=tabular`` is the context hook's name for "the critic the
  context holds"; :mod:`tpg.train.critic`). ``ppo_gae:critic=exact`` trains with the oracle critic.
* ``kl``/``kl_beta`` come from ``TrainConfig.kl``/``kl_beta`` (``--kl``, ``--kl-beta``): the trainer adds the
  KL loss term itself, so the spec leaves them out (the same names as the spec options of ``tpg verify``).
"""

from __future__ import annotations

from ..estimators import ESTIMATORS, get_estimator, parse_spec
from ..estimators.ppo import PPOGAE
from ..estimators.registry import is_plugin_spec

ALIASES = {"ppo": ("ppo_gae", {"critic": "tabular", "lambda": "0.95"})}


def build_estimator(spec: str, kl: str = "none", kl_beta: float = 0.05):
    """``(method name, estimator)`` for ``TrainConfig.estimator``; ``ValueError`` naming ``TrainConfig.estimator``."""
    try:
        if is_plugin_spec(spec):
            if kl == "k1_reward":
                raise ValueError("kl=k1_reward needs a catalog estimator (a plug-in has no KL options); use a "
                                 "loss kind (k1, k2, k3)")
            est = get_estimator(spec)
            return spec.split(":")[1], est
        name, opts = parse_spec(spec)
        base, defaults = ALIASES.get(name, (name, {}))
        if base not in ESTIMATORS:
            raise ValueError(f"unknown method {name!r}; use one of {', '.join(('ppo',) + tuple(ESTIMATORS))}")
        if {"kl", "kl_beta", "beta"} & set(opts):
            raise ValueError("set the KL with --kl and --kl-beta (TrainConfig.kl, kl_beta), not in the spec: "
                             "training adds the KL loss term itself")
        opts = {**defaults, **opts}
        opts.setdefault("agg", ESTIMATORS[base].customary_agg)
        if kl != "none":
            opts["kl"] = kl
            opts["kl_beta"] = kl_beta
        return name, ESTIMATORS[base](**opts)
    except ValueError as exc:
        raise ValueError(f"TrainConfig.estimator: {exc}") from None


def needs_learned_critic(est) -> bool:
    """True for PPO with the trainer's critic (``critic=tabular``)."""
    return isinstance(est, PPOGAE) and est.options["critic"] == "tabular"


__all__ = ["build_estimator", "needs_learned_critic", "ALIASES"]
