"""The verification harness: name estimators, get verdicts against the exact gradient.

:func:`verify` runs each estimator on one (MDP, policy) pair, in exact mode (the expectation over
the whole sample space, :mod:`tpg.verify.exact_moments`) or in Monte Carlo mode (``N`` batches and
a calibrated test, :mod:`tpg.verify.montecarlo`), and returns one record (a JSON-ready dict) per
estimator:

    estimator, spec, options, mode, group_size, layout, dtype, target, verdict, scale, cosine,
    rel_bias, rel_residual, p_value, p_value_direction, p_value_adjusted, p_value_direction_adjusted,
    holm_family, scale_se, scale_ci, scale_ci_level, mde_rel_bias, mde_cosine, mde_scale, power,
    target_cosine, n_for_cosine, alpha, n_samples, variance_trace, tokens_per_batch,
    hook_tokens_per_batch, tokens_exact, mdp, engine, error

``verdict`` comes from the mode's own vocabulary (:data:`~tpg.verify.verdict.EXACT_VERDICTS`:
``unbiased``, ``scaled``, ``biased``, proofs by enumeration; :data:`~tpg.verify.verdict.MC_VERDICTS`:
``consistent``, ``consistent-scaled``, ``biased``, outcomes of tests), or ``error``. The Monte Carlo
fields (``None`` in exact mode) are described in :class:`~tpg.verify.verdict.Verdict`: raw and
Holm-adjusted p-values, the family size, the scale interval at its Holm level, and the power (the
minimal detectable effects at this ``N``, the ``N`` that detects a bias of cosine ``target_cosine``).
The Holm family of a Monte Carlo run is the scale and direction tests of every estimator it verifies
(``holm_family = 2 x`` the estimators run, a float32 plug-in counting twice), so that
P(any false alarm in the run) ``<= alpha``.

``target`` is ``grad J``, or ``grad J - beta grad KL_seq`` for an estimator with a KL option
(``KL_seq = E[sum_t log pi(w_t|s_t) - log pi_ref(w_t|s_t)]``, the exact sequence KL, against a
reference policy: the one given, or a seeded perturbation of the policy). With a target reward
(``verify(..., target_reward=)``, :mod:`tpg.mdp.objectives`) ``grad J`` reads ``grad J[NAME]``: the
gradient of ``J_target = E[R_target]``, and the ``mdp`` field names the derived MDP. ``variance_trace`` is
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

``engine`` says where the target and the rows of the gradients come from (:func:`verify`'s
``engine``, :func:`tpg.exact.choose_engine`): ``tree`` (the stored response tree; both modes) or
``markov`` (a :class:`~tpg.policies.SharedSoftmax` policy on compact rewards at any horizon: the
target is the Markov engine's exact ``grad J`` (:func:`tpg.exact.solve_markov`), each token's
gradient row is its state ``(t, prev)``, the hooks come from a
:class:`~tpg.verify.markov_context.MarkovMonteCarloContext`). The Markov path is Monte Carlo only:
exact mode enumerates the estimator's sample space, responses of the tree, and is refused there;
so is off-policy verification, whose behaviours live on the tree.
"""

from __future__ import annotations

import copy
import math

import torch

from .._progress import progress_bar, show_progress
from .._tables import legend_lines
from ..estimators import Estimator, expand_spec, get_estimator
from ..estimators.plugin import (DEFAULT_TIMEOUT, PluginError, callable_label, callable_source, load_function,
                                 load_plugin, plugin_from_callable)
from ..estimators.registry import is_plugin_spec
from ..exact.engine import exact_kl, solve
from ..exact.markov import choose_engine, markov_kl, solve_markov
from .context import ExactContext, MonteCarloContext
from .markov_context import MarkovMonteCarloContext
from .exact_moments import DEFAULT_MAX_ROWS, batch_layout, exact_moments
from .montecarlo import CALIBRATED_FROM_N, DEFAULT_POWER, TARGET_COSINE, family_verdicts, sample_gradient_terms
from .record_fields import (TOKEN_PROBE_BATCHES, exact_record_fields, mc_record_fields,  # noqa: F401 (re-exported)
                            probe_hook_tokens)
from .score import ParamMap, RowParamMap
from .verdict import EXACT_VERDICTS, MC_VERDICTS, Verdict

from .defaults import DEFAULT_ALPHA, DEFAULT_SAMPLES, MODES  # noqa: E402  (torch-free home: tpg verify --help)


def default_reference(policy, seed: int = 0, scale: float = 0.5):
    """A reference policy for KL options: a copy of ``policy`` with ``N(0, scale^2)`` added to every
    parameter (seeded), so that ``pi != pi_ref`` and the KL gradient is not trivially zero."""
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(int(seed) + 4242)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return ref


def _is_function(item) -> bool:
    """A user's callable (wrapped as a plug-in), not an Estimator, an Estimator class or a spec."""
    return callable(item) and not isinstance(item, (str, Estimator, type))


def resolve_specs(estimators) -> list[tuple[object, bool]]:
    """``[(spec, Estimator or callable, from_all)]`` from a spec, a ``;``-list, ``all``, an
    :class:`~tpg.estimators.Estimator` (or its class, built with its defaults), a Python callable (a
    plug-in function), or a list mixing them."""
    single = isinstance(estimators, (str, Estimator, type)) or _is_function(estimators)
    items = [estimators] if single else list(estimators)
    if not items:
        raise ValueError("no estimator given")
    out = []
    for item in items:
        if isinstance(item, type) and issubclass(item, Estimator):
            item = get_estimator(item)
        if isinstance(item, Estimator) or _is_function(item):
            out.append((item, False))
            continue
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"an estimator is a spec string, an Estimator or a Python callable, got {item!r}")
        from_all = item.strip().partition(":")[0].strip() == "all"
        if from_all or ";" in item:
            out += [(s, from_all) for s in expand_spec(item)]
        else:
            out.append((item.strip(), False))
    return out


def _is_plugin(spec) -> bool:
    """A plug-in file or a callable: user code, also run in float32 when asked."""
    return (isinstance(spec, str) and is_plugin_spec(spec)) or _is_function(spec)


def _load(spec, dtype, plugin_timeout):
    if _is_function(spec):
        return plugin_from_callable(spec, dtype=dtype, timeout=plugin_timeout)
    if not isinstance(spec, str):
        return spec
    return load_plugin(spec, dtype=dtype, timeout=plugin_timeout) if _is_plugin(spec) else get_estimator(spec)


def resolve_target_reward(target, timeout: float | None = DEFAULT_TIMEOUT):
    """The :class:`~tpg.mdp.objectives.TargetReward` of ``target``: ``None`` or a spec of
    :func:`tpg.mdp.objectives.target_reward` (``rm``, ``length_penalty:alpha``, ...), a Python callable, or
    ``FILE.py:FUNCTION`` (imported like a plug-in file, within ``timeout`` seconds)."""
    from ..mdp.objectives import target_reward
    from ..mdp.specs import parse_target_reward

    if isinstance(target, str):
        kind, args = parse_target_reward(target)
        if kind == "file":
            path, name = args
            fn = load_function(path, name, timeout, what="target reward")
            return target_reward(fn, name=f"{path}:{name}", spec=f"{path}:{name}")
    if _is_function(target):
        return target_reward(target, spec=callable_source(target))
    return target_reward(target)


def _kl_of(est) -> tuple[str, float]:
    opts = getattr(est, "options", {}) or {}
    return str(opts.get("kl", "none")), float(opts.get("kl_beta", 0.0) or 0.0)


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

    engine = "tree"

    def __init__(self, mdp, policy, seed: int, ref_policy):
        self.mdp, self.policy, self.seed = mdp, policy, int(seed)
        self.objective = "grad J"  # the gradient's name; verify() sets grad J[NAME] for a target reward
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
            return self.grad_j, self.objective
        if self._kl_grad is None:
            _, grads = self._kl(self.mdp, self.policy, self.ref_policy)
            self._kl_grad = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
        return self.grad_j - beta * self._kl_grad, f"{self.objective} - {beta:g} grad KL"

    _kl = staticmethod(exact_kl)


class _MarkovProblem(_Problem):
    """The same without a tree, for a shared policy on compact rewards at any horizon: the Markov
    engine's exact solution and KL, the rows ``(t, prev)`` (:class:`~tpg.verify.score.RowParamMap`),
    the Markov Monte Carlo context. No exact context: exact mode is refused before one is asked for."""

    engine = "markov"
    _kl = staticmethod(markov_kl)

    def __init__(self, mdp, policy, seed: int, ref_policy):
        self.mdp, self.policy, self.seed = mdp, policy, int(seed)
        self.sol = solve_markov(mdp, policy)
        self.grad_j = self.sol.flat_grad().to(torch.float64)
        self.pmap = RowParamMap(policy, mdp.horizon)
        self.pi = self.sol.logp.exp().reshape(-1, mdp.vocab_size)
        self._ref = ref_policy
        self._ctx = None
        self._kl_grad: torch.Tensor | None = None

    def exact_context(self, ref_policy=None):
        raise ValueError("exact mode needs the stored tree (engine=tree)")

    def mc_context(self, generator: torch.Generator, ref_policy=None) -> MarkovMonteCarloContext:
        return MarkovMonteCarloContext(self.mdp, self.policy, generator=generator, seed=self.seed,
                                       ref_policy=ref_policy, sol=self.sol)


def _verify_one(prob: _Problem, est, spec_text: str, mode: str, group_size: int, samples: int, seed: int,
                dtype, alpha: float, max_rows: int, off=None, target_cosine: float = TARGET_COSINE) -> dict:
    """One estimator's record; in Monte Carlo mode the test's :class:`~tpg.verify.montecarlo.MCResult`
    rides along under ``"_mc"`` until :func:`_family` decides the run's verdicts together."""
    if hasattr(est, "reset"):
        est.reset()
    kind, _ = _kl_of(est)
    ref = prob.ref_policy if kind != "none" else None
    target, target_name = prob.target(est)
    layout, G = batch_layout(est, group_size)
    rec = {"estimator": getattr(est, "name", spec_text), "spec": getattr(est, "spec", spec_text),
           "options": _json_options(est), "mode": mode, "group_size": G, "layout": layout,
           "dtype": str(dtype).replace("torch.", ""), "target": target_name, "mdp": prob.mdp.describe(),
           "engine": prob.engine}
    if off is not None:  # a behaviour policy and/or a policy loss: tpg.offpolicy
        from ..offpolicy.record import offpolicy_result
        rec.update(offpolicy_result(prob, est, off, mode, group_size, samples, seed, dtype, alpha, max_rows, ref,
                                    target, target_cosine))
    elif mode == "exact":
        ctx = prob.exact_context(ref)
        mom = exact_moments(prob.mdp, prob.policy, est, group_size, dtype=torch.float64, with_cov=False,
                            max_rows=max_rows, ref_policy=ref, context=ctx, param_map=prob.pmap)

        def probe(gen, batches):
            return sample_gradient_terms(prob.mdp, prob.policy, est, batches, group_size, generator=gen,
                                         ref_policy=ref, context=prob.mc_context(gen, ref))
        rec.update(exact_record_fields(mom, target, dtype, *probe_hook_tokens(mom.hook_calls, est, seed, probe)))
    else:
        gen = torch.Generator().manual_seed(int(seed))
        ctx = prob.mc_context(gen, ref)
        gs = sample_gradient_terms(prob.mdp, prob.policy, est, samples, group_size, generator=gen, ref_policy=ref,
                                   context=ctx, engine=prob.engine)
        rec.update(mc_record_fields(gs, target, prob, alpha, seed, target_cosine))
    rec["error"] = None
    return _clean(rec)


#: The record fields that hold floats (``None`` for missing and non-finite values in JSON).
_FLOAT_FIELDS = ("scale", "cosine", "rel_bias", "rel_residual", "p_value", "p_value_direction", "p_value_adjusted",
                 "p_value_direction_adjusted", "scale_se", "scale_ci_level", "mde_rel_bias", "mde_cosine",
                 "mde_scale", "variance_trace")


def _clean(rec: dict) -> dict:
    for k in _FLOAT_FIELDS:
        rec[k] = _num(rec.get(k))
    if rec.get("scale_ci") is not None:
        rec["scale_ci"] = [_num(x) for x in rec["scale_ci"]]
    return rec


def _family(records: list[dict], alpha: float, target_cosine: float) -> list[dict]:
    """The run's Monte Carlo verdicts as one Holm family (:func:`~tpg.verify.montecarlo.family_verdicts`);
    then a float64 record kept only beside its float32 twin is dropped when their verdicts agree."""
    mc = [r for r in records if "_mc" in r]
    for rec, v in zip(mc, family_verdicts([r.pop("_mc") for r in mc], alpha, target_cosine=target_cosine,
                                          power=DEFAULT_POWER)):
        rec.update(v.as_dict())
        _clean(rec)
    out: list[dict] = []
    for rec in records:
        if rec.get("float64_verdict") is not None and out and out[-1].get("_twin_of") is rec:
            twin = out.pop()
            twin.pop("_twin_of")
            rec["float64_verdict"] = twin["verdict"]
            out += [twin, rec] if twin["verdict"] != rec["verdict"] else [rec]
        else:
            out.append(rec)
    return out


def _error_record(spec_text: str, mode: str, group_size: int, dtype, mdp, exc: Exception,
                  engine: str | None = None) -> dict:
    rec = {"estimator": spec_text, "spec": spec_text, "options": {}, "mode": mode, "group_size": group_size,
           "layout": None, "dtype": str(dtype).replace("torch.", ""), "target": None, "mdp": mdp.describe(),
           "engine": engine}
    rec.update({k: None for k in Verdict.__dataclass_fields__})
    rec.update({"verdict": "error", "alpha": None, "n_samples": None, "variance_trace": None,
                "tokens_per_batch": None, "hook_tokens_per_batch": None, "tokens_exact": None, "error": str(exc)})
    return rec


def verify(mdp, policy, estimators, group_size: int = 2, mode: str = "exact", samples: int = DEFAULT_SAMPLES,
           seed: int = 0, dtype=torch.float64, alpha: float = DEFAULT_ALPHA, max_rows: int = DEFAULT_MAX_ROWS,
           ref_policy=None, progress: bool | None = False, on_error: str = "raise",
           plugin_timeout: float | None = DEFAULT_TIMEOUT, behaviour=None, loss=None,
           hooks: str = "behaviour", target_cosine: float = TARGET_COSINE, target_reward=None,
           engine: str = "auto") -> list[dict]:
    """Verdicts of ``estimators`` on ``(mdp, policy)``; one record per estimator (see the module docstring).
    Also callable as ``tpg.verify(mdp, policy, estimators, ...)``.

    Args:
        estimators: a spec (``NAME[:key=value,...]``, ``all``, ``FILE.py:FUNCTION``), an
            :class:`~tpg.estimators.Estimator` object (or class), a Python callable (an advantage function
            in verl form or simple form, told apart by its signature and wrapped exactly as a plug-in file's:
            :func:`~tpg.estimators.plugin.plugin_from_callable`, which also takes its options), or a list
            mixing them. A callable's records are labelled ``module.qualname``.
        group_size: ``G`` for group estimators (and the batch size of batch-coupled ones).
        mode: ``exact`` (enumerate the sample space) or ``mc`` (``samples`` batches; every estimator's two
            tests form one Holm family at family-wise level ``alpha``).
        seed: seeds the Monte Carlo batches, fixed critics and the default reference policy.
        dtype: the dtype fed to plug-ins (built-ins always run in float64).
        max_rows: the exact mode's size guard (responses in the stacked sample space).
        ref_policy: the reference policy of KL options (default: a seeded perturbation of ``policy``).
        progress: a tqdm bar on stderr: True, False, or None (only when stderr is a terminal).
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
        target_reward: the objective the estimators target, ``J_target = E[R_target(x, W)]`` for a
            response-level reward (:mod:`tpg.mdp.objectives`): ``None`` or ``rm`` (``J``), a spec
            (``length_penalty:alpha``, ``scaled:c``, ``clip:lo,hi``, ``overlong:L,cache``, ``FILE.py:FUNCTION``)
            or a callable taking keywords among ``rm, length, tokens, mask, prompt``. The batches then carry
            ``R_target`` as their ``RM`` (as a trainer shaping its reward feeds them), the target is
            ``grad J_target`` (exact: the tree DP with ``R_target`` on each response's last token), and the
            records' ``target`` reads ``grad J[NAME]``.
        hooks: with a behaviour or loss, whose context answers the estimators' hooks: ``behaviour`` (mu:
            the engine's continuations, a critic of mu's returns) or ``policy`` (pi).
    With ``behaviour`` or ``loss`` the records carry ``behaviour``, ``loss``, ``hooks``, ``mismatch``,
    ``behaviour_info`` and ``kept_prob`` (:mod:`tpg.offpolicy.record`).
        target_cosine: Monte Carlo mode: the cosine whose detection ``n_for_cosine`` refers to.
        engine: ``auto`` (the stored tree when it fits the MDP's size guard, else the Markov engine when
            it applies), ``tree`` or ``markov`` (:func:`tpg.exact.choose_engine`); see the module docstring.
            ``ValueError`` for exact mode or a behaviour/loss on the Markov path.
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
    if mode == "mc" and not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0 < target_cosine < 1:
        raise ValueError(f"target_cosine must be in (0, 1), got {target_cosine!r}")
    objective = "grad J"
    if target_reward is not None:  # the objective E[R_target]: the MDP with R_target on the last token
        from ..mdp.objectives import with_target_reward
        goal = resolve_target_reward(target_reward, plugin_timeout)
        if not goal.is_identity:
            mdp = with_target_reward(mdp, goal)
            objective = f"grad J[{goal.name}]"
    specs = resolve_specs(estimators)
    if choose_engine(mdp, policy, engine) == "markov":
        _check_markov_run(mdp, mode, behaviour, loss)
        prob = _MarkovProblem(mdp, policy, seed, ref_policy)
    else:
        prob = _Problem(mdp, policy, seed, ref_policy)
    off = None
    prob.objective = objective
    if hooks != "behaviour" and behaviour is None and loss is None:
        raise ValueError(f"hooks={hooks!r} applies to off-policy verification only: give a behaviour or a loss")
    if behaviour is not None or loss is not None:
        from ..offpolicy.record import prepare_offpolicy
        off = prepare_offpolicy(mdp, policy, prob.sol, behaviour, loss, hooks)
    records: list[dict] = []
    bar = None
    if show_progress(progress) and len(specs) > 1:
        bar = progress_bar(True, total=len(specs), desc="verify", unit="estimator", leave=False)
    try:
        for spec, from_all in specs:
            text = spec if isinstance(spec, str) else callable_label(spec) if _is_function(spec) \
                else getattr(spec, "spec", repr(spec))
            if bar is not None:
                bar.set_postfix_str(text[:40])
            try:
                est = _load(spec, torch.float64, plugin_timeout)
                # a plug-in object built for float32 is judged with float32's tolerances
                own = getattr(est, "dtype", torch.float64) if isinstance(spec, Estimator) else torch.float64
                rec = _verify_one(prob, est, text, mode, group_size, samples, seed, own, alpha, max_rows,
                                  off, target_cosine)
                if _is_plugin(spec) and dtype == torch.float32:
                    est32 = _load(spec, torch.float32, plugin_timeout)
                    rec32 = _verify_one(prob, est32, text, mode, group_size, samples, seed, torch.float32, alpha,
                                        max_rows, off, target_cosine)
                    rec32["float64_verdict"] = rec["verdict"]
                    if mode == "mc":  # both stay in the Holm family; the pair is resolved by _family
                        rec["_twin_of"] = rec32
                        records += [rec, rec32]
                    else:
                        records += [rec, rec32] if rec32["verdict"] != rec["verdict"] else [rec32]
                else:
                    records.append(rec)
            except ValueError as exc:
                if on_error == "raise" or (on_error == "record_all" and not from_all
                                           and not isinstance(exc, PluginError)):
                    raise ValueError(f"{text}: {exc}") from exc
                records.append(_error_record(text, mode, group_size, dtype, mdp, exc, prob.engine))
                if off is not None:
                    from ..offpolicy.record import offpolicy_fields
                    records[-1].update(offpolicy_fields(off))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if mode == "mc":
        records = _family(records, alpha, target_cosine)
    return records


def _check_markov_run(mdp, mode: str, behaviour, loss) -> None:
    """``ValueError`` for what the Markov path cannot do: exact mode (the expectation over every batch
    of responses needs them enumerated on the tree) and off-policy verification (its behaviours and
    loss gradients live on the tree)."""
    if mdp.tree_fits():
        where = "the tree fits this MDP: use engine=tree"
    else:
        where = f"it has {mdp._nodes_text()} nodes here, above max_nodes={mdp.max_nodes:,}"
    if mode == "exact":
        raise ValueError(f"exact mode enumerates the estimator's sample space (every batch of responses), which "
                         f"needs the stored response tree, and {where}; the Markov engine gives the exact grad J "
                         f"but no estimator's exact expectation: use Monte Carlo mode (mode=mc, --mode mc), which "
                         f"tests each estimator against that exact grad J")
    if behaviour is not None or loss is not None:
        raise ValueError(f"off-policy verification (behaviour, loss) needs the stored response tree, and {where}")


# ------------------------------------------------------------------------------ presentation
def _fmt(x, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def _fmt_interval(lo: float, hi: float, point: float = 1.0) -> str:
    """``[lo, hi]`` with enough digits that the printed bounds keep ``point`` inside or outside as the
    numbers do (``[0.9999, 1]`` must not read as containing 1 when ``hi < 1``)."""
    inside = lo <= point <= hi
    for digits in range(3, 18):
        a, b = format(lo, f".{digits}g"), format(hi, f".{digits}g")
        if (float(a) <= point <= float(b)) == inside:
            return f"[{a}, {b}]"
    return f"[{lo!r}, {hi!r}]"


def _fmt_p(adjusted, raw) -> str:
    if raw is None:
        return "-"
    return f"{_fmt(adjusted, '.3g')} ({_fmt(raw, '.3g')})"


def _fmt_n(n: int) -> str:
    return f"{n:,}"


def _power_line(r: dict) -> str | None:
    """What a non-rejection could have missed, and the ``N`` that would detect the target cosine."""
    if r["mode"] != "mc" or r["verdict"] not in ("consistent", "consistent-scaled") or r.get("mde_rel_bias") is None:
        return None
    cos = r.get("mde_cosine")
    missed = f"|b|/|target| < {_fmt(r['mde_rel_bias'], '.3g')}"
    if cos is not None:
        missed += f" (cosine > {_fmt(cos, '.4f') if cos < 0.9999 else '1-' + format(1 - cos, '.1e')})"
    if r["verdict"] == "consistent":
        missed += f" or |c - 1| < {_fmt(r['mde_scale'], '.3g')}"
    line = f"  {r['spec']} ({r['verdict']}): could have missed {missed}; "
    target, n_for, N = r.get("target_cosine"), r.get("n_for_cosine"), r["n_samples"]
    if target is None or cos is None:
        return line + "no cosine target (the mean does not point uphill)"
    if n_for is None:
        return line + f"N too small to detect cosine {target:g}, and no N up to 1e9 would"
    if n_for <= N:
        return line + f"N = {_fmt_n(N)} detects cosine {target:g} (N >= {_fmt_n(n_for)} suffices)"
    return line + f"N too small to detect cosine {target:g} with {r['power']:.0%} power; try N >= {_fmt_n(n_for)}"


def _legend(records: list[dict], header: list[str]) -> list[str]:
    lines = []
    modes = {r["mode"] for r in records if r["verdict"] != "error"}
    if "exact" in modes:
        lines.append("verdicts (exact mode, proofs by enumeration):")
        lines += [f"  {w:<18} {m}" for w, m in EXACT_VERDICTS.items()]
    mc = [r for r in records if r["mode"] == "mc" and r["verdict"] != "error"]
    if mc:
        alphas = sorted({r["alpha"] for r in mc})
        lines.append("verdicts (Monte Carlo mode, tests at family-wise level alpha = "
                     + ", ".join(f"{a:g}" for a in alphas) + "; not rejecting is not proving):")
        lines += [f"  {w:<18} {m}" for w, m in MC_VERDICTS.items()]
        for m in sorted({r["holm_family"] for r in mc}):
            n_est = m // 2
            a = alphas[0]
            lines.append(f"Holm: the {m} tests of this run (c = 1 and direction, for each of {n_est} estimator"
                         f"{'s' if n_est != 1 else ''}) form one family; p-values are shown Holm-adjusted (raw in "
                         f"parentheses) and P(any false alarm) <= alpha = {a:g}")
    lines += legend_lines(_column_meanings(records, header))
    return lines


def _column_meanings(records: list[dict], header: list[str]) -> dict[str, str]:
    """One line per column of :func:`format_records`' table (those in ``header``)."""
    mc = [r for r in records if r["mode"] == "mc" and r["verdict"] != "error"]
    power = mc[0]["power"] if mc else None
    levels = ", ".join(f"{x:.3g}" for x in sorted({r["alpha"] / r["holm_family"] for r in mc}))
    noisy = " (Monte Carlo: of the sample mean of g, so noisy)" if mc else ""
    meanings = {
        "estimator": "the estimator as named (catalog spec, FILE.py:FUNCTION, or a callable's module.qualname)",
        "G": "--group-size: responses per prompt for group estimators (the batch size of batch-coupled ones)",
        "layout": "how one batch is drawn: group (one prompt, G responses), independent (G prompt-response pairs), "
                  "batch:PxN (P prompt draws of N responses each) or single (one pair); - when it errored",
        "dtype": "the dtype the estimator was fed",
        "verdict": "in the vocabulary above; error: the estimator could not run (the reason below)",
        "scale": "best-fit c = <E g, target>/|target|^2" + (" (Monte Carlo: the mean of c_i = <g_i, target>/|target|^2)"
                                                             if mc else ""),
        "scale CI": "the scale's interval at the level Holm decided c = 1 at (it excludes 1 exactly when c = 1 is "
                    "rejected), with that level",
        "cosine": "cos(E g, target)" + noisy,
        "rel_bias": "|E g - target|/|target|" + noisy,
        "resid": "|E g - scale target|/|E g|: what a rescaling cannot remove" + noisy,
        "p(c=1) adj (raw)": "t test of c = 1: Holm-adjusted p-value (raw)",
        "p(dir) adj (raw)": "Hotelling test of E[g] || target on held-out directions: Holm-adjusted p-value (raw)",
        "mde b (cos)": (f"the smallest bias |b|/|target| detected with {power:.0%} power at level alpha/family = "
                        f"{levels}, b orthogonal to the target and pointing like the gradient noise (variance "
                        "tr(S^2)/tr(S) along it, S = Cov[g] orthogonal to the target), with the cosine it leaves "
                        "(tpg.verify.montecarlo.PowerModel)") if mc else "",
        "mde |c-1|": (f"the smallest scale error |c - 1| detected with {power:.0%} power at the same level"
                      if mc else ""),
        "tr Cov": "tr Cov[g], the variance of one batch's gradient (summed over the parameters)",
        "tokens/batch": "response tokens of one batch plus tokens the hooks sample (~: measured on sampled batches)",
    }
    return {name: meanings[name] for name in header}


def format_records(records: list[dict]) -> str:
    """An aligned text table of :func:`verify`'s records, a legend of the columns and the verdict words,
    the Holm family of a Monte Carlo run, and what each non-rejection could have missed."""
    mc = any(r["mode"] == "mc" for r in records)
    header = ["estimator", "G", "layout", "dtype", "verdict", "scale"]
    if mc:
        header += ["scale CI"]
    header += ["cosine", "rel_bias", "resid"]
    if mc:
        header += ["p(c=1) adj (raw)", "p(dir) adj (raw)", "mde b (cos)", "mde |c-1|"]
    header += ["tr Cov", "tokens/batch"]
    rows = []
    for r in records:
        row = [r["spec"], str(r["group_size"]), r.get("layout") or "-", r["dtype"], r["verdict"],
               _fmt(r["scale"], ".6g")]
        if mc:
            ci = r.get("scale_ci")
            row.append(f"{_fmt_interval(*ci)} {_fmt(100 * r['scale_ci_level'], '.3g')}%" if ci else "-")
        row += [_fmt(r["cosine"], ".10f") if r["cosine"] is not None else "-", _fmt(r["rel_bias"], ".3g"),
                _fmt(r["rel_residual"], ".3g")]
        if mc:
            mde, cos = r.get("mde_rel_bias"), r.get("mde_cosine")
            row += [_fmt_p(r.get("p_value_adjusted"), r["p_value"]),
                    _fmt_p(r.get("p_value_direction_adjusted"), r["p_value_direction"]),
                    f"{_fmt(mde, '.3g')} ({_fmt(cos, '.4f')})" if mde is not None else "-",
                    _fmt(r.get("mde_scale"), ".3g")]
        row += [_fmt(r["variance_trace"], ".4g"),
                (_fmt(r["tokens_per_batch"], ".4g") + ("" if r.get("tokens_exact", True) else "~"))
                if r["tokens_per_batch"] is not None else "-"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += _legend(records, header)
    power = [line for line in map(_power_line, records) if line]
    if power:
        lines.append("power (what a non-rejection could have missed):")
        lines += power
    small = sorted({r["n_samples"] for r in records if r["mode"] == "mc" and r["verdict"] != "error"
                    and r["n_samples"] < CALIBRATED_FROM_N})
    if small:
        lines.append(f"note: N = {', '.join(map(str, small))} < {CALIBRATED_FROM_N}: at such N the false-alarm rate was "
                     f"measured up to 3x alpha (responses too rare for half the batches to sample); prefer "
                     f"N >= {CALIBRATED_FROM_N}")
    notes = [f"{r['spec']}: {r['error']}" for r in records if r.get("error")]
    by_target: dict[str, list[str]] = {}
    for r in records:
        if r.get("target"):
            by_target.setdefault(r["target"], []).append(r["spec"])
    if len(by_target) > 1:
        lines.append("target: " + "; ".join(f"{t} ({', '.join(dict.fromkeys(s))})" for t, s in by_target.items()))
    elif by_target and next(iter(by_target)) != "grad J":
        lines.append(f"target: {next(iter(by_target))}")
    if any(r.get("engine") == "markov" for r in records):
        lines.append("engine: markov (no tree): the target is the Markov engine's exact grad J, over the shared "
                     "policy's (position, previous token) logit rows, and each batch's gradient is taken in them")
    if any(r.get("tokens_exact") is False for r in records):
        lines.append("~ tokens measured on sampled batches (exact mode: those the hooks spend)")
    if notes:
        lines.append("errors:")
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)
