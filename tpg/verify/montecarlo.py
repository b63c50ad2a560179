"""Monte Carlo verification: ``N`` independent batches, per-batch gradients from the analytic score.

The ``N`` batches are sampled at once (:func:`tpg.rollouts.sample`), stacked with distinct batch ids,
and the estimator runs once per chunk of them with a :class:`~tpg.verify.context.MonteCarloContext`.
No backward pass is taken: each batch's gradient projections are gathers of the score coefficients
(:func:`tpg.verify.score.batch_projections`).

The test of ``E[g] = c grad J`` (:func:`mc_test`) splits the batches in two halves:

1. from half A, the apparent bias ``b = m_A - c_A d`` (``d = grad J``, ``m_A`` the half-A mean,
   ``c_A`` its best scale), whitened by the half-A sample covariance, ``u = (S_A + ridge)^{-1} b``
   (the direction a test with known covariance would use), and made orthogonal to ``d``; for a
   policy with many parameters (more than ``N / 20``) ``b`` itself plus seeded random directions;
2. on half B, Hotelling tests (:func:`tpg.verify.verdict.hotelling_test`) in the directions
   ``U = [d/|d|, u_perp, ...]``: ``E[U^T g] = U^T d`` (``c = 1``) and, for a free ``c``,
   ``E[U_perp^T g] = 0`` without ``d/|d|``.

The directions are chosen independently of half B, so the false-alarm rate is ``alpha`` whatever
the estimator (the slow calibration study checks it over 200 seeds). Why not Hotelling in every
direction at once: a bias often sits in directions of small variance (rarely visited states), where
the sample covariance is estimated from few visits and its inverse is heavy-tailed; the full test
then over-rejects (7.5% at ``alpha = 1%`` on a 28-dimensional problem). The ridge (5% of the mean
eigenvalue) bounds the weight of such directions for the same reason. The price is power: a bias
is flagged when it is large against ``sqrt(u^T Cov u / N)``, so small biases need a larger ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rollouts import sample
from .context import MonteCarloContext, node_paths
from .exact_moments import batch_layout, checked_coef, make_batch, ref_log_probs, rows_per_batch
from .score import ParamMap, batch_logit_gradients, batch_projections, centered_directions, logit_gradient
from .verdict import Verdict, hotelling_test, mc_verdict

#: Rows (responses) handed to the estimator per call.
CHUNK_ROWS = 65_536
#: Batches whose dense gradients estimate ``tr Cov[g]`` (a reported number, not part of the test).
TRACE_BATCHES = 8192


@dataclass
class GradientSamples:
    """``N`` sampled batches reduced to what their gradients need: per-token score coefficients,
    the non-terminal index of each state and the token, and the batch id of each row."""

    coef_bt: torch.Tensor
    nt_bt: torch.Tensor
    tok_bt: torch.Tensor
    batch_b: torch.Tensor
    num_batches: int
    tokens_per_batch: float
    hook_tokens_per_batch: float


def sample_gradient_terms(mdp, policy, estimator, num_batches: int, group_size: int = 1, *,
                          generator: torch.Generator | None = None, seed: int = 0, dtype=torch.float64,
                          ref_policy=None, context: MonteCarloContext | None = None) -> GradientSamples:
    """Sample ``num_batches`` batches and run the estimator on them (in chunks); see the module docstring.

    A batch follows :func:`~tpg.verify.exact_moments.batch_layout`: ``group`` (one prompt, ``G``
    responses), ``independent``/``single`` (``G`` or 1 independent prompt-response pairs, each its
    own group), or ``batch:PxN`` (``P`` independent prompt draws with ``N`` responses each, one
    group per draw)."""
    if not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"Monte Carlo mode needs at least 2 samples (batches), got {num_batches!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    ctx = context if context is not None else MonteCarloContext(mdp, policy, generator=gen, seed=seed)
    layout, G = batch_layout(estimator, group_size)
    tree = mdp.tree
    H = mdp.horizon
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
        if ro.nodes is None:  # the sampler stores node ids only when it walks the tree
            ro.nodes = torch.where(ro.mask, node_paths(tree, ro.prompt, ro.tokens, ro.mask)[:, :H], -1)
        nodes = ro.nodes
        ref = ref_log_probs(ref_policy, tree, ro) if ref_policy is not None else None
        rb = make_batch(estimator, ro, batch_b, dtype, ref)
        out = estimator(rb, ctx)
        coefs.append(checked_coef(estimator, out, ro.tokens.shape))
        nt = torch.where(nodes >= 0, tree.nt_index_n[nodes.clamp(min=0)], torch.full_like(nodes, -1))
        nts.append(nt)
        toks.append(ro.tokens)
        bids.append(batch_b + done)
        tokens += ro.num_tokens
        done += n
    hook = float(ctx.tokens_sampled - hook_before)
    return GradientSamples(coef_bt=torch.cat(coefs), nt_bt=torch.cat(nts), tok_bt=torch.cat(toks),
                           batch_b=torch.cat(bids), num_batches=num_batches,
                           tokens_per_batch=(tokens + hook) / num_batches, hook_tokens_per_batch=hook / num_batches)


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
    (all when ``None``); their gradients are formed densely in logit space, in chunks."""
    N = samples.num_batches if max_batches is None else min(samples.num_batches, max_batches)
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
#: Ridge of the whitening, as a fraction of the mean eigenvalue ``tr(S) / num_params``.
WHITEN_RIDGE = 0.05


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


def default_num_random(num_params: int, num_batches: int) -> int:
    """Random directions besides the bias direction: none when the whitened direction is available,
    else up to 8 (well below the test half's size and the dimension)."""
    if num_params * DENSE_RATIO <= num_batches:
        return 0
    return int(max(0, min(8, num_batches // 100, num_params - 3)))


@dataclass
class MCResult:
    """The Monte Carlo verdict with the sample mean gradient and the estimated ``tr Cov[g]``."""

    verdict: Verdict
    mean: torch.Tensor
    variance_trace: float


def mc_test(samples: GradientSamples, grad_j: torch.Tensor, pi_nv: torch.Tensor, pmap: ParamMap,
            alpha: float = 0.01, num_directions: int | None = None, seed: int = 0) -> MCResult:
    """The Monte Carlo verdict (see the module docstring), the sample mean and ``tr Cov`` estimate.

    Every batch enters the test through its projections on the test directions (one gather per
    token); dense per-batch gradients are formed only for the whitening covariance (up to
    ``max(4096, 10 P)`` batches of half A) and the reported ``tr Cov`` (up to 8192 batches)."""
    N = samples.num_batches
    if N < 8:
        raise ValueError(f"Monte Carlo mode needs at least 8 samples for its split test, got {N}")
    d = grad_j.to(torch.float64).reshape(-1)
    dn = float(d.norm())
    if dn == 0.0:
        raise ValueError("grad J is 0 for this MDP and policy: there is no direction to test against")
    n_a = N // 2
    P = d.numel()
    k = default_num_random(P, N) if num_directions is None else int(num_directions)
    m_a = sample_mean(samples, pi_nv, pmap, 0, n_a)
    g_a = batch_gradients(samples, pi_nv, pmap, 0, min(n_a, max(WHITEN_BATCHES, 10 * P))) \
        if P * DENSE_RATIO <= N else None
    U = bias_directions(d, m_a, g_a, k, seed)
    a = centered_directions(pmap.to_logits(U), pi_nv)
    Z = batch_projections(samples.coef_bt, samples.nt_bt, samples.tok_bt, a, samples.batch_b, N)
    mean = sample_mean(samples, pi_nv, pmap)
    trace = sample_variance_trace(samples, pi_nv, pmap)
    target = torch.zeros(U.shape[1], dtype=torch.float64)
    target[0] = dn
    zb = Z[n_a:]
    p_unbiased = hotelling_test(zb - target)
    p_direction = hotelling_test(zb[:, 1:]) if zb.shape[1] > 1 else 1.0
    return MCResult(mc_verdict(p_unbiased, p_direction, alpha, mean, d, Z[:, 0] / dn), mean, trace)
