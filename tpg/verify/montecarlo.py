"""Monte Carlo verification: ``N`` independent batches, per-batch gradients from the analytic score.

The ``N`` batches are sampled at once (:func:`tpg.rollouts.sample`), stacked with distinct batch ids,
and the estimator runs once per chunk of them with a :class:`~tpg.verify.context.MonteCarloContext`.
No backward pass is taken: each batch's gradient projections are gathers of the score coefficients
(:func:`tpg.verify.score.batch_projections`).

Without a tree (a :class:`~tpg.policies.SharedSoftmax` policy on compact rewards, any horizon) the
same code runs in the policy's own row space: each token's row is its Markov state ``(t, prev)``
(``sample_gradient_terms(..., engine="markov")``), ``pi`` and the target ``grad J`` come from the
Markov engine (:func:`tpg.exact.solve_markov`) and the parameter map is
:class:`~tpg.verify.score.RowParamMap`; the two tests described next run unchanged.

:func:`mc_test` tests ``E[g] = d`` (``d = grad J``, or the KL target) with two tests
(:mod:`tpg.verify.verdict`):

* the *scale test* ``c = 1``: a t test on the per-batch scales ``c_i = <g_i, d> / |d|^2`` of all ``N``
  batches (the direction ``d`` is fixed in advance, so every batch may enter);
* the *direction test* ``E[g] || d``, on a split of the batches in two halves:

  1. from half A, the apparent bias ``b = m_A - c_A d`` (``m_A`` the half-A mean, ``c_A`` its best
     scale), whitened by the half-A sample covariance, ``u = (S_A + ridge)^{-1} b`` (the direction a
     test with known covariance would use), and made orthogonal to ``d``; for a policy with many
     parameters (more than ``N / 20``) ``b`` itself;
  2. on half B, the test (:func:`tpg.verify.verdict.hotelling_test`; one direction: a t test) of
     ``E[u^T g] = 0``.

The direction is chosen independently of half B, so the test's false-alarm rate is its level
whatever the estimator, up to how far the projections are from Gaussian at this ``N`` (the
calibration tests check it over hundreds of seeds, from ``N = 200``). Why one direction, and not
Hotelling in every direction at once: a bias often sits in directions of small variance (rarely
visited states), where the sample covariance is estimated from few visits and its inverse is
heavy-tailed; the full test then over-rejects (7.5% at ``alpha = 1%`` on a 28-dimensional problem),
and so does a test in a few directions at small ``N`` (adding 2 to 4 seeded random directions to
``b`` gave 3-9% at ``alpha = 1%`` with ``N = 200`` on an 18-parameter problem). The ridge (25% of the
mean eigenvalue) bounds the weight of such directions for the same reason: at 5% the test gave 4%
false alarms at ``alpha = 1%`` with ``N = 400``. The price is power, which every verdict reports
(:class:`PowerModel`): the smallest effects each test detects with probability 80% at this ``N``, and
the ``N`` at which a bias of cosine 0.99 would be detected.

:func:`family_verdicts` turns the p-values of several estimators into verdicts with Holm's
family-wise error control (the harness calls it once per :func:`~tpg.verify.harness.verify` run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..rollouts import sample
from .context import MonteCarloContext, node_paths
from .exact_moments import batch_layout, checked_coef, make_batch, ref_log_probs, rows_per_batch
from .markov_context import MarkovMonteCarloContext, ref_row_log_probs, token_rows
from .score import (ParamMap, RowParamMap, batch_logit_gradients, batch_projections, batch_sq_norms,
                    centered_directions, logit_gradient, token_nt)
from .verdict import (Verdict, cosine_of_rel_bias, f_noncentrality_for_power, holm_adjust, holm_levels, hotelling_test,
                      mc_verdict, rel_bias_of_cosine, scale_test, t_shift_for_power)

#: Rows (responses) handed to the estimator per call.
CHUNK_ROWS = 65_536
#: Batches whose dense gradients estimate ``tr Cov[g]`` (a reported number, not part of the test).
TRACE_BATCHES = 8192


@dataclass
class GradientSamples:
    """``N`` sampled batches reduced to what their gradients need: per-token score coefficients,
    the logit row of each state and the token, and the batch id of each row.

    ``nt_bt`` is the row of the logit table the score is taken in (-1 on padding): the state's
    non-terminal tree node index (``engine="tree"``), or its Markov state ``t (V + P) + prev``
    (``engine="markov"``: a shared policy's own logit rows, :class:`~tpg.verify.score.RowParamMap`).
    ``pi`` and the parameter map handed to the functions below must be over the same rows."""

    coef_bt: torch.Tensor
    nt_bt: torch.Tensor
    tok_bt: torch.Tensor
    batch_b: torch.Tensor
    num_batches: int
    tokens_per_batch: float
    hook_tokens_per_batch: float

    @classmethod
    def from_chunks(cls, coefs: list, nts: list, toks: list, bids: list, num_batches: int, horizon: int,
                    tokens: float, hook_tokens: float) -> "GradientSamples":
        """The chunks of a sampler (per-token coefficients, rows, tokens ``[B_i, H]`` and batch ids ``[B_i]``,
        ids non-decreasing across chunks) as one :class:`GradientSamples` (empty tensors when no chunk
        has a row); ``tokens`` and ``hook_tokens`` are the run's totals (response tokens of the batches,
        tokens the hooks sampled), reported per batch."""
        empty = torch.zeros(0, horizon, dtype=torch.long)
        return cls(coef_bt=torch.cat(coefs) if coefs else torch.zeros(0, horizon, dtype=torch.float64),
                   nt_bt=torch.cat(nts) if nts else empty, tok_bt=torch.cat(toks) if toks else empty,
                   batch_b=torch.cat(bids) if bids else torch.zeros(0, dtype=torch.long), num_batches=num_batches,
                   tokens_per_batch=(tokens + hook_tokens) / num_batches,
                   hook_tokens_per_batch=hook_tokens / num_batches)


def sample_gradient_terms(mdp, policy, estimator, num_batches: int, group_size: int = 1, *,
                          generator: torch.Generator | None = None, seed: int = 0, dtype=torch.float64,
                          ref_policy=None, context: MonteCarloContext | None = None,
                          engine: str = "tree") -> GradientSamples:
    """Sample ``num_batches`` batches and run the estimator on them (in chunks); see the module docstring.

    A batch follows :func:`~tpg.verify.exact_moments.batch_layout`: ``group`` (one prompt, ``G``
    responses), ``independent``/``single`` (``G`` or 1 independent prompt-response pairs, each its
    own group), or ``batch:PxN`` (``P`` independent prompt draws with ``N`` responses each, one
    group per draw).

    ``engine`` names the rows of ``nt_bt`` (:class:`GradientSamples`): ``tree`` (non-terminal nodes
    of the stored tree; the default context a :class:`~tpg.verify.context.MonteCarloContext`) or
    ``markov`` (the states ``(t, prev)`` of a shared policy on compact rewards, no tree at any
    horizon; the default context a :class:`~tpg.verify.markov_context.MarkovMonteCarloContext`).
    The batches, and so the coefficients, are the same draws either way."""
    if not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"Monte Carlo mode needs at least 2 samples (batches), got {num_batches!r}")
    if engine not in ("tree", "markov"):
        raise ValueError(f"engine must be 'tree' or 'markov', got {engine!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    H = mdp.horizon
    if engine == "markov":
        ctx = context if context is not None else MarkovMonteCarloContext(mdp, policy, generator=gen, seed=seed)

        def rows_and_ref(ro):
            return token_rows(mdp, ro), (ref_row_log_probs(ref_policy, mdp, ro) if ref_policy is not None else None)
    else:
        ctx = context if context is not None else MonteCarloContext(mdp, policy, generator=gen, seed=seed)
        tree = mdp.tree

        def rows_and_ref(ro):
            if ro.nodes is None:  # the sampler stores node ids only when it walks the tree
                ro.nodes = torch.where(ro.mask, node_paths(tree, ro.prompt, ro.tokens, ro.mask)[:, :H], -1)
            ref = ref_log_probs(ref_policy, tree, ro) if ref_policy is not None else None
            return token_nt(tree, ro.nodes), ref
    layout, G = batch_layout(estimator, group_size)
    per_batch = rows_per_batch(layout, G)
    per_chunk = max(1, CHUNK_ROWS // per_batch)
    coefs, nts, toks, bids = [], [], [], []
    tokens = 0
    hook_before = ctx.tokens_sampled
    done = 0
    while done < num_batches:
        n = min(per_chunk, num_batches - done)
        if layout == "group":
            ro = sample(mdp, policy, num_prompts=n, group_size=G, generator=gen)
            batch_b = ro.group.clone()
        elif layout.startswith("batch:"):  # groups are the prompt draws (sample numbers them)
            ro = sample(mdp, policy, num_prompts=n * (per_batch // G), group_size=G, generator=gen)
            batch_b = torch.arange(n).repeat_interleave(per_batch)
        else:
            ro = sample(mdp, policy, num_prompts=n * G, group_size=1, generator=gen)
            batch_b = torch.arange(n).repeat_interleave(G)
        nt, ref = rows_and_ref(ro)
        rb = make_batch(estimator, ro, batch_b, dtype, ref)
        out = estimator(rb, ctx)
        coefs.append(checked_coef(estimator, out, ro.tokens.shape))
        nts.append(nt)
        toks.append(ro.tokens)
        bids.append(batch_b + done)
        tokens += ro.num_tokens
        done += n
    return GradientSamples.from_chunks(coefs, nts, toks, bids, num_batches, H, tokens,
                                       float(ctx.tokens_sampled - hook_before))


def _rows_of(samples: GradientSamples, lo: int, hi: int) -> slice:
    """Rows of the batches ``lo .. hi - 1`` (batch ids are non-decreasing, so the rows are contiguous)."""
    ends = torch.searchsorted(samples.batch_b, torch.tensor([lo, hi], dtype=samples.batch_b.dtype))
    return slice(int(ends[0]), int(ends[1]))


def sample_mean(samples: GradientSamples, pi_nv: torch.Tensor, pmap: ParamMap, lo: int = 0,
                hi: int | None = None) -> torch.Tensor:
    """Mean gradient (parameter space) of the batches ``lo .. hi - 1``."""
    hi = samples.num_batches if hi is None else hi
    rows = _rows_of(samples, lo, hi)
    g = logit_gradient(samples.coef_bt[rows], samples.nt_bt[rows], samples.tok_bt[rows], pi_nv)
    return pmap.to_params(g) / (hi - lo)


def batch_gradients(samples: GradientSamples, pi_nv: torch.Tensor, pmap: ParamMap, lo: int = 0,
                    hi: int | None = None) -> torch.Tensor:
    """The gradient of every batch ``lo .. hi - 1`` in parameter space, ``[hi - lo, num_params]`` (dense)."""
    hi = samples.num_batches if hi is None else hi
    rows = _rows_of(samples, lo, hi)
    return pmap.to_params(batch_logit_gradients(samples.coef_bt[rows], samples.nt_bt[rows], samples.tok_bt[rows],
                                                pi_nv, samples.batch_b[rows] - lo, hi - lo))


def sample_variance_trace(samples: GradientSamples, pi_nv: torch.Tensor, pmap: ParamMap,
                          max_batches: int | None = TRACE_BATCHES) -> float:
    """Unbiased estimate of ``tr Cov[g]`` (parameter space) from the first ``max_batches`` batches
    (all when ``None``); their gradients are formed densely in logit space, in chunks, except for a
    :class:`~tpg.verify.score.RowParamMap` (norms equal in both spaces, rows too many to go dense):
    ``(sum_i |g_i|^2 - N |g_bar|^2) / (N - 1)`` with ``|g_i|^2`` from :func:`~tpg.verify.score.batch_sq_norms`."""
    N = samples.num_batches if max_batches is None else min(samples.num_batches, max_batches)
    if isinstance(pmap, RowParamMap):
        rows = _rows_of(samples, 0, N)
        sq = batch_sq_norms(samples.coef_bt[rows], samples.nt_bt[rows], samples.tok_bt[rows], pi_nv,
                            samples.batch_b[rows], N)
        mean = sample_mean(samples, pi_nv, pmap, 0, N)
        return max(float(sq.sum()) - N * float(mean @ mean), 0.0) / (N - 1)
    D = pmap.logit_dim
    step = max(1, 2_000_000 // D)
    s1 = torch.zeros(D, dtype=torch.float64)
    s2 = torch.zeros(D, D, dtype=torch.float64) if not pmap.identity else None
    ss = 0.0
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        rows = _rows_of(samples, lo, hi)
        g = batch_logit_gradients(samples.coef_bt[rows], samples.nt_bt[rows], samples.tok_bt[rows], pi_nv,
                                  samples.batch_b[rows] - lo, hi - lo)
        s1 += g.sum(0)
        if s2 is None:
            ss += float(torch.linalg.vector_norm(g)) ** 2
        else:
            s2 += g.T @ g
    if s2 is None:
        return max(ss - float(s1 @ s1) / N, 0.0) / (N - 1)
    return max(pmap.param_trace((s2 - torch.outer(s1, s1) / N) / (N - 1)), 0.0)


#: The bias direction is whitened when ``num_params <= N / 20``.
DENSE_RATIO = 20
#: Batches of half A whose dense gradients estimate the whitening covariance: ``max(4096, 10 P)``.
WHITEN_BATCHES = 4096
#: Ridge of the whitening, as a fraction of the mean eigenvalue ``tr(S) / num_params`` (chosen by
#: the false-alarm rate at small N: at alpha = 1% and N = 400, 4% false alarms with 5%, 1-2% with 25%).
WHITEN_RIDGE = 0.25
#: Without whitening, batches of half A (at most, and at most ``SPECTRUM_ENTRIES / P``) whose dense
#: gradients estimate the noise spectrum of the power model.
SPECTRUM_BATCHES = 1024
SPECTRUM_ENTRIES = 20_000_000
#: Below this many batches the test was measured to over-reject: at N = 200-400, 1.5-3x alpha on an
#: 18-parameter problem, where responses too rare for half the batches to sample carry much of the
#: gradient's variance; from N = 1000, alpha within binomial noise (the calibration tests).
CALIBRATED_FROM_N = 1000
#: The power every minimal detectable effect refers to.
DEFAULT_POWER = 0.8
#: The cosine whose detection the suggested ``N`` refers to.
TARGET_COSINE = 0.99


def batch_range(samples: GradientSamples, lo: int, hi: int) -> GradientSamples:
    """The batches ``lo .. hi - 1`` of ``samples`` as samples of their own (batch ids from 0): i.i.d.
    batches, so disjoint ranges of one large sample are independent Monte Carlo runs."""
    if not 0 <= lo < hi <= samples.num_batches:
        raise ValueError(f"batch range [{lo}, {hi}) outside [0, {samples.num_batches})")
    rows = _rows_of(samples, lo, hi)
    return replace(samples, coef_bt=samples.coef_bt[rows], nt_bt=samples.nt_bt[rows], tok_bt=samples.tok_bt[rows],
                   batch_b=samples.batch_b[rows] - lo, num_batches=hi - lo)


def bias_directions(grad_j: torch.Tensor, m_a: torch.Tensor, g_a: torch.Tensor | None, num_random: int,
                    seed: int) -> torch.Tensor:
    """Test directions from half A, orthonormal, ``[num_params, m]``: ``e = d / |d|`` first, then,
    orthogonal to ``d``: the apparent bias ``b = m_A - c_A d`` (``m_A`` the half-A mean) in its
    whitened form ``(S_A + ridge)^{-1} b`` when per-batch gradients ``g_a`` of half A are given
    (``S_A`` their sample covariance: the direction a test with known covariance would use), else
    ``b`` itself, and ``num_random`` seeded Gaussian directions."""
    d = grad_j.to(torch.float64).reshape(-1)
    e = d / d.norm()
    P = d.numel()
    b = m_a - float(m_a @ e) * e
    if g_a is not None:
        centred = g_a - g_a.mean(0)
        S = centred.T @ centred / max(g_a.shape[0] - 1, 1)
        ridge = WHITEN_RIDGE * max(float(S.trace()) / P, 1e-300)
        # the whitened direction only: adding b itself makes a nearly collinear pair whose
        # difference direction has a tiny, heavy-tailed variance (the joint test then over-rejects)
        b = torch.linalg.solve(S + ridge * torch.eye(P, dtype=torch.float64), b)
    cols = [b.unsqueeze(1)] if float(b.norm()) > 0 else []
    if num_random > 0:
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        cols.append(torch.randn(P, num_random, generator=gen, dtype=torch.float64))
    U = [e.unsqueeze(1)]
    if cols:
        M = torch.cat(cols, 1)
        M = M - e.unsqueeze(1) * (e @ M).unsqueeze(0)
        Q, R = torch.linalg.qr(M)
        diag = R.diagonal().abs()
        keep = diag > 1e-9 * max(float(diag.max()), 1e-300)
        U.append(Q[:, keep])
    return torch.cat(U, 1)


def noise_spectrum(g_np: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    """``(tr Sigma_perp, tr Sigma_perp^2)``: the covariance of the rows ``g_np`` projected orthogonally to
    the unit vector ``e``, estimated from their sample covariance ``S`` (``nu = n - 1`` degrees of freedom)
    as ``tr S`` and ``(tr S^2 - (tr S)^2 / nu) / (1 + 1/nu - 2/nu^2)`` (unbiased for Gaussian rows),
    the latter clipped to its possible range ``[(tr S)^2 / min(P - 1, nu), (tr S)^2]``."""
    n, P = g_np.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 rows, got {n}")
    G = g_np.to(torch.float64) - g_np.to(torch.float64).mean(0)
    G = G - (G @ e).unsqueeze(1) * e.unsqueeze(0)
    nu = n - 1
    M = (G.T @ G if P <= n else G @ G.T) / nu  # same non-zero spectrum
    tr = float(M.trace())
    if tr <= 0.0:
        return 0.0, 0.0
    tr2 = (float((M * M).sum()) - tr * tr / nu) / (1.0 + 1.0 / nu - 2.0 / nu ** 2)
    rank = max(1, min(P - 1, nu))
    return tr, min(max(tr2, tr * tr / rank), tr * tr)


def _round_down_2sig(x: int) -> int:
    """``x`` rounded down to two significant digits (the F test's denominator degrees of freedom in the
    power model: fewer degrees of freedom need a larger shift, so the rounding is conservative)."""
    if x < 100:
        return x
    step = 10 ** (len(str(x)) - 2)
    return x // step * step


def _round_up_2sig(x: int) -> int:
    if x < 100:
        return x
    step = 10 ** (len(str(x)) - 2)
    return -(-x // step) * step


@dataclass
class PowerModel:
    """What :func:`mc_test`'s two tests can detect, from the variances measured in the run.

    *Scale test* (t test of ``c = 1`` on the ``N`` per-batch scales, standard deviation ``s_c``): the
    alternative ``E[g] = c d`` with the measured ``s_c``; detected with probability ``power`` at
    level ``a`` when ``|c - 1| >= delta_t(N - 1, a, power) s_c / sqrt N`` (:meth:`mde_scale`;
    ``delta_t`` the noncentral-t shift of :func:`~tpg.verify.verdict.t_shift_for_power`).

    *Direction test* (Hotelling's test on half B, ``n_B = N - n_A`` batches, in the ``k`` directions
    found on half A, ``n_A = N // 2``; ``k = 1`` by default). The alternative: ``E[g] = d + b`` with ``b`` orthogonal to ``d`` and
    pointing like a typical fluctuation of ``g``, i.e. with the per-batch variance
    ``sigma_b^2 = tr(Sigma_perp^2) / tr(Sigma_perp)`` along it (the variance along ``g - E g`` itself,
    ``Sigma_perp`` the covariance of ``g`` orthogonal to ``d``, :func:`noise_spectrum`), in a noise of
    ``q = (tr Sigma_perp)^2 / tr(Sigma_perp^2)`` effective directions. Half A sees ``b`` through noise
    of covariance ``Sigma_perp / n_A``, so the tested direction keeps a fraction ``t / (t + q / n_A)``
    (``t = |b|^2 / sigma_b^2``) of the squared signal, and half B's noncentrality is

        lambda = n_B t^2 / (t + q / n_A).

    ``lambda = lambda_F(k, n_B - k, a, power)`` (:func:`~tpg.verify.verdict.f_noncentrality_for_power`,
    with ``n_B - k`` rounded down to two significant digits) gives
    ``t = (lambda + sqrt(lambda^2 + 4 n_B lambda q / n_A)) / (2 n_B)`` and the minimal detectable relative
    bias ``|b| / |d| = sqrt(t sigma_b^2) / |d|`` (:meth:`mde_rel_bias`), i.e. a cosine
    ``1 / sqrt(1 + (|b|/|d|)^2)`` (the cosine of ``d + b`` with ``d``; :func:`family_verdicts` uses that of
    ``c d + b`` with the measured scale). The model ignores the whitening's gain on biases in directions
    of small variance (it is conservative there: on the test problem, a baseline of the group's maximum
    reward, cosine 0.9898, was rejected in 40 runs of 40 at half the ``N`` it suggests) and holds
    ``sigma_b^2`` and ``q`` fixed when ``N`` changes (:meth:`samples_for_rel_bias` suggests the ``N`` for
    a given effect).
    """

    num_batches: int
    num_params: int
    grad_norm: float
    scale_sd: float
    var_direction: float
    dim_direction: float
    num_directions: int | None = None

    def directions_at(self, num_batches: int) -> int:
        """``k``: the directions orthogonal to ``d`` the direction test uses (the bias direction and
        ``num_directions`` random ones; at most ``P - 1``)."""
        return max(0, min(self.num_params - 1, 1 + (self.num_directions or 0)))

    def mde_scale(self, level: float, power: float = DEFAULT_POWER) -> float:
        """The ``|c - 1|`` the scale test detects with probability ``power`` at level ``level``."""
        if self.scale_sd == 0.0:
            return 0.0
        N = self.num_batches
        return t_shift_for_power(N - 1, level, power) * self.scale_sd / math.sqrt(N)

    def mde_rel_bias(self, level: float, power: float = DEFAULT_POWER, num_batches: int | None = None) -> float:
        """The ``|b| / |d|`` of a bias orthogonal to ``d`` that the direction test detects with probability
        ``power`` at level ``level`` with ``num_batches`` batches (default: this run's); see the class."""
        N = self.num_batches if num_batches is None else int(num_batches)
        k = self.directions_at(N)
        if k == 0 or self.var_direction == 0.0:
            return 0.0  # no direction orthogonal to d, or a noiseless gradient: nothing goes unseen
        n_a = N // 2
        n_b = N - n_a
        df2 = n_b - k
        lam = f_noncentrality_for_power(k, _round_down_2sig(df2) if df2 >= 1 else None, level, power)
        if not math.isfinite(lam):
            return math.inf
        t = (lam + math.sqrt(lam * lam + 4.0 * n_b * lam * self.dim_direction / n_a)) / (2.0 * n_b)
        return math.sqrt(t * self.var_direction) / self.grad_norm

    def samples_for_rel_bias(self, rel_bias: float, level: float, power: float = DEFAULT_POWER,
                             limit: int = 10 ** 9) -> int | None:
        """The smallest ``N`` (rounded up to two significant digits) at which :meth:`mde_rel_bias` is at most
        ``rel_bias``, or ``None`` past ``limit``."""
        if not rel_bias > 0:
            raise ValueError(f"rel_bias must be > 0, got {rel_bias!r}")

        def ok(n: int) -> bool:
            return self.mde_rel_bias(level, power, n) <= rel_bias

        hi = 8
        while not ok(hi):
            if hi > limit:
                return None
            hi *= 2
        lo = max(hi // 2, 7)
        while hi - lo > max(1, hi // 200):  # ok(hi) holds, ok(lo) does not (or lo = 7)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        n = _round_up_2sig(hi)
        while not ok(n):  # the directions' count changes with N: make sure the rounded N still detects
            n = _round_up_2sig(n + max(1, n // 100))
        return n


@dataclass
class MCResult:
    """One estimator's Monte Carlo test: the raw p-values and what the verdict needs.

    ``verdict`` is taken with this result as its own family (the two tests, Holm-adjusted); the
    harness replaces it by :func:`family_verdicts` over every estimator of a run."""

    verdict: Verdict | None
    mean: torch.Tensor
    target: torch.Tensor
    variance_trace: float
    p_scale: float
    p_direction: float
    scale_mean: float
    scale_se: float
    num_batches: int
    power: PowerModel


def mc_test(samples: GradientSamples, grad_j: torch.Tensor, pi_nv: torch.Tensor, pmap: ParamMap,
            alpha: float = 0.01, num_directions: int | None = None, seed: int = 0,
            target_cosine: float = TARGET_COSINE, power: float = DEFAULT_POWER) -> MCResult:
    """The two tests of ``E[g] = grad_j`` (see the module docstring), the sample mean, the ``tr Cov``
    estimate and the power model; the verdict at family-wise level ``alpha`` for this estimator alone.
    ``num_directions`` seeded random directions join the bias direction (none by default: several
    directions over-reject at small ``N``; the option is there to study the test itself).

    Every batch enters the tests through its projections on the test directions (one gather per
    token); dense per-batch gradients are formed only for the whitening covariance (up to
    ``max(4096, 10 P)`` batches of half A) or the noise spectrum (up to 1024), and the reported
    ``tr Cov`` (up to 8192 batches)."""
    N = samples.num_batches
    if N < 8:
        raise ValueError(f"Monte Carlo mode needs at least 8 samples for its split test, got {N}")
    d = grad_j.to(torch.float64).reshape(-1)
    dn = float(d.norm())
    if dn == 0.0:
        raise ValueError("grad J is 0 for this MDP and policy: there is no direction to test against")
    n_a = N // 2
    P = d.numel()
    k = 0 if num_directions is None else int(num_directions)
    m_a = sample_mean(samples, pi_nv, pmap, 0, n_a)
    whiten = P * DENSE_RATIO <= N
    rows = max(WHITEN_BATCHES, 10 * P) if whiten else max(16, min(SPECTRUM_BATCHES, SPECTRUM_ENTRIES // P))
    g_a = batch_gradients(samples, pi_nv, pmap, 0, max(2, min(n_a, rows)))
    U = bias_directions(d, m_a, g_a if whiten else None, k, seed)
    tr_perp, tr2_perp = noise_spectrum(g_a, d / dn)
    a = centered_directions(pmap.to_logits(U), pi_nv)
    Z = batch_projections(samples.coef_bt, samples.nt_bt, samples.tok_bt, a, samples.batch_b, N)
    mean = sample_mean(samples, pi_nv, pmap)
    trace = sample_variance_trace(samples, pi_nv, pmap)
    c_n = Z[:, 0] / dn
    scale_mean, scale_se, p_scale = scale_test(c_n)
    zb = Z[n_a:, 1:]
    p_direction = hotelling_test(zb) if zb.shape[1] > 0 else 1.0
    model = PowerModel(num_batches=N, num_params=P, grad_norm=dn, scale_sd=scale_se * math.sqrt(N),
                       var_direction=tr2_perp / tr_perp if tr_perp > 0 else 0.0,
                       dim_direction=tr_perp * tr_perp / tr2_perp if tr2_perp > 0 else 0.0,
                       num_directions=num_directions)
    res = MCResult(None, mean, d, trace, p_scale, p_direction, scale_mean, scale_se, N, model)
    res.verdict = family_verdicts([res], alpha, target_cosine=target_cosine, power=power)[0]
    return res


def family_verdicts(results: list[MCResult], alpha: float, target_cosine: float = TARGET_COSINE,
                    power: float = DEFAULT_POWER) -> list[Verdict]:
    """The verdicts of several estimators' tests as one family of ``m = 2 len(results)`` hypotheses
    (the scale and the direction test of each), Holm-adjusted at family-wise level ``alpha``
    (:func:`~tpg.verify.verdict.holm_adjust`, :func:`~tpg.verify.verdict.holm_levels`).

    Each verdict carries both raw and adjusted p-values, the family size, the scale interval at the
    level Holm decided the scale test at, and the power: the minimal detectable effects at level
    ``alpha / m`` (Holm's first, strictest step: the power of the family's least favoured test) and
    the ``N`` at which a bias of cosine ``target_cosine`` would be detected with probability ``power``
    at that level."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    target_rel_bias = rel_bias_of_cosine(target_cosine) if target_cosine < 1 else None
    if target_rel_bias is None:
        raise ValueError(f"target_cosine must be in (0, 1), got {target_cosine!r}")
    ps = [p for r in results for p in (r.p_scale, r.p_direction)]
    m = len(ps)
    if m == 0:
        return []
    adjusted = holm_adjust(ps)
    levels = holm_levels(ps, alpha)
    strictest = alpha / m
    out = []
    for i, r in enumerate(results):
        v = mc_verdict(r.p_scale, r.p_direction, levels[2 * i], levels[2 * i + 1], r.scale_mean, r.scale_se,
                       r.num_batches, r.mean, r.target)
        mde = r.power.mde_rel_bias(strictest, power)
        # cosines of c d + b with d: c = min(1, scale), the conservative conversion (a smaller c makes a
        # given bias cost more cosine); none when the mean does not point uphill
        c = min(1.0, r.scale_mean)
        mde_cos = n_for = None
        if c > 0:
            mde_cos = cosine_of_rel_bias(mde / c) if math.isfinite(mde) else 0.0
            n_for = r.power.samples_for_rel_bias(c * target_rel_bias, strictest, power)
        out.append(replace(v, p_value_adjusted=adjusted[2 * i], p_value_direction_adjusted=adjusted[2 * i + 1],
                           holm_family=m, mde_rel_bias=mde, mde_cosine=mde_cos,
                           mde_scale=r.power.mde_scale(strictest, power), power=power, target_cosine=target_cosine,
                           n_for_cosine=n_for))
    return out
