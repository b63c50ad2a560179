"""Exact moments of an estimator's single-batch gradient, by enumerating its sample space.

A *batch* is what one gradient estimate is computed from (:func:`batch_layout`):

* ``single``: one prompt ``x ~ rho`` and one response ``W ~ pi(.|x)``; the sample space is the
  ``L`` complete responses, with probabilities ``rho(x) P(W|x)``;
* ``group`` (estimators with ``needs_groups``, group size ``G > 1``): one prompt and ``G``
  independent responses to it; the sample space is every ordered ``G``-tuple of responses of each
  prompt (``sum_x L_x^G`` batches) with probabilities ``rho(x) prod_i P(W_i|x)``;
* ``independent`` (estimators whose rows are coupled within a batch id, REINFORCE++ whitening or
  ``agg=token-mean``, group size ``G > 1``): ``G`` independent prompt-response pairs, every
  ordered ``G``-tuple of the ``L`` responses, probabilities ``prod_i rho(x_i) P(W_i|x_i)``;
* ``batch:PxN`` (a plug-in that declares it, ``layout=batch:PxN``: verl's real batch): ``P``
  independent prompt draws with ``N`` responses each, each draw its own group (two draws of the
  same prompt are two groups). With ``S = sum_x L_x^N`` the (prompt, ``N``-tuple) draws, the
  sample space is every ordered ``P``-tuple of them (``S^P`` batches of ``P N`` rows) with
  probabilities ``prod_p rho(x_p) prod_j P(W_pj|x_p)``.

A plug-in's declared ``layout=group|independent`` replaces the choice from its attributes (with
the group size ``G``); ``batch:PxN`` also replaces ``G`` by ``N``.

All batches are stacked into one :class:`~tpg.estimators.base.ResponseBatch` with distinct batch and
group ids (in chunks, to bound memory), the estimator runs once per chunk, and each batch's gradient
follows from the analytic score (:mod:`tpg.verify.score`). Hence

    E[g]   = sum_b p_b g_b,       Cov[g] = sum_b p_b (g_b - E g)(g_b - E g)^T,

exact up to float64 rounding, in the policy's parameter space.

Hooks that sample (continuations, fresh critic noise) come from an
:class:`~tpg.verify.context.ExactContext`, which returns their expectations; the expected gradient
is then exact when the advantage is linear in the hook's output (TRePO's segment, interpolation and
inverse-probability fills; PPO/GAE with a fresh-noise critic). ``Cov[g]`` is then the covariance
of the gradient *given* exact hook outputs, i.e. without the continuations' own noise. An estimator
that cannot be made exact (its own random draws: random anchors) is refused with ``ValueError``;
verify it in Monte Carlo mode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..estimators.base import ResponseBatch
from ..estimators.plugin import PluginError, parse_layout
from ..rollouts import PAD_TOKEN, Rollouts
from .context import ExactContext
from .score import ParamMap, batch_logit_gradients, token_nt

#: Default size guard: responses (rows) in the stacked sample space of one estimator.
from .defaults import DEFAULT_MAX_ROWS  # noqa: E402  (torch-free home: tpg verify --help)
#: Entries of a dense chunk of per-batch logit gradients.
_CHUNK_ENTRIES = 4_000_000


@dataclass
class ExactMoments:
    """Exact first and second moments of one estimator's single-batch gradient.

    Attributes:
        mean: ``E[g]`` in parameter space ``[num_params]``.
        cov: ``Cov[g]`` ``[num_params, num_params]`` (``None`` unless requested).
        variance_trace: ``tr Cov[g] = E|g - E g|^2``.
        num_batches: batches in the sample space; num_rows: responses in it.
        tokens_per_batch: expected response tokens per batch (hook tokens excluded).
        hook_calls: the context hooks the estimator called, with call counts.
        total_prob: the probabilities' sum (1 up to rounding; a check).
    """

    mean: torch.Tensor
    cov: torch.Tensor | None
    variance_trace: float
    num_batches: int
    num_rows: int
    tokens_per_batch: float
    hook_calls: dict = field(default_factory=dict)
    total_prob: float = 1.0


def leaf_rollouts(mdp, sol) -> Rollouts:
    """Every complete response of the tree as one :class:`~tpg.rollouts.Rollouts` (row ``i`` = leaf ``i``
    of ``tree.leaf_ids``), with its true token rewards, node ids and ``log pi``."""
    tree = mdp.tree
    nt_path, tok_path, lengths = tree.leaf_paths()
    valid = nt_path >= 0
    V, P = tree.vocab_size, tree.num_prompts
    nt = nt_path.clamp(min=0)
    tok = tok_path.clamp(min=0)
    zero = torch.zeros((), dtype=torch.float64)
    child = P + nt * V + tok
    rewards = torch.where(valid, mdp.edge_rewards()[child], zero)
    leaves = tree.leaf_ids
    return Rollouts(prompt=tree.prompt_n[leaves].clone(), group=torch.arange(leaves.numel()),
                    tokens=torch.where(valid, tok_path, PAD_TOKEN), mask=valid,
                    logp=torch.where(valid, sol.logp[nt, tok], zero), token_rewards=rewards,
                    rm=sol.response_rm.clone(), length=lengths.clone(),
                    prefix_len=torch.zeros(leaves.numel(), dtype=torch.long),
                    nodes=torch.where(valid, tree.nt_node_k[nt], torch.full_like(nt, -1)), leaf=leaves.clone(),
                    gamma=mdp.gamma, vocab_size=V, horizon=tree.horizon)


def batch_layout(estimator, group_size: int) -> tuple[str, int]:
    """How one batch is drawn: ``("group", G)`` (one prompt ``x ~ rho`` and ``G`` responses to it:
    group estimators), ``("independent", G)`` (``G`` independent prompt-response pairs: estimators
    whose output couples the rows of a batch id, REINFORCE++ whitening or ``agg=token-mean``),
    ``("batch:PxN", N)`` (``P`` independent prompt draws with ``N`` responses each), or
    ``("single", 1)`` (one prompt-response pair).

    An estimator's ``declared_layout`` attribute (a plug-in's ``layout=`` option) takes precedence:
    ``group`` and ``independent`` with ``G = group_size`` (``single`` when ``G = 1``), ``batch:PxN``
    whatever the group size."""
    declared = getattr(estimator, "declared_layout", None)
    if declared is not None:
        kind, P, n = parse_layout(declared)
        if kind == "batch":
            return f"batch:{P}x{n}", n
        return (kind, group_size) if group_size > 1 else ("single", 1)
    if group_size > 1 and bool(getattr(estimator, "needs_groups", False)):
        return "group", group_size
    coupled = bool(getattr(estimator, "needs_batches", False) or getattr(estimator, "batch_coupled", False))
    if group_size > 1 and coupled:
        return "independent", group_size
    return "single", 1


def layout_shape(layout: str, G: int) -> tuple[int, int, int]:
    """``(rows per batch, groups per batch, rows per group)`` of a batch layout: ``group`` ``(G, 1, G)``,
    ``independent`` ``(G, G, 1)``, ``single`` ``(1, 1, 1)``, ``batch:PxN`` ``(P N, P, N)`` (verl's batch of
    ``P`` prompt draws with ``N`` responses each). Rows of one group are contiguous, so row ``i`` of a
    batch is in its group ``i // (rows per group)``."""
    if layout.startswith("batch:"):
        _, P, n = parse_layout(layout)
        return P * n, P, n
    if layout == "group":
        return G, 1, G
    if layout == "independent":
        return G, G, 1
    return 1, 1, 1


def rows_per_batch(layout: str, G: int) -> int:
    """Responses in one batch of a layout: ``P N`` for ``batch:PxN``, else ``G`` (:func:`layout_shape`)."""
    return layout_shape(layout, G)[0]


def _power(base: int, exp: int):
    """``base ** exp`` as an int, or ``math.inf`` when it exceeds 1e30 (decided from logarithms)."""
    if base <= 1:
        return int(base) ** exp
    if exp * math.log10(base) > 30:
        return math.inf
    return int(base) ** exp


def sample_space_size(mdp, layout: str, G: int) -> tuple[int, int]:
    """``(batches, rows)`` of the sample space: ``L`` single responses, ``sum_x L_x^G`` groups,
    ``L^G`` independent tuples, or ``(sum_x L_x^N)^P`` batches of ``P N`` rows for ``batch:PxN``
    (``math.inf`` above 1e30)."""
    tree = mdp.tree
    if layout == "single":
        return tree.num_leaves, tree.num_leaves
    if layout == "independent":
        live = int((mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]] > 0).sum())
        n = _power(live, G)
        return n, n * G
    counts = torch.bincount(tree.prompt_n[tree.leaf_ids], minlength=tree.num_prompts).tolist()
    if layout.startswith("batch:"):
        _, P, n = parse_layout(layout)
        draws = 0
        for L, w in zip(counts, mdp.prompt_weights.tolist()):
            if w > 0:
                draws += _power(int(L), n)
        batches = _power(draws, P) if draws != math.inf else math.inf
        return batches, batches * P * n
    batches = 0
    for L, w in zip(counts, mdp.prompt_weights.tolist()):
        if w > 0:
            batches += _power(int(L), G)
    return batches, batches * G


def _count(n) -> str:
    return "more than 1e30" if n == math.inf else f"{n:,}"


def _tuples(idx: torch.Tensor, prob: torch.Tensor, G: int, chunk_batches: int):
    """All ordered ``G``-tuples of ``idx`` (in chunks): ``(rows [n * G], batch id [n * G], prod prob [n])``."""
    L = idx.numel()
    total = L ** G
    for start in range(0, total, chunk_batches):
        nums = torch.arange(start, min(total, start + chunk_batches))
        digits = torch.stack([(nums // (L ** (G - 1 - i))) % L for i in range(G)], 1)  # [n, G]
        yield idx[digits].reshape(-1), torch.arange(nums.numel()).repeat_interleave(G), prob[digits].prod(1)


def _space_chunks(mdp, sol, layout: str, G: int, chunk_batches: int):
    """Yield ``(rows into leaf_rollouts, local batch id of each row, probability of each batch)``."""
    tree = mdp.tree
    rho = mdp.prompt_weights
    prob = sol.response_prob
    if layout == "single":
        L = tree.num_leaves
        for start in range(0, L, chunk_batches):
            rows = torch.arange(start, min(L, start + chunk_batches))
            yield rows, torch.arange(rows.numel()), prob[rows]
        return
    if layout == "independent":
        idx = torch.nonzero(rho[tree.prompt_n[tree.leaf_ids]] > 0).flatten()
        yield from _tuples(idx, prob[idx], G, chunk_batches)
        return
    leaf_prompt = tree.prompt_n[tree.leaf_ids]
    if layout.startswith("batch:"):
        yield from _batch_chunks(tree, rho, prob, leaf_prompt, layout, chunk_batches)
        return
    for x in range(tree.num_prompts):
        if float(rho[x]) <= 0:
            continue
        idx_x = torch.nonzero(leaf_prompt == x).flatten()
        for rows, batch_b, p in _tuples(idx_x, prob[idx_x] / rho[x], G, chunk_batches):
            yield rows, batch_b, rho[x] * p


def _batch_chunks(tree, rho, prob, leaf_prompt, layout: str, chunk_batches: int):
    """The chunks of a ``batch:PxN`` sample space: every ordered ``P``-tuple of (prompt, ``N``-tuple)
    draws; rows ordered batch, then draw, then response."""
    _, P, n = parse_layout(layout)
    rows_d, prob_d = [], []
    for x in range(tree.num_prompts):
        if float(rho[x]) <= 0:
            continue
        idx_x = torch.nonzero(leaf_prompt == x).flatten()
        for rows, _, p in _tuples(idx_x, prob[idx_x] / rho[x], n, 1 << 62):
            rows_d.append(rows.view(-1, n))
            prob_d.append(rho[x] * p)
    draw_rows = torch.cat(rows_d)  # [S, N]
    draw_prob = torch.cat(prob_d)  # [S]
    S = draw_rows.shape[0]
    total = S ** P
    for start in range(0, total, chunk_batches):
        nums = torch.arange(start, min(total, start + chunk_batches))
        digits = torch.stack([(nums // (S ** (P - 1 - i))) % S for i in range(P)], 1)  # [m, P]
        yield (draw_rows[digits].reshape(-1), torch.arange(nums.numel()).repeat_interleave(P * n),
               draw_prob[digits].prod(1))


def _take(ro: Rollouts, rows: torch.Tensor) -> Rollouts:
    """``ro.index(rows)`` with ``index_select`` (several times faster for long row lists)."""
    kw = {f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            kw[k] = v.index_select(0, rows)
    return Rollouts(**kw)


def ref_log_probs(ref_policy, tree, ro: Rollouts) -> torch.Tensor:
    """``log pi_ref(w_t | s_t)`` per token of ``ro`` (0 on padding), ``[B, H]``."""
    with torch.no_grad():
        lp = ref_policy.node_log_probs(tree).to(torch.float64)
    nt = token_nt(tree, ro.nodes)
    return torch.where(nt >= 0, lp[nt.clamp(min=0), ro.tokens], torch.zeros((), dtype=torch.float64))


def make_batch(estimator, ro: Rollouts, batch_b: torch.Tensor, dtype, ref_logp=None):
    """The :class:`~tpg.estimators.base.ResponseBatch` an estimator sees (token rewards only for the oracle)."""
    return ResponseBatch.from_rollouts(ro, batch=batch_b, ref_logp=ref_logp, dtype=dtype,
                                       keep_token_rewards=bool(getattr(estimator, "uses_token_rewards", False)))


def refuse_inexact(estimator, name: str) -> None:
    """``ValueError`` unless the estimator's exact expectation can be computed (:func:`exact_supported`)."""
    ok, why = exact_supported(estimator)
    if not ok:
        raise ValueError(f"exact mode refused for {name!r}: {why or 'its expectation cannot be made exact'}; "
                         f"use Monte Carlo mode (--mode mc)")


def checked_space_size(mdp, name: str, layout: str, G: int, max_rows: int) -> tuple[int, int]:
    """``(batches, rows)`` of the sample space (:func:`sample_space_size`); ``ValueError`` saying what it
    enumerates when it holds more than ``max_rows`` responses."""
    n_batches, n_rows = sample_space_size(mdp, layout, G)
    if n_rows > max_rows:
        if layout.startswith("batch:"):
            _, P, n = parse_layout(layout)
            what = f", all {P}-tuples of prompt draws with all {n}-tuples of responses each"
        else:
            what = {"group": f", all {G}-tuples of responses per prompt", "independent": f", all {G}-tuples of "
                    f"prompt-response pairs", "single": ""}[layout]
        raise ValueError(f"the exact sample space of {name!r} has {_count(n_batches)} batches ({_count(n_rows)} "
                         f"responses{what}), above max_rows={max_rows:,}: use a smaller MDP, group size or layout, "
                         f"raise max_rows, or use Monte Carlo mode (--mode mc)")
    return n_batches, n_rows


def run_exact(estimator, name: str, rb, ctx):
    """``estimator(rb, ctx)`` in exact mode: a ``ValueError`` it raises is a refusal of exact mode (e.g.
    random anchors) and says so; a plug-in's own failure (:class:`~tpg.estimators.plugin.PluginError`)
    passes through unchanged."""
    try:
        return estimator(rb, ctx)
    except PluginError:  # the plug-in's own failure, not a refusal of exact mode
        raise
    except ValueError as exc:
        raise ValueError(f"exact mode refused for {name!r}: {exc}") from exc


def checked_coef(estimator, out, shape) -> torch.Tensor:
    """``score_coef()`` of an estimator's output as float64, checked for shape and finiteness."""
    name = getattr(estimator, "name", type(estimator).__name__)
    coef = out.score_coef()
    if tuple(coef.shape) != tuple(shape):
        raise ValueError(f"estimator {name!r} returned advantages/weights of shape {list(coef.shape)}, "
                         f"expected {list(shape)}")
    coef = coef.detach().to(torch.float64)
    bad = ~torch.isfinite(coef)
    if bool(bad.any()):
        r, t = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"estimator {name!r} returned a non-finite coefficient {float(coef[r, t])} "
                         f"(row {r}, position {t})")
    return coef


def exact_supported(estimator) -> tuple[bool, str]:
    """Whether an estimator declares that its exact expectation can be computed (attribute
    ``supports_exact``: a bool, or a callable returning a bool or ``(bool, reason)``; default yes)."""
    flag = getattr(estimator, "supports_exact", True)
    if callable(flag):
        flag = flag()
    if isinstance(flag, tuple):
        return bool(flag[0]), str(flag[1]) if len(flag) > 1 else ""
    return bool(flag), ""


class _MomentSums:
    """Probability-weighted sums over a sample space's batches of the centred logit gradients
    ``d_b = g_b - shift`` (``shift = grad J``'s logits, for numerical stability): ``s1 = sum p_b d_b``,
    ``s2 = sum p_b d_b d_b^T``, ``total_p = sum p_b`` and the expected response tokens
    ``sum p_b T_b``. Then ``E[g] = shift + s1`` and ``Cov[g] = s2 - s1 s1^T`` (:meth:`moments`)."""

    def __init__(self, shift: torch.Tensor):
        D = shift.numel()
        self.shift = shift
        self.s1 = torch.zeros(D, dtype=torch.float64)
        self.s2 = torch.zeros(D, D, dtype=torch.float64)
        self.total_p = 0.0
        self.tokens = 0.0

    def add(self, coef: torch.Tensor, nt: torch.Tensor, ro: Rollouts, pi: torch.Tensor, batch_b: torch.Tensor,
            p_n: torch.Tensor) -> None:
        """One chunk: per-token coefficients ``coef``, rows ``nt`` and tokens of ``ro``, each row's batch
        id ``batch_b`` and each batch's probability ``p_n``."""
        d = batch_logit_gradients(coef, nt, ro.tokens, pi, batch_b, p_n.numel()) - self.shift
        pd = p_n.unsqueeze(1) * d
        self.s1 += pd.sum(0)
        self.s2 += d.T @ pd
        self.total_p += float(p_n.sum())
        self.tokens += float((p_n[batch_b] * ro.length.to(torch.float64)).sum())

    def moments(self, pmap: ParamMap, with_cov: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """``(E[g], Cov[g] or None, tr Cov[g])`` in parameter space."""
        cov_logit = self.s2 - torch.outer(self.s1, self.s1)
        return (pmap.to_params(self.shift + self.s1), pmap.param_cov(cov_logit) if with_cov else None,
                max(pmap.param_trace(cov_logit), 0.0))


def exact_moments(mdp, policy, estimator, group_size: int = 1, *, dtype=torch.float64, with_cov: bool = True,
                  max_rows: int = DEFAULT_MAX_ROWS, ref_policy=None, context: ExactContext | None = None,
                  param_map: ParamMap | None = None) -> ExactMoments:
    """``E[g]`` and ``Cov[g]`` of ``estimator``'s single-batch gradient, exactly (see the module docstring).

    Moments are accumulated in node-logit space, centred at ``grad J``'s logits for numerical
    stability, and mapped to parameter space at the end (``J^T m``, ``J^T C J``).

    Args:
        group_size: ``G`` for group estimators (ignored by single-response estimators and by a
            declared ``batch:PxN`` layout).
        dtype: precision of the batch handed to the estimator (plug-ins: float32 as in training).
        with_cov: also return the full covariance matrix (the trace is always computed).
        max_rows: size guard: ``ValueError`` when the sample space has more responses.
        ref_policy: reference policy for KL options (fills ``ResponseBatch.ref_logp``).

    Raises ``ValueError`` when the sample space is too large, or when the estimator cannot be made
    exact (it says so, or it raised ``ValueError`` in exact mode, e.g. on random anchors); a
    plug-in's :class:`~tpg.estimators.plugin.PluginError` passes through unchanged.
    """
    name = getattr(estimator, "name", type(estimator).__name__)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    refuse_inexact(estimator, name)
    layout, G = batch_layout(estimator, group_size)
    n_batches, n_rows = checked_space_size(mdp, name, layout, G, max_rows)
    ctx = context if context is not None else ExactContext(mdp, policy)
    calls_before = dict(ctx.hook_calls)
    sol = ctx.sol
    tree = mdp.tree
    pmap = param_map if param_map is not None else ParamMap(policy, tree)
    pi = sol.logp.exp()
    leaves_ro = leaf_rollouts(mdp, sol)
    ref_all = ref_log_probs(ref_policy, tree, leaves_ro) if ref_policy is not None else None
    per_batch, _, per_group = layout_shape(layout, G)
    chunk_batches = max(1, _CHUNK_ENTRIES // max(pmap.logit_dim * per_batch, 1))
    sums = _MomentSums(sol.grad_logits.reshape(-1).to(torch.float64))
    for rows, batch_b, p_n in _space_chunks(mdp, sol, layout, G, chunk_batches):
        ro = _take(leaves_ro, rows)
        ro.group = torch.arange(rows.numel()) // per_group  # the group, one per prompt draw (verl's uid), or the row
        rb = make_batch(estimator, ro, batch_b, dtype, None if ref_all is None else ref_all[rows])
        out = run_exact(estimator, name, rb, ctx)
        sums.add(checked_coef(estimator, out, ro.tokens.shape), token_nt(tree, ro.nodes), ro, pi, batch_b, p_n)
    if abs(sums.total_p - 1.0) > 1e-9:
        raise ValueError(f"the sample space's probabilities sum to {sums.total_p!r}, not 1")
    mean, cov, trace = sums.moments(pmap, with_cov)
    return ExactMoments(mean=mean, cov=cov, variance_trace=trace, num_batches=n_batches, num_rows=n_rows,
                        tokens_per_batch=sums.tokens, hook_calls=_calls_since(calls_before, ctx.hook_calls),
                        total_prob=sums.total_p)


def _calls_since(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
