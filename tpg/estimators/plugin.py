"""Users' own advantage functions as estimators, and a probe of any estimator on edge cases.

``load_plugin("path/to/file.py:function")`` wraps a function of a file, and
``plugin_from_callable(fn, **options)`` a Python callable (labelled ``module.qualname``), in one of two
forms, told apart by its signature (the same code decides for both):

* **verl form** — ``fn(token_level_rewards[B, L], response_mask[B, L], index) -> (advantages[B, L],
  returns[B, L])``, the signature of verl's ``compute_*_outcome_advantage``: torch tensors in
  (rewards with ``RM`` on the last token, the mask as 0/1 of the same dtype), ``index`` a numpy
  int64 array of group ids (verl passes uid strings; only equality matters); the first element of
  a returned tuple (or a bare tensor/array) is used. Chosen when the function has parameters
  named ``token_level_rewards`` and ``response_mask`` (then called by keyword, ``index=`` passed
  if it accepts it; verl's extra parameters keep their defaults), or else exactly three required
  positional parameters.
* **simple form** — ``fn(rewards[B], group_ids[B]) -> advantages[B]`` (torch tensors, group ids
  long), broadcast over each response's tokens. Chosen for exactly two required positional
  parameters.

**Context by keyword.** A parameter with one of these names (in either form; they do not count
as positional parameters) receives, per call:

* ``reward_baselines`` ``[B]`` — ``RM`` of the greedy (argmax) response to each row's prompt
  (``ctx.greedy_rm``; verl's ``compute_remax_outcome_advantage``); its tokens count as spent;
* ``values`` ``[B, L]`` — a critic's ``V(s_t)`` for each response token (``ctx.critic_values``,
  0 from the complete response on): options ``critic=exact|tabular|zero|noisy`` (default exact),
  ``sigma``, ``noise=fixed|fresh``, ``steps``, ``samples``, ``lr``, as for ``ppo_gae``; the critic
  fits the discounted return under the ``gamma`` option (verl's ``compute_gae_advantage_return``);
* ``gamma``, ``lam`` — floats from the options of the same names (default: the parameter's own
  default when it is a number, else 1);
* ``old_log_prob`` ``[B, L]`` — ``log pi_old`` of each sampled token (0 on padding).

Options on the spec (``FILE.py:FUNCTION:key=value,...``, or keyword arguments of
:func:`plugin_from_callable`): the common ``agg``, ``kl``, ``kl_beta``;
``layout`` (below); ``gamma``/``lam`` only for a function that takes them; the critic options
only for one that takes ``values``.

**Layout** (``layout=group|independent|batch:PxN``, also written ``batch:P×N``): what one call
of the plug-in sees, and hence the sample space the verifier enumerates:

* ``group`` (default) — one prompt ``x ~ rho`` and ``G`` responses to it (``G`` the verifier's
  group size), ``index`` all equal;
* ``independent`` — ``G`` independent prompt-response pairs, each its own group (``index``
  all distinct): what tpg's batch-coupled built-ins (``reinforce_pp``) see;
* ``batch:PxN`` — verl's real batch: ``P`` prompts drawn independently from ``rho``, ``N``
  responses to each, ``index`` = the prompt's uid *within the batch*: a uid names a prompt draw,
  so two draws of the same prompt are two groups. ``N`` replaces the verifier's group size.

A plug-in is called once per batch id (its statistics stay within a batch, as a trainer's
would), with group ids numbered ``0 .. n-1`` within that batch. Its output goes through the
same options as a built-in (``agg``, ``kl``, ``kl_beta``: with ``kl=k1_reward`` the rewards it
receives carry the penalty) and padded positions are zeroed afterwards (``info`` records
whether the raw output had non-zero padding). ``dtype`` (float64 by default) is the dtype of
the tensors it receives; results are cast back to float64. Being opaque, a plug-in is assumed
to couple its group and its batch (``needs_groups`` and ``batch_coupled`` are True).

**Errors.** A bad spec (file or function not found, an unrecognised signature, an unknown
option) raises ``ValueError`` naming the plug-in (``file:function``). A failure of the plug-in's
own code raises :class:`PluginError` (a ``ValueError``) naming it and what happened: its import
or a call raised anything but ``KeyboardInterrupt`` (``SystemExit`` from ``sys.exit`` included,
and any ``BaseException``), ran past the time limit, or returned a wrong type or shape, a NaN or
an infinity. The verifier turns a ``PluginError`` into an error record for that estimator and
goes on with the others.

**Time limit** (``timeout``, seconds per call and for the import, default
:data:`DEFAULT_TIMEOUT`; ``None`` for none). In the main thread on POSIX, a ``SIGALRM`` timer
(``signal.setitimer``) interrupts the plug-in: the handler raises inside the plug-in's frame
an exception derived from ``BaseException`` (so its own ``except Exception`` does not swallow
it), its ``finally`` blocks run, and the call becomes a ``PluginError``; should the plug-in
swallow it anyway, the alarm fires again every 0.1 s, and a call that returns after its time
is still an error. A previously armed ``ITIMER_REAL`` timer and ``SIGALRM`` handler are
restored afterwards with their remaining time (an outer alarm due during the call fires when
the call ends). Limits: the handler runs between Python bytecodes, so a single long C call (a
huge torch operation) is interrupted only when it returns; a plug-in that catches every
``BaseException`` in a loop cannot be stopped; ``os._exit`` and crashes end the process. Off
the main thread (and on platforms without ``setitimer``) no signal can be used: the call runs
to its end and becomes a ``PluginError`` if it took longer than the limit.

:func:`probe` runs a plug-in or any estimator spec on edge cases (identical rewards, a singleton
group, all-zero rewards, ragged lengths, reward scales 1e6 and 1e-6, float32 against float64)
and :func:`format_probe` prints what it found; :func:`probe_report` is the JSON document of
``tpg probe --json``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import math
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import torch

from .._tables import legend_lines
from .base import ResponseBatch
from .estimator import COMMON_OPTIONS, Estimator, Option, tokens_between, tokens_counter
from .functional import dense_ids
from .names import PLUGIN_SPEC, parse_options
from .ppo import CRITIC_OPTIONS, CRITICS

FORMS = ("verl", "simple")
#: Seconds a plug-in's import or one call may take (``tpg verify --plugin-timeout``).
from .defaults import DEFAULT_TIMEOUT  # noqa: E402  (torch-free home: tpg verify --help)
#: Parameter names through which a plug-in asks for context (see the module docstring).
CONTEXT_KEYWORDS = ("reward_baselines", "values", "gamma", "lam", "old_log_prob")
#: The layouts a plug-in may declare (``batch:PxN`` with integers ``P, N >= 1``).
LAYOUTS = ("group", "independent", "batch:PxN")
_BATCH_LAYOUT = re.compile(r"^batch:\s*(\d+)\s*[x×X]\s*(\d+)$")
#: Seconds between repeated alarms once a plug-in's time is up (in case it swallowed the first).
_REFIRE = 0.1


class PluginError(ValueError):
    """A failure of a plug-in's own code: its import or a call raised (any ``BaseException`` but
    ``KeyboardInterrupt``), ran past the time limit, or returned something unusable."""


# -- layouts --------------------------------------------------------------------------------------

def parse_layout(value) -> tuple[str, int, int]:
    """``(kind, P, N)`` of a layout: ``("group", 0, 0)``, ``("independent", 0, 0)`` or
    ``("batch", P, N)`` for ``batch:PxN`` (``x``, ``X`` or ``×``); ``ValueError`` otherwise."""
    text = str(value).strip()
    if text in ("group", "independent"):
        return text, 0, 0
    m = _BATCH_LAYOUT.match(text)
    if not m:
        raise ValueError(f"must be group | independent | batch:PxN (P prompts, N responses each, e.g. batch:2x3); "
                         f"got {value!r}")
    P, n = int(m[1]), int(m[2])
    if P < 1 or n < 1:
        raise ValueError(f"batch:PxN needs P >= 1 prompts and N >= 1 responses each; got P={P}, N={n}")
    return "batch", P, n


def layout_name(value) -> str:
    """The canonical spelling of a layout: ``group``, ``independent`` or ``batch:PxN``."""
    kind, P, n = parse_layout(value)
    return f"batch:{P}x{n}" if kind == "batch" else kind


_LAYOUT_OPTION = Option("group", "custom", "what one call sees: one prompt's group of G, G independent pairs, or "
                        "verl's batch of P prompts x N responses (index = prompt uid)", parser=layout_name,
                        allowed="group | independent | batch:PxN")


# -- the time limit -------------------------------------------------------------------------------

class _Expired(BaseException):
    """Raised inside a plug-in by the alarm handler when its time is up (a ``BaseException``, so
    that the plug-in's own ``except Exception`` does not swallow it)."""


def _check_timeout(timeout, owner: str) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"{owner}: timeout must be a positive number of seconds or None, got {timeout!r}")


def _describe_exception(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if isinstance(e, SystemExit):
        text += " (sys.exit was called)"
    return text


class TimeLimit:
    """A wall-clock limit on calls into a plug-in (a context manager; see the module docstring).

    On entry, in the main thread on POSIX, installs a ``SIGALRM`` handler and takes over
    ``ITIMER_REAL`` (a previously armed timer is paused); :meth:`call` arms a one-shot alarm for
    each call; on exit the previous handler and timer (with its remaining time) are restored.
    Elsewhere :meth:`call` runs to the end and checks the elapsed time afterwards.

        with TimeLimit(60.0, "plug.py:fn") as limit:
            out = limit.call(lambda: fn(x))     # PluginError on any failure or overrun
    """

    def __init__(self, seconds: float | None, label: str):
        _check_timeout(seconds, f"plug-in {label}")
        self.seconds = seconds
        self.label = label
        self.installed = False
        self.active = False
        self.fired = False
        self._prev_handler = None
        self._prev_timer = (0.0, 0.0)
        self._t0 = 0.0

    def __enter__(self) -> "TimeLimit":
        if self.seconds is None or not hasattr(signal, "setitimer") or \
                threading.current_thread() is not threading.main_thread():
            return self
        prev = signal.getsignal(signal.SIGALRM)
        if prev is None:  # installed outside Python: it could not be restored
            return self
        self._prev_handler = prev
        self._t0 = time.monotonic()
        signal.signal(signal.SIGALRM, self._fire)
        self._prev_timer = signal.setitimer(signal.ITIMER_REAL, 0)
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.installed:
            return
        self.active = False  # first: an alarm arriving from here on is ignored
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._prev_handler)
        self.installed = False
        delay, interval = self._prev_timer
        if delay > 0:
            remaining = delay - (time.monotonic() - self._t0)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), interval)

    def _fire(self, signum, frame) -> None:
        if not self.active:
            return
        self.fired = True
        signal.setitimer(signal.ITIMER_REAL, _REFIRE)  # again, should the plug-in swallow this one
        raise _Expired()

    def _stop(self) -> None:
        self.active = False
        if self.installed:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def call(self, fn, what: str = ""):
        """``fn()`` within the limit; anything it raises but ``KeyboardInterrupt`` (``SystemExit``
        included), or running past the limit, becomes :class:`PluginError`
        ``"plug-in LABEL[: WHAT] raised ..."``."""
        who = f"plug-in {self.label}: {what}" if what else f"plug-in {self.label}"
        self.fired = False
        self.active = True
        start = time.monotonic()
        if self.installed:
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            try:
                result = fn()
            finally:
                self._stop()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # the user's code: SystemExit and other BaseExceptions included
            self._stop()  # again, in case the alarm interrupted the first stop
            if isinstance(e, _Expired) or self.fired:
                raise PluginError(f"{who} ran past the time limit of {self.seconds:g} s (interrupted; raise "
                                  f"it with --plugin-timeout)") from None
            raise PluginError(f"{who} raised {_describe_exception(e)}") from e
        elapsed = time.monotonic() - start
        if self.fired:
            raise PluginError(f"{who} ran past the time limit of {self.seconds:g} s (it caught the interrupt and "
                              f"returned after {elapsed:.3g} s)")
        if self.seconds is not None and elapsed > self.seconds:
            why = "a long call into C code" if self.installed else "no signal off the main thread"
            raise PluginError(f"{who} took {elapsed:.3g} s, past the time limit of {self.seconds:g} s (not "
                              f"interruptible: {why})")
        return result


def call_with_time_limit(fn, timeout: float | None, label: str, what: str = ""):
    """``fn()`` under a wall-clock limit of ``timeout`` seconds (``None``: no limit): one
    :meth:`TimeLimit.call`."""
    with TimeLimit(timeout, label) as limit:
        return limit.call(fn, what)


# -- the estimator --------------------------------------------------------------------------------

class PluginEstimator(Estimator):
    """A user's advantage function (see :mod:`tpg.estimators.plugin`).

    Args:
        fn: the function; label: ``file:function`` (or ``module.qualname`` of a callable); form: ``verl``
            or ``simple``.
        dtype: the dtype of the tensors it receives.
        keywords: verl form called by keyword; accepts_index: it takes ``index``.
        context: the context keywords it takes (:data:`CONTEXT_KEYWORDS`).
        defaults: option defaults from its signature (``gamma``, ``lam``).
        timeout: seconds per call (``None``: no limit).
        source: ``FILE.py:FUNCTION`` that :func:`load_plugin` (and ``tpg verify --estimator``) can load
            the same function from, or ``None`` when there is none (a lambda, a nested function, a
            callable object, a function defined outside a file).
        options: the spec's options.
    """

    needs_groups = True
    batch_coupled = True

    def __init__(self, fn, label: str, form: str, dtype: torch.dtype = torch.float64, keywords: bool = False,
                 accepts_index: bool = True, context: tuple = (), defaults: dict | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, source: str | None = None, **options):
        if form not in FORMS:
            raise ValueError(f"plug-in form must be one of {', '.join(FORMS)}, got {form!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"plug-in {label}: dtype must be torch.float32 or torch.float64, got {dtype}")
        unknown = [k for k in context if k not in CONTEXT_KEYWORDS]
        if unknown:
            raise ValueError(f"plug-in {label}: unknown context keywords {unknown}; allowed: "
                             f"{', '.join(CONTEXT_KEYWORDS)}")
        _check_timeout(timeout, f"plug-in {label}")
        self.name = label
        self.fn = fn
        self.form = form
        self.dtype = dtype
        self.context = tuple(context)
        self.timeout = timeout
        self.source = source
        self._keywords = keywords
        self._accepts_index = accepts_index
        self._options_table = _plugin_options(self.context, defaults or {})
        super().__init__(**options)

    def all_options(self) -> dict[str, Option]:  # type: ignore[override]
        """The options this plug-in accepts: depend on the context keywords it takes."""
        return self._options_table

    @property
    def declared_layout(self) -> str:
        """The batch layout it declared (``layout=`` option): ``group``, ``independent`` or ``batch:PxN``."""
        return self.options["layout"]

    def supports_exact(self):
        if "values" in self.context and self.options["critic"] == "noisy" and self.options["noise"] == "fresh":
            return False, ("a plug-in taking values with critic=noisy,noise=fresh: its expectation over the noise "
                           "is exact only if it is linear in the values, which tpg cannot know")
        return True, ""

    def describe(self) -> str:  # type: ignore[override]
        """The plug-in's docstring and options (an instance method: its options depend on its signature)."""
        return self.describe_plugin()

    def describe_plugin(self) -> str:
        doc = inspect.getdoc(self.fn) or "(no docstring)"
        ctx = f", context: {', '.join(self.context)}" if self.context else ""
        lines = [f"plug-in {self.name} ({self.form} form, {str(self.dtype).replace('torch.', '')}, "
                 f"layout {self.declared_layout}{ctx})", "", doc, "", "Options:"]
        for k, opt in self.all_options().items():
            lines.append(f"  {k} = {opt.describe_allowed()} (default {opt.default}): {opt.help}")
        return "\n".join(lines)

    def compute(self, batch, ctx, penalty_bt):
        B, H = batch.mask.shape
        out_dt = batch.rm.dtype
        bid, nb = dense_ids(batch.batch)
        # rows sorted by batch id (they already are when the verifier stacks batches), so that each
        # call's rows are one slice; the group ids of (batch, group) pairs are consecutive within a batch
        order = torch.argsort(bid, stable=True)
        sorted_rows = bool((bid[1:] >= bid[:-1]).all()) if B > 1 else True
        perm = None if sorted_rows else order
        counts = torch.bincount(bid, minlength=nb).tolist()
        gid, _ = dense_ids(batch.batch, batch.group)
        mask = batch.mask
        if perm is not None:
            gid, mask = gid[perm], mask[perm]
        m = mask.to(self.dtype)
        if self.form == "verl":
            first = self.token_rewards(batch, penalty_bt).to(self.dtype)
        else:
            first = self.outcome_rewards(batch, penalty_bt).to(self.dtype)
        info: dict = {}
        before = tokens_counter(ctx) if "reward_baselines" in self.context else None
        extra_all = self._context_kwargs(batch, ctx)  # per-row hooks: asked once for all rows
        spent = tokens_between(ctx, before, info) if "reward_baselines" in self.context else 0
        if perm is not None:
            first = first[perm]
            extra_all = {k: v[perm] if isinstance(v, torch.Tensor) else v for k, v in extra_all.items()}
        gid_np = gid.numpy().astype(np.int64)
        outs = []
        start = 0
        with TimeLimit(self.timeout, self.name) as limit:
            for n in counts:
                sl = slice(start, start + n)
                start += n
                # copies: a plug-in that writes into its inputs must not reach the other batches
                extra = {k: v[sl].clone() if isinstance(v, torch.Tensor) else v for k, v in extra_all.items()}
                index = gid_np[sl] - (gid_np[sl.start] if n else 0)
                if self.form == "verl":
                    a = self._call_verl(limit, first[sl].clone(), m[sl].clone(), index, (n, H), extra)
                else:
                    out = self._invoke(limit, (first[sl].clone(), torch.from_numpy(index.copy())), extra)
                    a = self._check(out, (n,)).unsqueeze(1) * m[sl].to(torch.float64)
                outs.append(a)
        raw = torch.cat(outs) if outs else torch.zeros(0, H, dtype=torch.float64)
        raw_pad = float(raw.abs().masked_fill(mask, 0).max()) if B else 0.0
        adv = raw.to(out_dt)
        if perm is not None:
            adv = torch.empty_like(adv).index_copy_(0, perm, adv)
        return adv, spent, {"raw_padding_max_abs": raw_pad, "form": self.form, "layout": self.declared_layout,
                            **info}

    def _context_kwargs(self, batch: ResponseBatch, ctx) -> dict:
        """The context keywords the plug-in takes, for every row (see the module docstring): the
        hooks are per row, so one call serves every batch id."""
        n, H = batch.mask.shape
        kw: dict = {}
        for key in self.context:
            if key == "reward_baselines":
                v = torch.as_tensor(self._need_ctx(ctx, "greedy_rm")(batch.prompt))
                if v.shape != (n,) or not bool(torch.isfinite(v).all()):
                    raise ValueError(f"plug-in {self.name}: ctx.greedy_rm must return {n} finite values, got shape "
                                     f"{list(v.shape)}")
                kw[key] = v.to(self.dtype)
            elif key == "values":
                if self.options["critic"] == "zero":
                    v = torch.zeros(n, H + 1, dtype=torch.float64)
                else:
                    v = torch.as_tensor(self._need_ctx(ctx, "critic_values")(batch, self.options["critic"],
                                                                             self.options["gamma"],
                                                                             dict(self.options)))
                if v.shape != (n, H + 1) or not bool(torch.isfinite(v).all()):
                    raise ValueError(f"plug-in {self.name}: ctx.critic_values must return finite values of shape "
                                     f"[{n}, {H + 1}], got {list(v.shape)}")
                kw[key] = torch.where(batch.mask, v[:, :H].to(self.dtype), torch.zeros((), dtype=self.dtype))
            elif key in ("gamma", "lam"):
                kw[key] = float(self.options[key])
            elif key == "old_log_prob":
                kw[key] = torch.where(batch.mask, batch.logp.to(self.dtype), torch.zeros((), dtype=self.dtype))
        return kw

    def _call_verl(self, limit, tlr, m, index, shape, extra):
        if self._keywords:
            kw = {"token_level_rewards": tlr, "response_mask": m}
            if self._accepts_index:
                kw["index"] = index
            out = self._invoke(limit, (), {**kw, **extra})
        else:
            out = self._invoke(limit, (tlr, m, index), extra)
        if isinstance(out, (tuple, list)):
            if not out:
                raise PluginError(f"plug-in {self.name} returned an empty {type(out).__name__}")
            out = out[0]
        return self._check(out, shape)

    def _invoke(self, limit: TimeLimit, args: tuple, kwargs: dict):
        return limit.call(lambda: self.fn(*args, **kwargs))

    def _check(self, out, shape) -> torch.Tensor:
        if not isinstance(out, (torch.Tensor, np.ndarray)):
            raise PluginError(f"plug-in {self.name} returned {type(out).__name__}, expected a tensor of shape "
                              f"{list(shape)}")
        a = torch.as_tensor(out)
        if tuple(a.shape) != tuple(shape):
            raise PluginError(f"plug-in {self.name} returned advantages of shape {list(a.shape)}, expected "
                              f"{list(shape)}")
        if not (a.is_floating_point() or a.dtype in (torch.int32, torch.int64, torch.bool)):
            raise PluginError(f"plug-in {self.name} returned dtype {a.dtype}, expected floating point")
        a = a.to(torch.float64)
        if not bool(torch.isfinite(a).all()):
            bad = ~torch.isfinite(a)
            where = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise PluginError(f"plug-in {self.name} returned a non-finite value {float(a[where])} at index "
                              f"{list(where)} (of {int(bad.sum())} non-finite)")
        return a


def _plugin_options(context: tuple, defaults: dict) -> dict[str, Option]:
    """The option table of a plug-in taking the context keywords ``context``."""
    table = {"layout": _LAYOUT_OPTION}
    if "gamma" in context or "values" in context:
        table["gamma"] = Option(defaults.get("gamma", 1.0), "float", "discount passed as gamma (and the critic's)",
                                low=0.0, high=1.0)
    if "lam" in context:
        table["lam"] = Option(defaults.get("lam", 1.0), "float", "GAE lambda passed as lam", low=0.0, high=1.0)
    if "values" in context:
        table.update({"critic": Option("exact", "choice", "where values come from", choices=CRITICS),
                      **CRITIC_OPTIONS})
    return {**table, **COMMON_OPTIONS}


def _signature_form(fn, label: str) -> tuple[str, bool, bool, tuple, dict]:
    """``(form, call by keyword, accepts index, context keywords, option defaults)`` from the
    function's signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ValueError(f"plug-in {label}: cannot read its signature ({e})") from None
    params = sig.parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    context = tuple(k for k in CONTEXT_KEYWORDS if k in params
                    and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY)
    defaults = {}
    for k in ("gamma", "lam"):
        d = params[k].default if k in params else None
        if isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= float(d) <= 1.0:
            defaults[k] = float(d)
    if "token_level_rewards" in params and "response_mask" in params:
        return "verl", True, "index" in params or has_var_kw, context, defaults
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params.values() if p.kind in positional and p.default is inspect.Parameter.empty
                and p.name not in context]
    if len(required) == 3:
        return "verl", False, True, context, defaults
    if len(required) == 2:
        return "simple", False, False, context, defaults
    raise ValueError(f"plug-in {label}: cannot tell its form from its signature {sig}: it needs 3 required "
                     f"positional parameters (verl form: token_level_rewards, response_mask, index) or 2 "
                     f"(simple form: rewards, group_ids), besides context keywords ({', '.join(CONTEXT_KEYWORDS)}); "
                     f"it has {len(required)} ({', '.join(required) or 'none'})")


def load_function(path: str, fn_name: str, timeout: float | None = DEFAULT_TIMEOUT, what: str = "plug-in"):
    """The callable ``fn_name`` of the Python file ``path``, imported as a module of its own under a
    wall-clock limit of ``timeout`` seconds (``None``: none). ``ValueError`` naming ``what path:fn_name``
    for a missing file or function; :class:`PluginError` when the import fails (raises anything but
    ``KeyboardInterrupt``, ``SystemExit`` included, or runs past the limit)."""
    label = f"{path}:{fn_name}"
    if not os.path.isfile(path):
        raise ValueError(f"{what} {label}: file not found: {path!r} (relative to {os.getcwd()})")
    _check_timeout(timeout, f"{what} {label}")
    module_name = "tpg_plugin_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ValueError(f"{what} {label}: cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    try:
        call_with_time_limit(lambda: mod_spec.loader.exec_module(module), timeout, label, f"importing {path!r}")
    except PluginError:
        sys.modules.pop(module_name, None)
        raise
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        found = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module_name)
        status = "not found" if fn is None else "not callable"
        raise ValueError(f"{what} {label}: function {fn_name!r} {status} in {path!r}; it defines "
                         f"{', '.join(found) or 'no public functions'}")
    return fn


def load_plugin(spec: str, dtype: torch.dtype = torch.float64,
                timeout: float | None = DEFAULT_TIMEOUT) -> PluginEstimator:
    """The estimator of a plug-in ``FILE.py:FUNCTION`` (optionally ``:key=value,...``: ``agg``, ``kl``,
    ``kl_beta``, ``layout`` and the options of the context keywords it takes). See the module docstring.

    ``timeout``: seconds for the import and for each call (``None``: no limit). Raises
    ``ValueError`` for a bad spec and :class:`PluginError` when importing the file fails (raises
    anything but ``KeyboardInterrupt``, ``SystemExit`` included, or runs past the limit)."""
    match = PLUGIN_SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"a plug-in spec is FILE.py:FUNCTION[:key=value,...], got {spec!r}")
    path, fn_name = match["path"], match["fn"]
    label = f"{path}:{fn_name}"
    options = parse_options(match["opts"] or "", label)
    fn = load_function(path, fn_name, timeout)
    return _wrap(fn, label, dtype, timeout, label, options)


def _wrap(fn, label: str, dtype, timeout, source: str | None, options: dict) -> PluginEstimator:
    """The estimator of ``fn``: its form read from its signature (:func:`_signature_form`)."""
    form, keywords, accepts_index, context, defaults = _signature_form(fn, label)
    return PluginEstimator(fn, label, form, dtype=dtype, keywords=keywords, accepts_index=accepts_index,
                           context=context, defaults=defaults, timeout=timeout, source=source, **options)


def callable_label(fn) -> str:
    """The name a callable's records carry: ``module.qualname`` (``functools.partial(...)`` around a
    function's label; the class's ``module.qualname`` for a callable object)."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({callable_label(fn.func)})"
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(fn).__name__)}"


def callable_source(fn) -> str | None:
    """``FILE.py:FUNCTION`` from which :func:`load_plugin` loads the same function: a function defined
    at the top level of a ``.py`` file (not a lambda, a nested function or a callable object); ``None``
    otherwise. The path is absolute."""
    if not inspect.isfunction(fn) or fn.__qualname__ != fn.__name__ or not fn.__name__.isidentifier():
        return None
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        return None
    if not path or not path.endswith(".py") or not os.path.isfile(path):
        return None
    return f"{os.path.abspath(path)}:{fn.__name__}"


def plugin_from_callable(fn, dtype: torch.dtype = torch.float64, timeout: float | None = DEFAULT_TIMEOUT,
                         label: str | None = None, **options) -> PluginEstimator:
    """The estimator of a Python callable, wrapped exactly as a plug-in file's function (see the module
    docstring: verl form or simple form from its signature, context keywords, the same options).

        est = plugin_from_callable(my_grpo, layout="batch:2x3", agg="token-mean")
        tpg.verify(mdp, policy, [est, "grpo"])

    Args:
        fn: a function (or any callable with a readable signature).
        dtype: the dtype of the tensors it receives (float64 or float32).
        timeout: seconds per call (``None``: no limit), as for plug-in files.
        label: the name in records and tables (default :func:`callable_label`: ``module.qualname``).
        options: ``layout``, ``agg``, ``kl``, ``kl_beta`` and the options of the context keywords it takes,
            as keyword arguments (strings or values: ``layout="batch:2x3"``, ``gamma=0.9``).

    Raises ``ValueError`` naming the callable for something that is not callable, a signature that
    fits neither form, or an unknown option."""
    if not callable(fn) or isinstance(fn, type):
        raise ValueError(f"plugin_from_callable needs a function (or a callable object), got {fn!r}")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ValueError(f"label must be a non-empty string, got {label!r}")
    _check_timeout(timeout, f"plug-in {label or callable_label(fn)}")
    return _wrap(fn, label or callable_label(fn), dtype, timeout, callable_source(fn), options)


# -- the probe ----------------------------------------------------------------------------------

class _ProbeContext:
    """A deterministic context: every value hook returns the case's mean reward (critic values
    are 0 from the complete response on, as a real critic's)."""

    exact = False

    def __init__(self, value: float, dtype: torch.dtype):
        self.value = value
        self.dtype = dtype
        self.tokens_sampled = 0
        self._gen = torch.Generator().manual_seed(0)

    def greedy_rm(self, prompt_b):
        return torch.full((prompt_b.numel(),), self.value, dtype=self.dtype)

    def prompt_values(self, prompt_b):
        return torch.full((prompt_b.numel(),), self.value, dtype=self.dtype)

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, num_continuations):
        return torch.full((prompt_b.numel(),), self.value, dtype=self.dtype)

    def critic_values(self, batch, kind, gamma, options):
        live = torch.arange(batch.horizon + 1).unsqueeze(0) < batch.length.unsqueeze(1)
        return torch.where(live, torch.tensor(self.value, dtype=self.dtype), torch.zeros((), dtype=self.dtype))

    def random_generator(self):
        return self._gen


def _case_batch(rewards, groups, lengths, horizon: int = 4, dtype=torch.float64) -> ResponseBatch:
    B = len(rewards)
    length = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(horizon).unsqueeze(0) < length.unsqueeze(1)
    rm = torch.tensor(rewards, dtype=dtype)
    tokens = torch.where(mask, torch.ones(B, horizon, dtype=torch.long), torch.zeros(B, horizon, dtype=torch.long))
    logp = torch.where(mask, torch.full((B, horizon), math.log(0.5), dtype=dtype), torch.zeros((), dtype=dtype))
    ref = torch.where(mask, logp - 0.05 * torch.arange(1, horizon + 1, dtype=dtype), torch.zeros((), dtype=dtype))
    tlr = torch.zeros(B, horizon, dtype=dtype)
    tlr[torch.arange(B), length - 1] = rm
    group = torch.tensor(groups, dtype=torch.long)
    return ResponseBatch(prompt=group.clone(), group=group, batch=torch.zeros(B, dtype=torch.long), tokens=tokens,
                         mask=mask, logp=logp, token_level_rewards=tlr, rm=rm, length=length, ref_logp=ref,
                         gamma=1.0, vocab_size=3, horizon=horizon,
                         token_rewards=tlr.clone())


def _ragged(n: int) -> list[int]:
    return [(4, 3, 4, 2)[i % 4] for i in range(n)]


# Rewards that binary floating point cannot hold exactly (0.1, 0.7, -0.884), in identical-reward
# groups of 3 and 8: a float32 group mean may then differ from the rewards by an ulp, and a
# std-normalised advantage (r - mean) / (std + eps) blows that ulp up to |A| ~ 0.05 (measured with
# torch 2.13 on CPU: exact for groups of 3, 0.056 for 0.7 and -0.884 in groups of 8).
_IDENTICAL_REWARDS = [0.1] * 3 + [0.7] * 3 + [-0.884] * 3 + [0.7] * 8 + [-0.884] * 8
_IDENTICAL = dict(rewards=_IDENTICAL_REWARDS, groups=[0] * 3 + [1] * 3 + [2] * 3 + [3] * 8 + [4] * 8,
                  lengths=_ragged(len(_IDENTICAL_REWARDS)))
_F32_REWARDS = [0.1, 0.7, -0.884] + [0.7] * 3 + [-0.884] * 8
_F32 = dict(rewards=_F32_REWARDS, groups=[0] * 3 + [1] * 3 + [2] * 8, lengths=_ragged(len(_F32_REWARDS)))
_BASE = dict(rewards=[1.0, 0.0, 0.5, 2.0], groups=[0, 0, 0, 0], lengths=[4, 3, 4, 2])
_CASES = [
    ("identical", "identical rewards within each group: 0.1, 0.7, -0.884 (not exact in binary) in groups of 3, "
                  "0.7 and -0.884 in groups of 8 (value: max|A|)", _IDENTICAL),
    ("singleton", "two groups of one response each",
     dict(rewards=[1.0, 0.5], groups=[0, 1], lengths=[3, 4])),
    ("all_zero", "a group of 4 with all rewards 0",
     dict(rewards=[0.0, 0.0, 0.0, 0.0], groups=[0, 0, 0, 0], lengths=[4, 3, 4, 2])),
    ("padding", "very different lengths (1..4) in one group: are padded positions zero?",
     dict(rewards=[1.0, 0.0, 0.5, 2.0], groups=[0, 0, 0, 0], lengths=[1, 4, 2, 3])),
]
#: Probe statuses of a row.
PROBE_STATUSES = ("ok", "flagged", "error")


def identical_tolerance(dtype: torch.dtype, rewards) -> float:
    """The largest ``|A|`` accepted on identical-reward groups: ``max(1e-9, 64 eps) * max(1, max|R|)``
    with ``eps`` the dtype's machine epsilon (7.6e-6 in float32, 1e-9 in float64): a group mean
    off by an ulp moves a plain centred advantage by an ulp, far below it; dividing that ulp by a
    std of the same size (plus GRPO's 1e-6) lands far above it."""
    eps = torch.finfo(dtype).eps
    return max(1e-9, 64 * eps) * max(1.0, max(abs(float(r)) for r in rewards))


def _run(est: Estimator, case: dict, scale: float = 1.0, dtype=torch.float64):
    rewards = [r * scale for r in case["rewards"]]
    batch = _case_batch(rewards, case["groups"], case["lengths"], dtype=dtype)
    value = sum(rewards) / len(rewards)
    out = est(batch, _ProbeContext(value, dtype))
    pad = out.info.get("raw_padding_max_abs", float(out.advantages.abs().masked_fill(batch.mask, 0).max()))
    return out.advantages.to(torch.float64), pad, batch


def _row(case: str, description: str, spec_case: dict) -> dict:
    return {"case": case, "description": description, "rewards": list(spec_case["rewards"]),
            "groups": list(spec_case["groups"]), "lengths": list(spec_case["lengths"]), "advantages": None,
            "max_abs": None, "padding_zero": None, "value": None, "flag": "", "status": "ok"}


def probe(spec, dtype: torch.dtype = torch.float64, timeout: float | None = DEFAULT_TIMEOUT) -> list[dict]:
    """Run an estimator (a spec string, a plug-in ``FILE.py:FUNCTION``, or an Estimator) on edge
    cases and record what it returns; one dict per case with ``case``, ``description``,
    ``rewards``, ``groups``, ``lengths``, ``advantages`` (each response's first-token advantage),
    ``max_abs``, ``padding_zero``, ``value`` (the case's measurement), ``flag`` (empty when
    nothing looks wrong, ``error: ...`` when the case raised) and ``status`` (``ok``, ``flagged``
    or ``error``). Float32 plug-ins are loaded again in float32 for the comparison; ``timeout``
    is the plug-in's time limit per call (and import).

    Flags: identical rewards with ``max|A|`` above :func:`identical_tolerance`; all-zero rewards
    with ``max|A| > 1e-12``; non-zero raw output on padding; ``max|A|`` scaling by neither 1 nor
    the reward scale (rel. 1e-3); float32 and float64 advantages differing by more than
    ``1e-4 max(1, max|A_64|)``."""
    from .registry import get_estimator, is_plugin_spec

    def make(dt):
        if isinstance(spec, Estimator):
            return spec
        return load_plugin(spec, dtype=dt, timeout=timeout) if is_plugin_spec(spec) else get_estimator(spec)

    est = make(dtype)
    rows = []

    def attempt(row, fn):
        try:
            fn(row)
        except ValueError as e:
            row["flag"] = f"error: {e}"
        row["status"] = "ok" if not row["flag"] else "error" if row["flag"].startswith("error:") else "flagged"
        rows.append(row)

    for name, description, case in _CASES:
        def run_case(row, case=case, name=name):
            adv, pad, _ = _run(est, case, dtype=dtype)
            row["advantages"] = [float(f"{float(a):.6g}") for a in adv[:, 0]]
            row["max_abs"] = float(adv.abs().max())
            row["padding_zero"] = pad == 0
            if name == "identical":
                tol = identical_tolerance(dtype, case["rewards"])
                row["value"] = row["max_abs"]
                if row["max_abs"] > tol:
                    row["flag"] = (f"non-zero advantage for identical rewards (max |A| {row['max_abs']:.3g} > "
                                   f"{tol:.2g} in {str(dtype).replace('torch.', '')})")
            elif name == "all_zero" and row["max_abs"] > 1e-12:
                row["flag"] = "non-zero advantage for all-zero rewards"
            if not row["flag"] and pad != 0:
                row["flag"] = f"non-zero values on padded positions (max {pad:.3g})"

        attempt(_row(name, description, case), run_case)

    for scale in (1e6, 1e-6):
        def run_scale(row, scale=scale):
            base, _, _ = _run(est, _BASE, dtype=dtype)
            adv, pad, _ = _run(est, _BASE, scale=scale, dtype=dtype)
            row["advantages"] = [float(f"{float(a):.6g}") for a in adv[:, 0]]
            row["max_abs"] = float(adv.abs().max())
            row["padding_zero"] = pad == 0
            b = float(base.abs().max())
            ratio = row["max_abs"] / b if b > 0 else float("nan")
            row["value"] = ratio
            if b > 0 and not (math.isclose(ratio, 1.0, rel_tol=1e-3) or math.isclose(ratio, scale, rel_tol=1e-3)):
                row["flag"] = (f"max|A| scales by {ratio:.4g} for rewards x{scale:g}: neither scale-invariant "
                               f"nor linear (an epsilon floor?)")

        attempt(_row(f"scale_{scale:g}", f"the base group with rewards x{scale:g} (value: max|A| ratio to x1)",
                     {**_BASE, "rewards": [r * scale for r in _BASE["rewards"]]}), run_scale)

    def run_dtype(row):
        est64 = make(torch.float64)
        est32 = make(torch.float32)
        a64, _, _ = _run(est64, _F32, dtype=torch.float64)
        a32, _, _ = _run(est32, _F32, dtype=torch.float32)
        gap = (a64 - a32).abs().amax(1)
        diff = float(gap.max())
        row["advantages"] = [float(f"{float(a):.6g}") for a in a32[:, 0]]
        row["max_abs"] = float(a32.abs().max())
        row["value"] = diff
        if diff > 1e-4 * max(1.0, float(a64.abs().max())):
            worst = int(gap.argmax())
            g = _F32["groups"][worst]
            same = len({r for r, gg in zip(_F32["rewards"], _F32["groups"]) if gg == g}) == 1
            where = f" (largest on an identical-reward group of {_F32['groups'].count(g)})" if same else ""
            row["flag"] = f"float32 differs from float64 by {diff:.3g}{where}"

    attempt(_row("float32_vs_float64", "groups of rewards 0.1, 0.7, -0.884 (one mixed group of 3, identical ones "
                 "of 3 and 8) in float32 and float64 (value: max abs difference)", _F32), run_dtype)
    return rows


def probe_report(spec, rows: list[dict], dtype: torch.dtype = torch.float64) -> dict:
    """The JSON document of ``tpg probe --json`` (schema ``tpg-probe/1``)::

        {"schema": "tpg-probe/1", "spec": str, "dtype": "float64" | "float32",
         "cases": [row, ...],            # probe()'s rows, each with its "status"
         "flagged": [{"case": str, "status": "flagged" | "error", "flag": str}, ...],
         "ok": bool}                     # no case flagged or errored (tpg probe exits 0 iff ok)
    """
    flagged = [{"case": r["case"], "status": r["status"], "flag": r["flag"]} for r in rows if r["status"] != "ok"]
    return {"schema": "tpg-probe/1", "spec": spec if isinstance(spec, str) else getattr(spec, "spec", repr(spec)),
            "dtype": str(dtype).replace("torch.", ""), "cases": rows, "flagged": flagged, "ok": not flagged}


def _runs(values: list[float]) -> str:
    """``a, b xk, ...``: equal neighbours (at 4 significant digits) collapsed."""
    parts: list[list] = []
    for v in values:
        text = f"{v:.4g}"
        if parts and parts[-1][0] == text:
            parts[-1][1] += 1
        else:
            parts.append([text, 1])
    return ", ".join(t if k == 1 else f"{t} x{k}" for t, k in parts)


def format_probe(rows: list[dict]) -> str:
    """A plain-text table of :func:`probe`'s rows (runs of equal values written ``v xk``), a legend of its
    columns and of the cases, and a last line naming the flagged cases."""
    header = ("case", "rewards", "lengths", "advantages (first token)", "value", "flag")
    table = []
    for r in rows:
        adv = "-" if r["advantages"] is None else _runs(r["advantages"])
        val = "" if r["value"] is None else f"{r['value']:.4g}"
        lengths = r["lengths"]
        lengths = (", ".join(str(x) for x in lengths) if len(lengths) <= 6
                   else f"{min(lengths)}..{max(lengths)} ({len(lengths)} responses)")
        table.append((r["case"], _runs(r["rewards"]), lengths,
                      adv, val, r["flag"] or "ok"))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    lines = [header, tuple("-" * w for w in widths)] + table
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
    legend = legend_lines({
        "case": "the edge case (described below)",
        "rewards": "the responses' rewards, group by group (v xk: k equal values in a row)",
        "lengths": "the responses' lengths in tokens (the batch is padded to the longest)",
        "advantages (first token)": "what the estimator returned for each response's first token",
        "value": "the case's measurement (named in its description; empty where the case has none)",
        "flag": "ok, or what looks wrong; error: the call raised",
    }) + legend_lines({r["case"]: r.get("description", "") for r in rows}, title="cases:")
    bad = [r["case"] for r in rows if r.get("status", "ok" if not r["flag"] else "flagged") != "ok"]
    summary = f"{len(bad)} of {len(rows)} cases flagged: {', '.join(bad)}" if bad else f"all {len(rows)} cases ok"
    return "\n".join([text, *legend, summary])


__all__ = ["PluginEstimator", "PluginError", "load_plugin", "load_function", "plugin_from_callable", "callable_label",
           "callable_source", "call_with_time_limit", "parse_layout", "layout_name", "TimeLimit", "probe", "probe_report",
           "format_probe", "identical_tolerance", "DEFAULT_TIMEOUT", "CONTEXT_KEYWORDS", "LAYOUTS"]
