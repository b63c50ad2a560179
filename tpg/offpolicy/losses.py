"""Policy losses: how a trainer forms its gradient from a batch sampled from the behaviour ``mu``.

Notation, per token ``t`` of response ``i`` of a batch: ``log pi_t`` the training policy's log-probability
(the live quantity, differentiated), ``log mu_t`` the behaviour's log-probability as sampled (the
inference engine's ``rollout_log_probs``), ``A_t`` and ``w_t`` the estimator's advantage and aggregation
weight (its ``agg`` mode), ``m_t`` the response mask. Ratios:

    rho_t = pi_t / mu_t,            rho_i = prod_t rho_t (sequence),     rho_i^geo = rho_i^(1/|y_i|),
    r_t   = pi_t / pi_old,t         (the PPO ratio),

where ``pi_old`` is the loss's ``old`` option: ``old=mu`` (default) uses the behaviour's log-probabilities,
as PPO does when the sampler *is* the old policy (its later minibatch epochs, a stale policy in
asynchronous RL, GSPO's and CISPO's ``pi_old``); ``old=pi`` uses the trainer's recomputed
``log pi_old = log pi`` (verl's ``old_log_prob`` at the first step), so ``r = 1`` in value and the loss is
``pg`` at its first step. ``sg`` is stop-gradient. A loss is ``L = sum_{i,t} w_t l_t`` over each batch; its
single-batch gradient estimate is ``g = - dL/dtheta = sum_{i,t} c_t grad log pi_t`` with
``c_t = - dL / d log pi_t``, taken by autograd through the ratios (:func:`loss_coefficients`), as the
trainer's backward pass would. The catalog (:data:`LOSSES`):

* ``pg`` — ``l_t = - A_t log pi_t``: no correction, ``c = w A`` (the on-policy loss applied to ``mu``'s
  samples; what PPO with a recomputed ``pi_old`` does at its first step).
* ``is_token`` — ``l_t = - rho_t A_t`` (per-decision importance sampling, Precup, Sutton & Singh 2000):
  ``c = w rho_t A``. Corrects the token choice at each state, not the state distribution: biased for
  sequences unless ``mu = pi``.
* ``is_seq`` — ``l_t = - sg(rho_i) A_t log pi_t`` (trajectory-level importance sampling; verl's rollout
  correction at ``level=sequence``): ``c = w rho_i A``. Unbiased for every ``mu`` whose support contains
  ``pi``'s, for estimators whose gradient for response ``i`` depends on the other responses only
  through baselines (REINFORCE, RLOO, the token oracle, ...); its variance grows like
  ``E_mu[rho^2]``.
* ``tis:C[,level=token|seq|geo]`` — truncated importance sampling, ``l_t = - sg(min(rho, C)) A_t log pi_t``
  with ``rho = rho_t`` (token, default: the TIS correction of Yao et al. 2025, "Your efficient RL
  framework secretly brings you off-policy RL training", which multiplies the first-step PPO loss by
  ``min(pi_old/mu, C)``), ``rho_i`` (seq, Ionides 2008) or ``rho_i^geo``. Equal to ``is_token`` /
  ``is_seq`` when no ratio exceeds ``C``.
* ``mis:lo,hi[,level=...,reweight=true]`` — masked importance sampling (IcePop, Ling team 2025; verl's
  rollout correction in ``mask`` mode): ``l_t = - sg(rho 1[lo <= rho <= hi]) A_t log pi_t`` (or
  ``sg(1[...])`` with ``reweight=false``): tokens (or whole responses) whose ratio leaves ``[lo, hi]`` are
  dropped.
* ``ppo_clip:eps[,clip_low=,clip_high=,dual_clip=c,old=mu|pi]`` — PPO's clipped surrogate (Schulman et
  al. 2017), ``l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))`` with clip-higher (DAPO, Yu et
  al. 2025: ``clip_high > clip_low``) and dual clip (Ye et al. 2020: for ``A < 0``,
  ``l_t = min(l_t, -A c)``, ``c > 1``). At ``r = 1`` (``mu = pi``, or ``old=pi``) its gradient is ``pg``'s.
* ``gspo:eps[,clip_low=,clip_high=,old=mu|pi]`` — GSPO (Zheng et al. 2025) in its token form (verl's
  ``gspo``): the sequence ratio ``s_i = exp(mean_t log r_t)`` (the geometric mean) carries the gradient of
  each token, ``r_{i,t} = sg(s_i) pi_t / sg(pi_t)``, clipped as PPO with the paper's default
  ``eps_low = 3e-4``, ``eps_high = 4e-4``. With ``agg=seq-mean-token-mean`` this is GSPO's sequence
  objective's gradient; other aggregation modes weight the tokens as the estimator says.
* ``cispo:eps[,clip_low=,old=mu|pi]`` — CISPO (MiniMax-M1, 2025): ``l_t = - sg(clip(r_t, 1 - eps_low,
  1 + eps_high)) A_t log pi_t``, the clipped importance weight with stop-gradient times ``log pi``; no
  lower clip unless ``clip_low`` is given.

Which log-probabilities each loss reads (``log pi`` is always the trainer's, live; ``log mu`` the
engine's ``rollout_log_probs`` as sampled; ``log pi_old`` per the ``old`` option):

    ==============================  ===========================================================
    pg                              log pi only
    is_token, is_seq, tis, mis      log pi and log mu (the ratio pi/mu; in the TIS / IcePop papers
                                    the numerator is the trainer's recomputed pi_old, which equals
                                    pi at the first step)
    ppo_clip, gspo, cispo           log pi and log pi_old: log mu with old=mu (default), the
                                    recomputed log pi with old=pi
    plug-ins                        old_log_prob per old=mu|pi; rollout_log_probs = log mu
    ==============================  ===========================================================

Every loss adds the estimator's KL loss term unchanged (its coefficient is ``d (beta k) / d log pi`` at
the trainer's log-probabilities, as verl's ``kl_loss`` is added next to the policy loss).

Every loss takes ``filter_degenerate_groups=false|true|new_prompts|same_prompt`` (DAPO's dynamic
sampling, Yu et al. 2025): groups of two or more responses whose rewards are all equal are dropped and
resampled. This conditions the sample space; see :mod:`tpg.offpolicy.exact` for its closed form.

Plug-ins (``FILE.py:FUNCTION[:key=value,...]``, or a callable) come in two forms, told apart by the
signature:

* **verl form** — ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, ...) -> loss``
  (verl's ``compute_policy_loss_*``; chosen when it has a ``response_mask`` parameter): a scalar for one
  batch, aggregated by the function itself (``loss_agg_mode`` = the estimator's ``agg``; ``response_mask``
  0/1 in the log-probabilities' dtype); a returned tuple's first element is used. Called by keyword;
  ``rollout_log_probs`` (``log mu``) and ``config`` (an object holding the spec's extra options, with
  verl's ``clip_ratio`` defaults) are passed when it accepts them, other options as keyword arguments.
  It is called once per batch (vectorised with ``torch.func.vmap`` when the function allows it).
* **simple form** — ``fn(old_log_prob, log_prob, advantages) -> per-token loss [B, H]``, aggregated by tpg
  with the estimator's weights (three required positional parameters).

``old_log_prob`` is ``log mu`` (``old=mu``, default) or the recomputed ``log pi`` (``old=pi``); tpg takes
``-d loss / d log_prob`` by autograd, so a plug-in must keep ``log_prob`` in its graph.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..estimators.names import PLUGIN_SPEC, parse_options
from ..estimators.plugin import load_function
from ._spec import canonical
from .specs import (FILTER_MODES, LOSS_COMMON_OPTIONS, LOSS_DECLS, OLD_OPTION, check_loss_values,  # noqa: F401
                    parse_loss)

#: the options every loss has (declared torch-free in :mod:`tpg.offpolicy.specs`, with the catalog's)
COMMON_OPTIONS = LOSS_COMMON_OPTIONS


@dataclass
class LossInputs:
    """One chunk of stacked batches, as a loss sees it (every tensor ``[B, H]`` unless stated; padding 0).

    Attributes:
        logp_mu_bt: ``log mu`` of the sampled tokens (the engine's ``rollout_log_probs``).
        advantages_bt, weights_bt: the estimator's advantages and aggregation weights.
        mask_bt: bool response mask.
        batch_b: batch id of each row ``[B]``; rows of one batch are contiguous, ``rows_per_batch`` each.
        agg: the estimator's aggregation mode (verl's ``loss_agg_mode``).
        logp_old_bt: the trainer's recomputed ``log pi_old`` that ``old=pi`` reads (verl's ``old_log_prob``,
            computed once before an iteration's updates); ``None``: the live ``log pi`` detached, which is
            ``log pi_old`` at the first step (the verifier's case).
    """

    logp_mu_bt: torch.Tensor
    advantages_bt: torch.Tensor
    weights_bt: torch.Tensor
    mask_bt: torch.Tensor
    batch_b: torch.Tensor
    rows_per_batch: int
    agg: str
    logp_old_bt: torch.Tensor | None = None


class Loss:
    """Base class of the policy losses (see the module docstring).

    Subclasses set ``name`` and implement :meth:`token_loss` (per-token ``l_t``, aggregated with the
    weights) or :meth:`batch_total`; a catalog loss's ``positional`` (argument order), ``OPTIONS`` and
    ``help`` come from its torch-free declaration, :data:`tpg.offpolicy.specs.LOSS_DECLS`."""

    name = ""
    positional: tuple[str, ...] = ()
    OPTIONS: dict = {}
    help = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        decl = LOSS_DECLS.get(cls.__dict__.get("name", ""))
        if decl is not None:
            for attr, value in (("positional", decl.positional), ("OPTIONS", decl.options), ("help", decl.help)):
                if attr not in cls.__dict__:
                    setattr(cls, attr, value)

    def __init__(self, **values):
        opts = self.all_options()
        unknown = sorted(set(values) - set(opts))
        if unknown:
            raise ValueError(f"loss {self.name}: unknown option(s) {unknown}; allowed: {', '.join(opts)}")
        self._given = set(values)
        self.values = {k: (opt.parse(f"loss {self.name}", k, values[k]) if k in values else opt.default)
                       for k, opt in opts.items()}
        self._check()

    @classmethod
    def all_options(cls) -> dict:
        return {**cls.OPTIONS, **COMMON_OPTIONS}

    def _check(self) -> None:
        """Cross-option checks (``ValueError``)."""
        if self.name in LOSS_DECLS:
            check_loss_values(self.name, self.values)

    @property
    def spec(self) -> str:
        return canonical(self.name, self.values, self.positional, self.all_options())

    @property
    def filter(self) -> str:
        """``false``, ``new_prompts`` or ``same_prompt``."""
        return self.values["filter_degenerate_groups"]

    @property
    def is_pg(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<Loss {self.spec}>"

    # ---------------------------------------------------------------- the loss
    def old_logp(self, logp_bt: torch.Tensor, inp: LossInputs) -> torch.Tensor:
        if self.values.get("old", "mu") == "mu":
            return inp.logp_mu_bt
        return logp_bt.detach() if inp.logp_old_bt is None else inp.logp_old_bt

    def token_loss(self, logp_bt: torch.Tensor, inp: LossInputs) -> torch.Tensor:
        raise NotImplementedError

    def batch_total(self, logp_bt: torch.Tensor, inp: LossInputs) -> torch.Tensor:
        """``sum`` over the chunk's batches of each batch's loss (a scalar, differentiable in ``logp_bt``)."""
        ell = self.token_loss(logp_bt, inp)
        return (torch.where(inp.mask_bt, ell, torch.zeros((), dtype=ell.dtype)) * inp.weights_bt).sum()


def _log_ratio(logp_bt, other_bt, mask_bt):
    return torch.where(mask_bt, logp_bt - other_bt, torch.zeros((), dtype=logp_bt.dtype))


def _level_ratio(level: str, logp_bt, inp: LossInputs) -> torch.Tensor:
    """The detached importance ratio ``pi/mu`` of a correction ``level``, broadcast to ``[B, H]``."""
    d = _log_ratio(logp_bt.detach(), inp.logp_mu_bt, inp.mask_bt)
    if level == "token":
        return d.exp()
    s = d.sum(1, keepdim=True)
    if level == "geo":
        s = s / inp.mask_bt.sum(1, keepdim=True).clamp(min=1)
    return s.exp().expand_as(d)


class PG(Loss):
    name = "pg"

    @property
    def is_pg(self) -> bool:
        return True

    def token_loss(self, logp_bt, inp):
        return -inp.advantages_bt * logp_bt


class ISToken(Loss):
    name = "is_token"

    def token_loss(self, logp_bt, inp):
        return -_log_ratio(logp_bt, inp.logp_mu_bt, inp.mask_bt).exp() * inp.advantages_bt


class ISSeq(Loss):
    name = "is_seq"

    def token_loss(self, logp_bt, inp):
        return -_level_ratio("seq", logp_bt, inp) * inp.advantages_bt * logp_bt


class TIS(Loss):
    name = "tis"

    def token_loss(self, logp_bt, inp):
        rho = _level_ratio(self.values["level"], logp_bt, inp)
        return -rho.clamp(max=self.values["C"]) * inp.advantages_bt * logp_bt


class MIS(Loss):
    name = "mis"

    def token_loss(self, logp_bt, inp):
        rho = _level_ratio(self.values["level"], logp_bt, inp)
        keep = ((rho >= self.values["lo"]) & (rho <= self.values["hi"])).to(rho.dtype)
        weight = rho * keep if self.values["reweight"] else keep
        return -weight * inp.advantages_bt * logp_bt


class _Clipped(Loss):
    """Shared by the PPO-family losses: ``eps`` and the asymmetric ``clip_low`` / ``clip_high``."""

    default_eps = 0.2

    @property
    def clip_range(self) -> tuple[float, float]:
        """``(eps_low, eps_high)``: ``eps`` on both sides unless ``clip_low`` / ``clip_high`` (>= 0) are given."""
        eps = self.values["eps"]
        lo = self.values.get("clip_low", -1.0)
        hi = self.values.get("clip_high", -1.0)
        return (eps if lo < 0 else lo), (eps if hi < 0 else hi)

    def _clipped_surrogate(self, r_bt, adv_bt):
        lo, hi = self.clip_range
        return torch.maximum(-adv_bt * r_bt, -adv_bt * r_bt.clamp(1.0 - lo, 1.0 + hi))


class PPOClip(_Clipped):
    name = "ppo_clip"

    def token_loss(self, logp_bt, inp):
        r = _log_ratio(logp_bt, self.old_logp(logp_bt, inp), inp.mask_bt).exp()
        adv = inp.advantages_bt
        ell = self._clipped_surrogate(r, adv)
        c = self.values["dual_clip"]
        if c:
            ell = torch.where(adv < 0, torch.minimum(ell, -adv * c), ell)
        return ell


class GSPO(_Clipped):
    name = "gspo"

    def _check(self):
        if not {"eps", "clip_low"} & self._given:  # the paper's asymmetric default: 3e-4 below, 4e-4 above
            self.values["clip_low"] = 3e-4

    def token_loss(self, logp_bt, inp):
        d = _log_ratio(logp_bt, self.old_logp(logp_bt, inp), inp.mask_bt)
        log_s = d.detach().sum(1, keepdim=True) / inp.mask_bt.sum(1, keepdim=True).clamp(min=1)
        r = torch.exp(log_s + logp_bt - logp_bt.detach())
        return self._clipped_surrogate(r, inp.advantages_bt)


class CISPO(_Clipped):
    name = "cispo"

    def token_loss(self, logp_bt, inp):
        r = _log_ratio(logp_bt.detach(), self.old_logp(logp_bt, inp), inp.mask_bt).exp()
        lo = self.values["clip_low"]
        w = r.clamp(min=(1.0 - lo) if lo >= 0 else None, max=1.0 + self.values["eps"])
        return -w * inp.advantages_bt * logp_bt


LOSSES: dict[str, type[Loss]] = {c.name: c for c in (PG, ISToken, ISSeq, TIS, MIS, PPOClip, GSPO, CISPO)}
assert tuple(LOSSES) == tuple(LOSS_DECLS)


# ------------------------------------------------------------------------------ plug-ins
class _Config(dict):
    """A plug-in's ``config``: the spec's extra options with verl's clip defaults, by key or attribute."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


_VERL_DEFAULTS = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None, "clip_ratio_c": 3.0}


def _plugin_value(v: str):
    s = str(v).strip()
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if s.lower() in ("none", "null"):
        return None
    return s


class PluginLoss(Loss):
    """A user's policy loss (see the module docstring for the two forms)."""

    OPTIONS = {"old": OLD_OPTION}

    def __init__(self, fn, label: str, extra: dict | None = None, **values):
        self.name = label
        self.fn = fn
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"loss plug-in {label}: cannot read its signature ({exc})") from None
        params = sig.parameters
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p.name for p in params.values() if p.kind in positional and p.default is inspect.Parameter.empty]
        if "response_mask" in params:
            self.form = "verl"
            missing = [n for n in ("old_log_prob", "log_prob", "advantages") if n not in params and not self._var_kw]
            if missing:
                raise ValueError(f"loss plug-in {label}: a verl-form policy loss needs the parameters old_log_prob, "
                                 f"log_prob, advantages, response_mask; missing {missing}")
        elif len(required) == 3:
            self.form = "simple"
        else:
            raise ValueError(f"loss plug-in {label}: cannot tell its form from its signature {sig}: the verl form "
                             f"fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, ...) -> loss "
                             f"or the simple form fn(old_log_prob, log_prob, advantages) -> per-token loss")
        self._params = params
        extra = dict(extra or {})
        self.config = _Config({**_VERL_DEFAULTS, **{k: _plugin_value(v) for k, v in extra.items()}})
        self.kwargs = {}
        for k, v in extra.items():
            if k in params and k not in ("old_log_prob", "log_prob", "advantages", "response_mask",
                                         "loss_agg_mode", "config", "rollout_log_probs"):
                self.kwargs[k] = _plugin_value(v)
            elif "config" not in params and not self._var_kw:
                raise ValueError(f"loss plug-in {label}: option {k!r} is neither a parameter of the function nor "
                                 f"passable through a config argument (it has none)")
        self._extra = extra
        self._vmap_ok: bool | None = None
        super().__init__(**values)

    @property
    def spec(self) -> str:
        opts = [f"{k}={v}" for k, v in self._extra.items()]
        opts += [f"{k}={v}" for k, v in self.values.items() if v != self.all_options()[k].default]
        return self.name + (":" + ",".join(opts) if opts else "")

    def _invoke(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # the user's code: report any failure as the plug-in's
            raise ValueError(f"loss plug-in {self.name} raised {type(e).__name__}: {e}") from e

    def token_loss(self, logp_bt, inp):
        old = self.old_logp(logp_bt, inp)
        out = self._invoke(old, logp_bt, inp.advantages_bt)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(logp_bt.shape):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss plug-in {self.name} (simple form) must return a per-token loss of shape "
                             f"{list(logp_bt.shape)}, got {got}")
        return out.to(logp_bt.dtype)

    def _verl_kwargs(self, inp: LossInputs) -> dict:
        kw = dict(self.kwargs)
        if "loss_agg_mode" in self._params or self._var_kw:
            kw["loss_agg_mode"] = inp.agg
        if "config" in self._params:
            kw["config"] = self.config
        return kw

    def _verl_one(self, old, lp, adv, m, lmu, kw):
        call = dict(kw, old_log_prob=old, log_prob=lp, advantages=adv, response_mask=m)
        if "rollout_log_probs" in self._params:
            call["rollout_log_probs"] = lmu
        out = self.fn(**call)
        if isinstance(out, (tuple, list)):
            if not out:
                raise ValueError("returned an empty tuple")
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ValueError(f"must return a scalar loss (or a tuple starting with one), got "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out.reshape(())

    def batch_total(self, logp_bt, inp):
        if self.form == "simple":
            return super().batch_total(logp_bt, inp)
        B, H = logp_bt.shape
        R = inp.rows_per_batch
        nb = B // R
        old = self.old_logp(logp_bt, inp)
        m = inp.mask_bt.to(logp_bt.dtype)
        kw = self._verl_kwargs(inp)
        shaped = [t.reshape(nb, R, H) for t in (old, logp_bt, inp.advantages_bt, m, inp.logp_mu_bt)]
        if self._vmap_ok is not False:
            try:
                per = torch.func.vmap(lambda o, l, a, mm, lm: self._verl_one(o, l, a, mm, lm, kw))(*shaped)
                self._vmap_ok = True
                return per.sum()
            except Exception:  # the function does not vectorise (data-dependent control flow): call per batch
                if self._vmap_ok:
                    raise
                self._vmap_ok = False
        total = logp_bt.new_zeros(())
        for b in range(nb):
            try:
                total = total + self._verl_one(*(t[b] for t in shaped), kw)
            except ValueError as exc:
                raise ValueError(f"loss plug-in {self.name}: {exc}") from exc
            except Exception as exc:  # the user's code
                raise ValueError(f"loss plug-in {self.name} raised {type(exc).__name__}: {exc}") from exc
        return total


def load_loss_plugin(spec: str) -> PluginLoss:
    """The :class:`PluginLoss` of ``FILE.py:FUNCTION[:key=value,...]`` (``old`` and
    ``filter_degenerate_groups`` are tpg's; other options go to the function). The file is imported as
    an estimator plug-in's is (:func:`tpg.estimators.plugin.load_function`, no time limit)."""
    match = PLUGIN_SPEC.match(spec.strip())
    if not match:
        raise ValueError(f"a loss plug-in spec is FILE.py:FUNCTION[:key=value,...], got {spec!r}")
    path, fn_name = match["path"], match["fn"]
    label = f"{path}:{fn_name}"
    options = parse_options(match["opts"] or "", label)
    fn = load_function(path, fn_name, timeout=None, what="loss plug-in")
    ours = {k: options.pop(k) for k in list(options) if k in PluginLoss.all_options()}
    return PluginLoss(fn, label, extra=options, **ours)


def get_loss(spec) -> Loss:
    """The :class:`Loss` a spec names: ``NAME[:ARGS]`` of the catalog (positional arguments then
    ``key=value``), a plug-in ``FILE.py:FUNCTION[:key=value,...]``, a callable (a plug-in), or a
    :class:`Loss` (returned as is). ``None`` is ``pg``."""
    if spec is None:
        return PG()
    if isinstance(spec, Loss):
        return spec
    if callable(spec):
        return PluginLoss(spec, getattr(spec, "__name__", "plugin"))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a loss spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    if PLUGIN_SPEC.match(text):
        return load_loss_plugin(text)
    name, given = parse_loss(text)  # the command line's torch-free check, the same words
    return LOSSES[name](**given)


def loss_coefficients(loss: Loss, logp_bt: torch.Tensor, inp: LossInputs,
                      kl_coef_bt: torch.Tensor | None = None) -> torch.Tensor:
    """``c_t = - dL/d log pi_t`` for every token of a chunk, by autograd (``[B, H]``, float64, 0 on padding),
    minus ``w_t kl_coef_t`` of the estimator's KL loss term. ``L`` is the sum of the batches' losses;
    batches do not share rows, so each row's coefficient is that of its own batch's loss."""
    B, H = logp_bt.shape
    for name in ("logp_mu_bt", "advantages_bt", "weights_bt", "mask_bt"):
        t = getattr(inp, name)
        if tuple(t.shape) != (B, H):
            raise ValueError(f"LossInputs.{name} must have shape [{B}, {H}], got {list(t.shape)}")
    if B % max(inp.rows_per_batch, 1):
        raise ValueError(f"{B} rows do not split into batches of {inp.rows_per_batch}")
    zero = torch.zeros((), dtype=torch.float64)
    if isinstance(loss, PG):  # the gradient of -sum w A log pi is w A: no graph needed
        coef = torch.where(inp.mask_bt, inp.weights_bt * inp.advantages_bt, zero)
    else:
        lp = logp_bt.detach().to(torch.float64).clone().requires_grad_(True)
        with torch.enable_grad():
            total = loss.batch_total(lp, inp)
            if not isinstance(total, torch.Tensor) or total.numel() != 1:
                raise ValueError(f"loss {loss.spec}: the batch loss is not a scalar")
            if not total.requires_grad:
                grad = torch.zeros_like(lp)
            else:
                (grad,) = torch.autograd.grad(total.reshape(()), lp, allow_unused=True)
                grad = torch.zeros_like(lp) if grad is None else grad
        coef = torch.where(inp.mask_bt, -grad.detach(), zero)
    if kl_coef_bt is not None:
        coef = coef - torch.where(inp.mask_bt, inp.weights_bt * kl_coef_bt.to(torch.float64), zero)
    bad = ~torch.isfinite(coef)
    if bool(bad.any()):
        r, t = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"loss {loss.spec}: a non-finite gradient coefficient {float(coef[r, t])} (row {r}, position "
                         f"{t}; log pi - log mu = {float(logp_bt[r, t] - inp.logp_mu_bt[r, t]):.4g}): the importance "
                         f"ratio overflows; the behaviour's support is too narrow for this loss")
    return coef


def output_coefficients(loss: Loss, estimator, out, logp_bt: torch.Tensor, logp_mu_bt: torch.Tensor,
                        mask_bt: torch.Tensor, batch_b: torch.Tensor, rows_per_batch: int) -> torch.Tensor:
    """:func:`loss_coefficients` of an estimator's output ``out`` (its advantages, weights and KL loss
    coefficients, detached, in float64; its aggregation mode ``agg``) on a batch with ``log pi`` =
    ``logp_bt`` and ``log mu`` = ``logp_mu_bt`` (0 on padding)."""
    inp = LossInputs(logp_mu_bt=logp_mu_bt, advantages_bt=out.advantages.detach().to(torch.float64),
                     weights_bt=out.weights.detach().to(torch.float64), mask_bt=mask_bt, batch_b=batch_b,
                     rows_per_batch=rows_per_batch, agg=getattr(estimator, "agg", "seq-mean-token-sum"))
    kl = None if out.kl_coef is None else out.kl_coef.detach().to(torch.float64)
    return loss_coefficients(loss, logp_bt, inp, kl)


def describe_losses() -> str:
    """One line per loss: its spec form and formula."""
    lines = []
    for name, cls in LOSSES.items():
        args = ",".join(cls.positional)
        kw = [k for k in cls.OPTIONS if k not in cls.positional]
        form = name + (":" + args if args else "") + ("[," + ",".join(f"{k}=" for k in kw) + "]" if kw else "")
        lines.append(f"  {form:52s} {cls.help}")
    return "\n".join(lines)


__all__ = ["Loss", "LossInputs", "LOSSES", "PluginLoss", "get_loss", "load_loss_plugin", "loss_coefficients",
           "output_coefficients",
           "describe_losses", "FILTER_MODES", "COMMON_OPTIONS"]
