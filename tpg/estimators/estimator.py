"""The :class:`Estimator` base class: options, the KL options, aggregation, the output.

A concrete estimator declares its own options (:class:`Option`) and implements
:meth:`Estimator.compute`, which returns per-token advantages; the base class validates the
batch, applies the KL options (:mod:`tpg.estimators.kl`), attaches the aggregation weights of
``agg`` (:func:`~tpg.estimators.base.aggregation_weights`) and zeroes padding.

Options every estimator has:

* ``agg`` — the aggregation mode (verl's ``loss_agg_mode``). Default ``seq-mean-token-sum``
  for every estimator (the unbiased mode the verifier compares with); ``agg=customary`` picks the
  mode the method uses in training (:attr:`Estimator.customary_agg`).
* ``kl`` — ``none | k1_reward | k1 | k2 | k3`` (``low_var_kl`` = ``k3``), see :mod:`.kl`.
* ``kl_beta`` — the KL coefficient beta (default 0.1; verl's default is 0.001, too small to see in
  a gradient check). The same names as ``tpg train``'s ``--kl`` and ``--kl-beta``. ``beta``, its
  earlier name, is still accepted for one release, with a ``FutureWarning``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .base import EstimatorOutput, ResponseBatch, aggregation_weights
from .kl import KL_LOSS_KINDS, kl_loss_coef, kl_reward_penalty, log_ratio
#: options renamed since earlier releases, old name -> new name (accepted with a FutureWarning for one release):
#: defined in the torch-free .names, which checks the command line's specs
from .names import RENAMED_OPTIONS
#: the options' declarations are torch-free (the command line checks specs before importing torch)
from .options import COMMON_OPTIONS, Option  # noqa: F401  (Option re-exported)


def _renamed_options(owner: str, options: dict) -> dict:
    """``options`` with the old names of :data:`RENAMED_OPTIONS` replaced by the new ones, each with a
    one-line ``FutureWarning`` (the command line prints it as ``tpg: note: ...``)."""
    if not any(old in options for old in RENAMED_OPTIONS):
        return options
    import warnings

    out = {}
    for key, value in options.items():
        new = RENAMED_OPTIONS.get(key)
        if new is not None:
            if new in options:
                raise ValueError(f"{owner}: option {key!r} is the old name of {new!r}; give one of them")
            warnings.warn(f"{owner}: option {key!r} is deprecated and will be removed in the next release; "
                          f"use {new!r}", FutureWarning, stacklevel=3)
            key = new
        out[key] = value
    return out


class Estimator:
    """Base class: a policy-gradient estimator maps a batch to per-token advantages and weights.

    Class attributes (overridden by each estimator):
        name: the catalog name.
        OPTIONS: the estimator's own options (the common ``agg``, ``kl``, ``kl_beta`` are added).
        uses_token_rewards: True only for the token-level oracle.
        needs_groups: True when an advantage depends on the other responses of its group: the
            verifier must enumerate G-tuples.
        batch_coupled: True when an advantage depends on responses outside its group within the
            batch id (REINFORCE++ whitening); :attr:`needs_batches` adds ``agg=token-mean``.
        stateful: True when the estimator keeps state across calls (the running baseline).
        customary_agg: the aggregation mode the method uses in training.

    Instances: ``options`` (dict of parsed values), ``agg`` (the mode used), ``spec``.
    """

    name: str = ""
    OPTIONS: dict[str, Option] = {}
    uses_token_rewards: bool = False
    needs_groups: bool = False
    batch_coupled: bool = False
    stateful: bool = False
    customary_agg: str = "seq-mean-token-sum"

    def __init__(self, **options: Any):
        allowed = self.all_options()
        parsed = {}
        for key, value in _renamed_options(self.name, options).items():
            if key not in allowed:
                raise ValueError(f"{self.name}: unknown option {key!r}; allowed options: {', '.join(allowed)}")
            parsed[key] = allowed[key].parse(self.name, key, value)
        self.options = {k: parsed.get(k, opt.default) for k, opt in allowed.items()}
        self._check_options()

    @classmethod
    def all_options(cls) -> dict[str, Option]:
        """The estimator's own options followed by the common ones."""
        return {**cls.OPTIONS, **COMMON_OPTIONS}

    @classmethod
    def describe(cls) -> str:
        """The docstring plus a line per option."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        lines = [doc, "", "Options:"]
        for k, opt in cls.all_options().items():
            lines.append(f"  {k} = {opt.describe_allowed()} (default {_fmt(opt.default)}): {opt.help}")
        lines.append(f"Customary aggregation: {cls.customary_agg}")
        return "\n".join(lines)

    def _check_options(self) -> None:
        """Hook for cross-option checks (raise ValueError)."""

    @property
    def agg(self) -> str:
        a = self.options["agg"]
        return self.customary_agg if a == "customary" else a

    @property
    def needs_batches(self) -> bool:
        """True when the output of one response depends on other groups of its batch id (batch
        whitening, or the random denominator of ``agg=token-mean``): enumerate batch tuples."""
        return self.batch_coupled or self.agg == "token-mean"

    @property
    def spec(self) -> str:
        """The canonical spec string: the name and the options that differ from their defaults."""
        opts = self.all_options()
        parts = [f"{k}={_fmt(v)}" for k, v in self.options.items() if v != opts[k].default]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        return f"<Estimator {self.spec}>"

    # -- the contract ----------------------------------------------------------------------

    def __call__(self, batch, ctx=None) -> EstimatorOutput:
        batch = self._as_batch(batch)
        check_batch(batch, needs_token_rewards=self.uses_token_rewards)
        kind = self.options["kl"]
        beta = float(self.options["kl_beta"])
        penalty = None
        delta = None
        if kind != "none":
            delta = log_ratio(batch.logp, batch.ref_logp, batch.mask)
            if kind == "k1_reward":
                penalty = kl_reward_penalty(delta, batch.mask, beta)
        adv, tokens_spent, info = self.compute(batch, ctx, penalty)
        m = batch.mask.to(batch.rm.dtype)
        if adv.shape != batch.mask.shape:
            raise AssertionError(f"{self.name} produced advantages of shape {list(adv.shape)}")
        adv = torch.where(batch.mask, adv, torch.zeros((), dtype=adv.dtype)) * m
        weights = aggregation_weights(batch.mask, batch.batch, self.agg, batch.horizon, dtype=batch.rm.dtype)
        kl_coef = kl_loss_coef(delta, batch.mask, kind, beta) if kind in KL_LOSS_KINDS else None
        info = {"spec": self.spec, "agg": self.agg, **info}
        return EstimatorOutput(advantages=adv, weights=weights, kl_coef=kl_coef, tokens_spent=int(tokens_spent),
                               info=info)

    def compute(self, batch: ResponseBatch, ctx, penalty_bt: torch.Tensor | None):
        """Per-token advantages ``[B, H]`` (padding is zeroed afterwards), tokens spent, info dict.

        ``penalty_bt`` is the per-token KL reward penalty ``beta * Delta`` (``kl=k1_reward``) or None."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state kept across calls (no-op for stateless estimators)."""

    # -- helpers for subclasses ---------------------------------------------------------------

    def _as_batch(self, batch) -> ResponseBatch:
        if isinstance(batch, ResponseBatch):
            return batch
        if hasattr(batch, "token_rewards") and hasattr(batch, "prefix_len"):
            return ResponseBatch.from_rollouts(batch, keep_token_rewards=self.uses_token_rewards)
        raise TypeError(f"{self.name}: expected a ResponseBatch (or Rollouts), got {type(batch).__name__}")

    @staticmethod
    def outcome_rewards(batch: ResponseBatch, penalty_bt: torch.Tensor | None) -> torch.Tensor:
        """The response-level reward the method sees, ``RM - beta * sum_t Delta_t`` with ``kl=k1_reward``, ``[B]``."""
        return batch.rm if penalty_bt is None else batch.rm - penalty_bt.sum(1)

    @staticmethod
    def token_rewards(batch: ResponseBatch, penalty_bt: torch.Tensor | None) -> torch.Tensor:
        """verl's ``token_level_rewards`` (RM on the last token) minus the per-token KL penalty, ``[B, H]``."""
        r = batch.token_level_rewards.to(batch.rm.dtype)
        return r if penalty_bt is None else r - penalty_bt

    def _need_ctx(self, ctx, hook: str):
        if ctx is None or not hasattr(ctx, hook):
            raise ValueError(f"{self.name} needs an estimator context with {hook}(); got {type(ctx).__name__}")
        return getattr(ctx, hook)


def tokens_counter(ctx) -> float | None:
    """The context's running count of sampled tokens, or None when it keeps none."""
    n = getattr(ctx, "tokens_sampled", None)
    return None if n is None else float(n)


def tokens_between(ctx, before: float | None, info: dict) -> int:
    """Tokens the context counted since ``before`` (rounded; in exact mode the context may count
    expected tokens, kept unrounded in ``info['tokens_expected']``); 0 with a note in ``info``
    when the context keeps no counter."""
    after = tokens_counter(ctx)
    if before is None or after is None:
        info["tokens_spent_note"] = "the context keeps no tokens_sampled counter"
        return 0
    spent = after - before
    if bool(getattr(ctx, "exact", False)):
        info["tokens_expected"] = spent
    return int(round(spent))


def check_batch(batch: ResponseBatch, needs_token_rewards: bool = False) -> None:
    """Shapes and types of a batch, checked once at the entry of every estimator."""
    B = batch.batch_size
    H = batch.horizon
    for name in ("prompt", "group", "batch", "rm", "length"):
        t = getattr(batch, name)
        if t.shape != (B,):
            raise ValueError(f"ResponseBatch.{name} must have shape [B] = [{B}], got {list(t.shape)}")
    for name in ("tokens", "mask", "logp", "token_level_rewards"):
        t = getattr(batch, name)
        if t.shape != (B, H):
            raise ValueError(f"ResponseBatch.{name} must have shape [B, H] = [{B}, {H}], got {list(t.shape)}")
    if batch.mask.dtype != torch.bool:
        raise ValueError(f"ResponseBatch.mask must be bool, got {batch.mask.dtype}")
    if not batch.rm.is_floating_point():
        raise ValueError(f"ResponseBatch.rm must be floating point, got {batch.rm.dtype}")
    if B and bool((batch.mask.sum(1) != batch.length).any()):
        raise ValueError("ResponseBatch.length must equal the number of masked tokens of each response")
    if needs_token_rewards:
        if batch.token_rewards is None:
            raise ValueError("the token-level oracle needs the true token rewards: pass Rollouts or "
                             "ResponseBatch.from_rollouts(..., keep_token_rewards=True)")
        if batch.token_rewards.shape != (B, H):
            raise ValueError(f"ResponseBatch.token_rewards must have shape [{B}, {H}]")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ":".join(str(x) for x in v if x is not None)
    return str(v)
