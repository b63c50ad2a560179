"""The verification harness: name estimators, get verdicts against the exact gradient.

:func:`verify` runs each estimator on one (MDP, policy) pair, in exact mode (the expectation over
the whole sample space, :mod:`tpg.verify.exact_moments`) or in Monte Carlo mode (``N`` batches and
a calibrated test, :mod:`tpg.verify.montecarlo`), and returns one record (a JSON-ready dict) per
estimator:

    estimator, spec, options, mode, group_size, layout, dtype, target, verdict, scale, scale_ci,
    cosine, rel_bias, rel_residual, p_value, p_value_direction, alpha, n_samples, variance_trace,
    tokens_per_batch, hook_tokens_per_batch, tokens_exact, mdp, error

``target`` is ``grad J``, or ``grad J - beta grad KL_seq`` for an estimator with a KL option
(``KL_seq = E[sum_t log pi(w_t|s_t) - log pi_ref(w_t|s_t)]``, the exact sequence KL, against a
reference policy: the one given, or a seeded perturbation of the policy). ``variance_trace`` is
``tr Cov[g]`` of the single-batch gradient (exact, or its unbiased estimate in Monte Carlo mode).
``tokens_per_batch`` counts the batch's response tokens plus those sampled by the hooks
(continuations, greedy responses); in exact mode the hook part is measured on sampled batches
(``tokens_exact = False``).

With a behaviour policy or a policy loss (``verify(..., behaviour=, loss=)``, :mod:`tpg.offpolicy`) the
expectation is over batches sampled from the behaviour, the gradient is taken through the loss, and the
records also carry ``behaviour, loss, hooks, mismatch, behaviour_info, kept_prob``
(:mod:`tpg.offpolicy.record`).

A plug-in verified with ``dtype=torch.float32`` is verified in float64 too; when the verdicts
differ both records are returned (the float32 one second), otherwise the float32 one only.
"""

from __future__ import annotations

import copy
import math
import sys

import torch

from ..estimators import Estimator, expand_spec, get_estimator
from ..estimators.plugin import DEFAULT_TIMEOUT, PluginError, load_plugin
from ..estimators.registry import is_plugin_spec
from ..exact.engine import exact_kl, solve
from .context import ExactContext, MonteCarloContext
from .exact_moments import DEFAULT_MAX_ROWS, batch_layout, exact_moments
from .montecarlo import mc_test, sample_gradient_terms
from .score import ParamMap
from .verdict import exact_verdict

MODES = ("exact", "mc")
DEFAULT_SAMPLES = 4000
DEFAULT_ALPHA = 0.01
#: Batches sampled to measure the tokens that hooks spend, in exact mode.
TOKEN_PROBE_BATCHES = 256
_SAMPLING_HOOKS = ("continuation_values", "greedy_rm")


def default_reference(policy, seed: int = 0, scale: float = 0.5):
    """A reference policy for KL options: a copy of ``policy`` with ``N(0, scale^2)`` added to every
    parameter (seeded), so that ``pi != pi_ref`` and the KL gradient is not trivially zero."""
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(int(seed) + 4242)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return ref


def resolve_specs(estimators) -> list[tuple[object, bool]]:
    """``[(spec or Estimator, from_all)]`` from a spec, a ``;``-list, ``all``, or a list of them."""
    items = [estimators] if isinstance(estimators, (str, Estimator)) else list(estimators)
    if not items:
        raise ValueError("no estimator given")
    out = []
    for item in items:
        if isinstance(item, Estimator):
            out.append((item, False))
            continue
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"an estimator spec must be a non-empty string, got {item!r}")
        from_all = item.strip().partition(":")[0].strip() == "all"
        if from_all or ";" in item:
            out += [(s, from_all) for s in expand_spec(item)]
        else:
            out.append((item.strip(), False))
    return out


def _is_plugin(spec) -> bool:
    return isinstance(spec, str) and is_plugin_spec(spec)


def _load(spec, dtype, plugin_timeout):
    if not isinstance(spec, str):
        return spec
    return load_plugin(spec, dtype=dtype, timeout=plugin_timeout) if _is_plugin(spec) else get_estimator(spec)


def _kl_of(est) -> tuple[str, float]:
    opts = getattr(est, "options", {}) or {}
    return str(opts.get("kl", "none")), float(opts.get("beta", 0.0) or 0.0)


def _json_options(est) -> dict:
    out = {}
    for k, v in (getattr(est, "options", {}) or {}).items():
        if isinstance(v, tuple):
            v = ":".join(str(x) for x in v if x is not None)
        elif not isinstance(v, (bool, int, float, str)) and v is not None:
            v = str(v)
        out[k] = v
    return out


def _num(x):
    """A JSON-safe float: ``None`` for missing and non-finite values (``rel_bias`` when grad J = 0)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class _Problem:
    """Everything shared by the estimators verified on one (MDP, policy): the exact solution, the
    parameter map, the contexts, the KL target."""

    def __init__(self, mdp, policy, seed: int, ref_policy):
        self.mdp, self.policy, self.seed = mdp, policy, int(seed)
        self.sol = solve(mdp, policy)
        self.grad_j = self.sol.flat_grad().to(torch.float64)
        self.pmap = ParamMap(policy, mdp.tree)
        self.pi = self.sol.logp.exp()
        self._ref = ref_policy
        self._ctx: ExactContext | None = None
        self._kl_grad: torch.Tensor | None = None

    @property
    def ref_policy(self):
        if self._ref is None:
            self._ref = default_reference(self.policy, self.seed)
        return self._ref

    def exact_context(self, ref_policy=None) -> ExactContext:
        if self._ctx is None:
            self._ctx = ExactContext(self.mdp, self.policy, seed=self.seed, sol=self.sol)
        self._ctx.ref_policy = ref_policy
        return self._ctx

    def mc_context(self, generator: torch.Generator, ref_policy=None) -> MonteCarloContext:
        return MonteCarloContext(self.mdp, self.policy, generator=generator, seed=self.seed, ref_policy=ref_policy,
                                 sol=self.sol)

    def target(self, est) -> tuple[torch.Tensor, str]:
        kind, beta = _kl_of(est)
        if kind == "none" or beta == 0.0:
            return self.grad_j, "grad J"
        if self._kl_grad is None:
            _, grads = exact_kl(self.mdp, self.policy, self.ref_policy)
            self._kl_grad = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
        return self.grad_j - beta * self._kl_grad, f"grad J - {beta:g} grad KL"


def _verify_one(prob: _Problem, est, spec_text: str, mode: str, group_size: int, samples: int, seed: int,
                dtype, alpha: float, max_rows: int, off=None) -> dict:
    if hasattr(est, "reset"):
        est.reset()
    kind, _ = _kl_of(est)
    ref = prob.ref_policy if kind != "none" else None
    target, target_name = prob.target(est)
    layout, G = batch_layout(est, group_size)
    rec = {"estimator": getattr(est, "name", spec_text), "spec": getattr(est, "spec", spec_text),
           "options": _json_options(est), "mode": mode, "group_size": G, "layout": layout,
           "dtype": str(dtype).replace("torch.", ""), "target": target_name, "mdp": prob.mdp.describe()}
    if off is not None:  # a behaviour policy and/or a policy loss: tpg.offpolicy
        from ..offpolicy.record import offpolicy_result
        rec.update(offpolicy_result(prob, est, off, mode, group_size, samples, seed, dtype, alpha, max_rows, ref,
                                    target))
    elif mode == "exact":
        ctx = prob.exact_context(ref)
        mom = exact_moments(prob.mdp, prob.policy, est, group_size, dtype=torch.float64, with_cov=False,
                            max_rows=max_rows, ref_policy=ref, context=ctx, param_map=prob.pmap)
        v = exact_verdict(mom.mean, target, dtype=dtype)
        hook_tokens, tokens_exact = 0.0, True
        if any(h in mom.hook_calls for h in _SAMPLING_HOOKS):
            if hasattr(est, "reset"):
                est.reset()
            gen = torch.Generator().manual_seed(int(seed) + 1)
            gs = sample_gradient_terms(prob.mdp, prob.policy, est, TOKEN_PROBE_BATCHES, group_size, generator=gen,
                                       ref_policy=ref, context=prob.mc_context(gen, ref))
            hook_tokens, tokens_exact = gs.hook_tokens_per_batch, False
        rec.update(v.as_dict())
        rec.update({"alpha": None, "n_samples": mom.num_batches, "variance_trace": mom.variance_trace,
                    "tokens_per_batch": mom.tokens_per_batch + hook_tokens, "hook_tokens_per_batch": hook_tokens,
                    "tokens_exact": tokens_exact})
    else:
        gen = torch.Generator().manual_seed(int(seed))
        ctx = prob.mc_context(gen, ref)
        gs = sample_gradient_terms(prob.mdp, prob.policy, est, samples, group_size, generator=gen, ref_policy=ref,
                                   context=ctx)
        res = mc_test(gs, target, prob.pi, prob.pmap, alpha=alpha, seed=seed)
        rec.update(res.verdict.as_dict())
        rec.update({"alpha": alpha, "n_samples": samples, "variance_trace": res.variance_trace,
                    "tokens_per_batch": gs.tokens_per_batch, "hook_tokens_per_batch": gs.hook_tokens_per_batch,
                    "tokens_exact": False})
    rec["error"] = None
    for k in ("scale", "cosine", "rel_bias", "rel_residual", "p_value", "p_value_direction", "variance_trace"):
        rec[k] = _num(rec.get(k))
    if rec.get("scale_ci") is not None:
        rec["scale_ci"] = [_num(x) for x in rec["scale_ci"]]
    return rec


def _error_record(spec_text: str, mode: str, group_size: int, dtype, mdp, exc: Exception) -> dict:
    return {"estimator": spec_text, "spec": spec_text, "options": {}, "mode": mode, "group_size": group_size,
            "layout": None, "dtype": str(dtype).replace("torch.", ""), "target": None, "mdp": mdp.describe(),
            "verdict": "error", "scale": None, "scale_ci": None, "cosine": None, "rel_bias": None,
            "rel_residual": None, "p_value": None, "p_value_direction": None, "alpha": None, "n_samples": None,
            "variance_trace": None, "tokens_per_batch": None, "hook_tokens_per_batch": None, "tokens_exact": None,
            "error": str(exc)}


def verify(mdp, policy, estimators, group_size: int = 2, mode: str = "exact", samples: int = DEFAULT_SAMPLES,
           seed: int = 0, dtype=torch.float64, alpha: float = DEFAULT_ALPHA, max_rows: int = DEFAULT_MAX_ROWS,
           ref_policy=None, progress: bool = False, on_error: str = "raise",
           plugin_timeout: float | None = DEFAULT_TIMEOUT, behaviour=None, loss=None,
           hooks: str = "behaviour") -> list[dict]:
    """Verdicts of ``estimators`` on ``(mdp, policy)``; one record per estimator (see the module docstring).

    Args:
        estimators: a spec (``NAME[:key=value,...]``, ``all``, ``FILE.py:FUNCTION``), a list of specs,
            or :class:`~tpg.estimators.Estimator` objects.
        group_size: ``G`` for group estimators (and the batch size of batch-coupled ones).
        mode: ``exact`` (enumerate the sample space) or ``mc`` (``samples`` batches, level ``alpha``).
        seed: seeds the Monte Carlo batches, fixed critics and the default reference policy.
        dtype: the dtype fed to plug-ins (built-ins always run in float64).
        max_rows: the exact mode's size guard (responses in the stacked sample space).
        ref_policy: the reference policy of KL options (default: a seeded perturbation of ``policy``).
        progress: a tqdm bar on stderr (only when stderr is a terminal).
        on_error: ``raise`` (``ValueError``), ``record`` (a record with ``verdict = "error"``), or
            ``record_all`` (record errors of specs expanded from ``all`` and failures of a plug-in's
            own code, :class:`~tpg.estimators.plugin.PluginError`; raise the others).
        plugin_timeout: seconds a plug-in's import or one call may take (``None``: no limit).
        behaviour: the policy ``mu`` the batches are sampled from (:mod:`tpg.offpolicy.behaviour`: a spec such
            as ``top_p:0.9``, a policy on the same tree, or a ``[N_nt, V]`` log-probability table); the
            target stays ``grad J(policy)``. ``None``: on-policy.
        loss: the policy loss the gradient is taken through (:mod:`tpg.offpolicy.losses`: ``pg``,
            ``is_token``, ``is_seq``, ``tis:C``, ``mis:lo,hi``, ``ppo_clip:eps``, ``gspo``, ``cispo``, a plug-in
            ``FILE.py:FUNCTION`` or a callable). ``None``: ``pg`` when a behaviour is given.
        hooks: with a behaviour or loss, whose context answers the estimators' hooks: ``behaviour`` (mu:
            the engine's continuations, a critic of mu's returns) or ``policy`` (pi).
    With ``behaviour`` or ``loss`` the records carry ``behaviour``, ``loss``, ``hooks``, ``mismatch``,
    ``behaviour_info`` and ``kept_prob`` (:mod:`tpg.offpolicy.record`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if mode == "mc" and (not isinstance(samples, int) or samples < 8):
        raise ValueError(f"samples must be an integer >= 8 in Monte Carlo mode, got {samples!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dtype}")
    if on_error not in ("raise", "record", "record_all"):
        raise ValueError(f"on_error must be raise, record or record_all; got {on_error!r}")
    specs = resolve_specs(estimators)
    prob = _Problem(mdp, policy, seed, ref_policy)
    off = None
    if hooks != "behaviour" and behaviour is None and loss is None:
        raise ValueError(f"hooks={hooks!r} applies to off-policy verification only: give a behaviour or a loss")
    if behaviour is not None or loss is not None:
        from ..offpolicy.record import prepare_offpolicy
        off = prepare_offpolicy(mdp, policy, prob.sol, behaviour, loss, hooks)
    records: list[dict] = []
    bar = None
    if progress and sys.stderr.isatty() and len(specs) > 1:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), desc="verify", unit="estimator", file=sys.stderr, leave=False)
    try:
        for spec, from_all in specs:
            text = spec if isinstance(spec, str) else getattr(spec, "spec", repr(spec))
            if bar is not None:
                bar.set_postfix_str(text[:40])
            try:
                est = _load(spec, torch.float64, plugin_timeout)
                rec = _verify_one(prob, est, text, mode, group_size, samples, seed, torch.float64, alpha, max_rows,
                                  off)
                if _is_plugin(spec) and dtype == torch.float32:
                    est32 = _load(spec, torch.float32, plugin_timeout)
                    rec32 = _verify_one(prob, est32, text, mode, group_size, samples, seed, torch.float32, alpha,
                                        max_rows, off)
                    rec32["float64_verdict"] = rec["verdict"]
                    records += [rec, rec32] if rec32["verdict"] != rec["verdict"] else [rec32]
                else:
                    records.append(rec)
            except ValueError as exc:
                if on_error == "raise" or (on_error == "record_all" and not from_all
                                           and not isinstance(exc, PluginError)):
                    raise ValueError(f"{text}: {exc}") from exc
                records.append(_error_record(text, mode, group_size, dtype, mdp, exc))
                if off is not None:
                    from ..offpolicy.record import offpolicy_fields
                    records[-1].update(offpolicy_fields(off))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


# ------------------------------------------------------------------------------ presentation
def _fmt(x, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def format_records(records: list[dict]) -> str:
    """An aligned text table of :func:`verify`'s records."""
    mc = any(r["mode"] == "mc" for r in records)
    header = ["estimator", "G", "layout", "dtype", "verdict", "scale", "cosine", "rel_bias", "resid"]
    if mc:
        header += ["p(c=1)", "p(dir)", "scale CI"]
    header += ["tr Cov", "tokens/batch"]
    rows = []
    for r in records:
        row = [r["spec"], str(r["group_size"]), r.get("layout") or "-", r["dtype"], r["verdict"],
               _fmt(r["scale"], ".6g"),
               _fmt(r["cosine"], ".10f") if r["cosine"] is not None else "-", _fmt(r["rel_bias"], ".3g"),
               _fmt(r["rel_residual"], ".3g")]
        if mc:
            ci = r.get("scale_ci")
            row += [_fmt(r["p_value"], ".3g"), _fmt(r["p_value_direction"], ".3g"),
                    f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "-"]
        row += [_fmt(r["variance_trace"], ".4g"),
                (_fmt(r["tokens_per_batch"], ".4g") + ("" if r.get("tokens_exact", True) else "~"))
                if r["tokens_per_batch"] is not None else "-"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    notes = [f"{r['spec']}: {r['error']}" for r in records if r.get("error")]
    targets = sorted({r["target"] for r in records if r.get("target") and r["target"] != "grad J"})
    if targets:
        lines.append("target: " + "; ".join(targets) + " for estimators with a KL option, grad J otherwise")
    if any(r.get("tokens_exact") is False and r["mode"] == "exact" for r in records):
        lines.append("~ tokens spent by the hooks measured on sampled batches")
    if notes:
        lines.append("errors:")
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)
