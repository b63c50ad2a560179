"""The estimator catalog's names and options, checked free of torch.

``tpg verify --estimator grpx`` and ``tpg train --estimator grpo:eps=-1`` must be refused at once, but
the catalog's classes live in modules that import torch (about two seconds). This module holds the
names -- every catalog name, in catalog order, with its option names in the order the classes declare
them (:meth:`~tpg.estimators.Estimator.all_options`), the training methods' aliases and the renamed
options -- and checks a spec's option values with the :class:`~tpg.estimators.options.Option` objects
the estimators themselves use (:mod:`.options`). A test checks all of it against the real registry,
so the two cannot drift. Checks across options and plug-ins' option values are left to the estimators,
once torch is loaded.

:func:`check_estimator_spec` raises the ``ValueError`` the real code would raise for an unknown
name, an unknown option, an option value out of its range, a malformed option list or a missing
plug-in file, with the same words.
"""

from __future__ import annotations

import os
import re

from .options import COMMON_OPTIONS, ESTIMATOR_OPTIONS

#: every catalog estimator's option names, in the registry's order (:data:`tpg.estimators.CATALOG`)
_COMMON = tuple(COMMON_OPTIONS)
OPTION_NAMES: dict[str, tuple[str, ...]] = {name: (*own, *_COMMON) for name, own in ESTIMATOR_OPTIONS.items()}
CATALOG: tuple[str, ...] = tuple(OPTION_NAMES)
#: the options every estimator (and every plug-in) takes
COMMON_OPTION_NAMES = _COMMON
#: option names of earlier releases, still accepted (with a FutureWarning): old -> new
RENAMED_OPTIONS = {"beta": "kl_beta"}
#: ``tpg train``'s method aliases: alias -> the catalog estimator it builds (:data:`tpg.train.methods.ALIASES`)
TRAIN_ALIASES = {"ppo": "ppo_gae"}

#: a plug-in spec ``FILE.py:FUNCTION[:key=value,...]`` (groups ``path``, ``fn``, ``opts``): the one rule
#: for estimator and loss plug-ins alike
PLUGIN_SPEC = re.compile(r"^(?P<path>.+?\.py):(?P<fn>[A-Za-z_]\w*)(?::(?P<opts>.*))?$")


def is_plugin_spec(spec: str) -> bool:
    """True for ``FILE.py:FUNCTION[:options]``."""
    return bool(PLUGIN_SPEC.match(spec.strip()))


def parse_options(text: str, where: str) -> dict[str, str]:
    """``key=value,key=value`` -> dict (values kept as strings, keys in the order given); ``ValueError``
    prefixed with ``where`` for a part without ``=`` or a key given twice."""
    opts: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{where}: option {part!r} is not key=value")
        if key in opts:
            raise ValueError(f"{where}: option {key!r} given twice")
        opts[key] = value.strip()
    return opts


def _check_catalog_spec(spec: str, training: bool) -> None:
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    keys = list(parse_options(rest, spec))  # malformed lists first, as the registry does
    base = TRAIN_ALIASES.get(name, name) if training else name
    if base not in OPTION_NAMES:
        if training:
            raise ValueError(f"unknown method {name!r}; use one of {', '.join((*TRAIN_ALIASES, *CATALOG))}")
        raise ValueError(f"unknown estimator {name!r}; the catalog has {', '.join(CATALOG)} "
                         f"(or give a plug-in as FILE.py:FUNCTION)")
    if training and {"kl", "kl_beta", "beta"} & set(keys):
        raise ValueError("set the KL with --kl and --kl-beta (TrainConfig.kl, kl_beta), not in the spec: "
                         "training adds the KL loss term itself")
    allowed = OPTION_NAMES[base]
    options = {**ESTIMATOR_OPTIONS[base], **COMMON_OPTIONS}
    for key, value in parse_options(rest, spec).items():
        if key not in allowed and RENAMED_OPTIONS.get(key) not in allowed:
            raise ValueError(f"{base}: unknown option {key!r}; allowed options: {', '.join(allowed)}")
        key = key if key in allowed else RENAMED_OPTIONS[key]
        options[key].parse(base, key, value)


def _check_plugin_file(spec: str) -> None:
    m = PLUGIN_SPEC.match(spec.strip())
    label = f"{m['path']}:{m['fn']}"
    parse_options(m["opts"] or "", label)
    if not os.path.isfile(m["path"]):
        raise ValueError(f"plug-in {label}: file not found: {m['path']!r} (relative to {os.getcwd()})")


def check_estimator_spec(spec: str, training: bool = False) -> None:
    """Refuse, without importing torch, what :func:`tpg.verify` (or, with ``training``, ``tpg train``)
    would refuse by name: an unknown estimator or method, an option it does not have, a malformed option
    list, an option value out of its range, a plug-in file that does not exist, and (training) KL options
    in the spec. The message is the real one, with the prefix the command line adds (the spec, or
    ``TrainConfig.estimator``); checks across options and plug-ins' option values are left to the
    estimators. ``all``, ``all:OPTIONS`` and ``;``-separated lists are checked item by
    item, as :func:`~tpg.estimators.expand_spec` does."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an estimator spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    try:
        if training:
            if is_plugin_spec(text):
                _check_plugin_file(text)
            else:
                _check_catalog_spec(text, training=True)
            return
        head, sep, opts = text.partition(":")
        if head.strip() == "all":
            items = [n + (":" + opts if sep and opts.strip() else "") for n in CATALOG]
        elif ";" in text:
            items = [s.strip() for s in text.split(";") if s.strip()]
            if not items:
                raise ValueError(f"empty estimator spec {spec!r}")
        else:
            items = [text]
        for item in items:
            if is_plugin_spec(item):
                _check_plugin_file(item)
            else:
                _check_catalog_spec(item, training=False)
    except ValueError as exc:
        raise ValueError(f"{'TrainConfig.estimator' if training else text}: {exc}") from None


__all__ = ["CATALOG", "OPTION_NAMES", "COMMON_OPTION_NAMES", "RENAMED_OPTIONS", "TRAIN_ALIASES",
           "PLUGIN_SPEC", "is_plugin_spec", "parse_options", "check_estimator_spec"]
