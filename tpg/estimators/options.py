"""Every catalog estimator's options, declared free of torch.

The estimator classes live in modules that import torch (about two seconds); ``tpg verify
--estimator grpo:eps=-1`` must be refused at once, so the options themselves -- kind, default,
allowed range, help line -- are declared here and the classes take their ``OPTIONS`` from
:data:`ESTIMATOR_OPTIONS`. :func:`tpg.estimators.names.check_estimator_spec` parses a spec's
values with the same :class:`Option` objects the estimator will use, so the command line's
message is the estimator's, word for word. Checks across options (e.g. TRePO's ``fill=ipw`` needs
``anchors=all|random``) stay in the classes' ``_check_options``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of an estimator: its kind, default, allowed values and a help line.

    ``kind`` is ``float``, ``int``, ``bool``, ``choice`` (one of ``choices``) or ``custom``
    (``parser(value) -> parsed`` raises ``ValueError`` with the allowed forms)."""

    default: Any
    kind: str
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    parser: Callable[[Any], Any] | None = None
    allowed: str = ""

    def describe_allowed(self) -> str:
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.kind in ("float", "int"):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            return f"{'an integer' if self.kind == 'int' else 'a number'} in [{lo}, {hi}]"
        return self.allowed

    def parse(self, owner: str, name: str, value: Any) -> Any:
        def bad(got):
            return ValueError(f"{owner}: option {name!r} must be {self.describe_allowed()}; got {got!r}")

        if self.kind == "custom":
            try:
                return self.parser(value)
            except ValueError as e:
                raise ValueError(f"{owner}: option {name!r}: {e}") from None
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise bad(value)
        if self.kind == "choice":
            v = str(value).strip()
            if v not in self.choices:
                raise bad(value)
            return v
        if self.kind in ("float", "int"):
            try:
                if self.kind == "int":
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError
                    v = int(value) if not isinstance(value, str) else int(value.strip())
                else:
                    v = float(value)
            except (TypeError, ValueError):
                raise bad(value) from None
            if isinstance(v, float) and not math.isfinite(v):
                raise bad(value)
            if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
                raise bad(value)
            return v
        raise AssertionError(f"unknown option kind {self.kind}")


#: verl's ``loss_agg_mode`` values (:func:`tpg.estimators.base.aggregation_weights`)
AGG_MODES = ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-mean", "token-sum")
#: the values of the ``kl`` option (:mod:`tpg.estimators.kl`), and its other names
KL_KINDS = ("none", "k1_reward", "k1", "k2", "k3")
KL_ALIASES = {"low_var_kl": "k3"}
KL_LOSS_KINDS = ("k1", "k2", "k3")
#: where a critic's values come from (:class:`tpg.estimators.PPOGAE`, plug-ins taking ``values``)
CRITICS = ("exact", "tabular", "zero", "noisy")
#: how TRePO fills the tokens between anchors (:mod:`tpg.estimators.trepo`)
FILLS = ("segment", "interpolate", "ipw")


def canonical_kl_kind(kind: str) -> str:
    """The canonical name of a KL option value (``low_var_kl`` -> ``k3``)."""
    kind = KL_ALIASES.get(kind, kind)
    if kind not in KL_KINDS:
        allowed = ", ".join(KL_KINDS + tuple(KL_ALIASES))
        raise ValueError(f"option 'kl' must be one of {allowed}; got {kind!r}")
    return kind


def _parse_kl(value: Any) -> str:
    try:
        return canonical_kl_kind(str(value).strip())
    except ValueError:
        raise ValueError(f"must be one of {' | '.join(KL_KINDS + tuple(KL_ALIASES))}; got {value!r}") from None


def parse_anchors(value) -> tuple[str, int | None]:
    """TRePO's ``anchors``: ``all`` | ``every:k`` | ``random:m`` | ``segments:d`` -> ``(kind, int or None)``."""
    if isinstance(value, tuple):
        value = ":".join(str(v) for v in value if v is not None)
    text = str(value).strip()
    allowed = "all | every:K (K >= 1) | random:M (M >= 1) | segments:TOKEN (a token id >= 0)"
    if text == "all":
        return ("all", None)
    kind, sep, arg = text.partition(":")
    if kind in ("every", "random", "segments") and sep:
        try:
            n = int(arg)
        except ValueError:
            n = None
        if n is not None and (n >= 1 or (kind == "segments" and n >= 0)):
            return (kind, n)
    raise ValueError(f"must be {allowed}; got {value!r}")


#: the options every estimator (and every plug-in) has, after its own
COMMON_OPTIONS: dict[str, Option] = {
    "agg": Option("seq-mean-token-sum", "choice", "aggregation mode (verl's loss_agg_mode); 'customary' "
                  "selects the method's own", choices=AGG_MODES + ("customary",)),
    "kl": Option("none", "custom", "KL regularisation: none, k1 in the reward, or k1/k2/k3 as a loss",
                 parser=_parse_kl, allowed=" | ".join(KL_KINDS + tuple(KL_ALIASES))),
    "kl_beta": Option(0.1, "float", "KL coefficient beta", low=0.0),
}

#: The options of the critic's source (beside ``critic``), passed to ``ctx.critic_values``: shared by
#: PPO/GAE and the plug-ins that take ``values`` (:mod:`tpg.estimators.plugin`).
CRITIC_OPTIONS: dict[str, Option] = {
    "sigma": Option(0.1, "float", "noise std of critic=noisy", low=0.0),
    "noise": Option("fixed", "choice", "critic=noisy: a fixed perturbation or fresh noise per call",
                    choices=("fixed", "fresh")),
    "steps": Option(20, "int", "critic=tabular: fitting rounds", low=0),
    "samples": Option(64, "int", "critic=tabular: sampled responses per round", low=1),
    "lr": Option(0.5, "float", "critic=tabular: step size of the table update", low=0.0, high=1.0),
}

#: each catalog estimator's own options (the common ones follow them), in the catalog's order
#: (:data:`tpg.estimators.CATALOG`); the classes' ``OPTIONS`` are these dicts
ESTIMATOR_OPTIONS: dict[str, dict[str, Option]] = {
    "reinforce": {},
    "reward_to_go": {},
    "reinforce_baseline": {
        "baseline": Option("exact", "choice", "exact prompt value (oracle) or running mean per prompt",
                           choices=("exact", "running")),
    },
    "rloo": {},
    "remax": {},
    "grpo": {
        "std_norm": Option(True, "bool", "divide by the group std (verl's norm_adv_by_std_in_grpo)"),
        "eps": Option(1e-6, "float", "added to the group std", low=0.0),
    },
    "dr_grpo": {},
    "opo": {},
    "reinforce_pp": {"gamma": Option(1.0, "float", "discount of the reward-to-go", low=0.0, high=1.0)},
    "reinforce_pp_baseline": {},
    "ppo_gae": {
        "gamma": Option(1.0, "float", "GAE discount", low=0.0, high=1.0),
        "lambda": Option(1.0, "float", "GAE lambda", low=0.0, high=1.0),
        "critic": Option("exact", "choice", "where V comes from", choices=CRITICS),
        **CRITIC_OPTIONS,
    },
    "trepo": {
        "anchors": Option(("all", None), "custom", "where V^ is estimated", parser=parse_anchors,
                          allowed="all | every:K | random:M | segments:TOKEN"),
        "fill": Option("segment", "choice", "how tokens between anchors get advantages", choices=FILLS),
        "K": Option(4, "int", "continuations per anchor prefix", low=1),
    },
}

__all__ = ["Option", "AGG_MODES", "KL_KINDS", "KL_ALIASES", "KL_LOSS_KINDS", "CRITICS", "FILLS",
           "canonical_kl_kind", "parse_anchors", "COMMON_OPTIONS", "CRITIC_OPTIONS", "ESTIMATOR_OPTIONS"]
