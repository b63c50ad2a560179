"""The catalog of estimators and the spec strings that name them.

A spec is ``NAME`` or ``NAME:key=value,key=value`` (values may contain ``:``, e.g.
``trepo:anchors=random:2,fill=interpolate,K=4``), or a plug-in ``FILE.py:FUNCTION`` with
optional ``:key=value,...`` (see :mod:`.plugin`). Unknown names, options and values raise
``ValueError`` naming the culprit and listing what is allowed.
"""

from __future__ import annotations

import torch

from .estimator import Estimator
from .group import GRPO, OPO, RLOO, DrGRPO
from .names import is_plugin_spec, parse_options
from .ppo import PPOGAE
from .reinforce import Reinforce, ReinforceBaseline, ReMax, RewardToGo
from .reinforce_pp import ReinforcePP, ReinforcePPBaseline
from .trepo import TRePO

_CLASSES: tuple[type[Estimator], ...] = (
    Reinforce, RewardToGo, ReinforceBaseline, RLOO, ReMax, GRPO, DrGRPO, OPO,
    ReinforcePP, ReinforcePPBaseline, PPOGAE, TRePO,
)
ESTIMATORS: dict[str, type[Estimator]] = {cls.name: cls for cls in _CLASSES}
CATALOG: tuple[str, ...] = tuple(ESTIMATORS)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A catalog spec ``NAME[:key=value,...]`` -> ``(NAME, options)``; the name is split at the
    first ``:`` only, so option values may contain ``:``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an estimator spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    return name.strip(), parse_options(rest, spec)


def get_estimator(spec, dtype: torch.dtype = torch.float64) -> Estimator:
    """The estimator a spec names: a catalog name with options, or a plug-in ``FILE.py:FUNCTION``
    (``dtype`` is the plug-in's input dtype). Also accepted: an :class:`Estimator` (returned as it is),
    an Estimator class (built with its defaults) and a Python callable (wrapped by
    :func:`~tpg.estimators.plugin.plugin_from_callable` with default options)."""
    if isinstance(spec, Estimator):
        return spec
    if isinstance(spec, type) and issubclass(spec, Estimator):
        return spec()
    if callable(spec) and not isinstance(spec, (str, type)):
        from .plugin import plugin_from_callable

        return plugin_from_callable(spec, dtype=dtype)
    if is_plugin_spec(spec):
        from .plugin import load_plugin

        return load_plugin(spec, dtype=dtype)
    name, opts = parse_spec(spec)
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; the catalog has {', '.join(CATALOG)} "
                         f"(or give a plug-in as FILE.py:FUNCTION)")
    return ESTIMATORS[name](**opts)


def expand_spec(spec: str) -> list[str]:
    """A list of specs: ``all`` -> every catalog name in order; ``all:OPTS`` -> every name with
    ``OPTS``; otherwise ``;``-separated specs, each checked."""
    text = spec.strip()
    head, sep, opts = text.partition(":")
    if head.strip() == "all":
        specs = [n + (":" + opts if sep and opts.strip() else "") for n in CATALOG]
    else:
        specs = [s.strip() for s in text.split(";") if s.strip()]
    if not specs:
        raise ValueError(f"empty estimator spec {spec!r}")
    for s in specs:
        get_estimator(s)
    return specs


def describe(name: str) -> str:
    """The docstring of an estimator (a catalog name or spec, or a plug-in spec), with its options."""
    if is_plugin_spec(name):
        return get_estimator(name).describe_plugin()
    base, _ = parse_spec(name)
    if base not in ESTIMATORS:
        raise ValueError(f"unknown estimator {base!r}; the catalog has {', '.join(CATALOG)}")
    return ESTIMATORS[base].describe()


__all__ = ["CATALOG", "ESTIMATORS", "get_estimator", "expand_spec", "describe", "parse_spec", "is_plugin_spec"]
