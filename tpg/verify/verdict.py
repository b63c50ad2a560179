"""Verdicts: what the evidence says about ``E[g]`` against the target ``d`` (``grad J``, or its KL form).

The two modes have two vocabularies (:data:`EXACT_VERDICTS`, :data:`MC_VERDICTS`), because they
are different kinds of evidence: an enumeration proves, a finite sample can only reject.

**Exact mode** (:func:`exact_verdict`), with ``m = E[g]`` computed by enumerating the sample space:

* best-fit scale ``c = <m, d> / |d|^2``, cosine ``<m, d> / (|m| |d|)``,
  relative bias ``|m - d| / |d|``, relative residual after scaling ``|m - c d| / |m|`` (the sine of
  the angle between ``m`` and ``d``);
* ``unbiased`` when the relative bias is below ``rel_tol`` (``1e-8`` for float64 estimators),
  ``scaled`` when ``1 - cosine < cos_tol`` (``1e-10``) with ``c > 0``, ``biased`` otherwise.
  A float32 estimator gets ``rel_tol = 1e-4`` and ``cos_tol = 1e-8`` (about a thousand float32
  ulps: rounding that stays at the ulp level is not a bias, a catastrophic cancellation is).

**Monte Carlo mode** (:func:`mc_verdict`): from ``N`` i.i.d. per-batch gradients ``g_i``, two tests
of the hypothesis ``E[g] = d``, each calibrated at its level:

* the *scale test* ``c = 1``: the per-batch scales ``c_i = <g_i, d> / |d|^2`` are i.i.d. with mean
  ``c = <E g, d> / |d|^2``; ``t = (cbar - 1) / (s_c / sqrt N)`` against Student's ``t(N - 1)``, two-sided
  (:func:`scale_test`; exact for Gaussian ``c_i``, by the central limit theorem otherwise);
* the *direction test* ``E[g] || d``: Hotelling's ``T^2`` (:func:`hotelling_test`) of the projections
  on directions orthogonal to ``d`` chosen from a held-out half of the batches
  (:mod:`tpg.verify.montecarlo`).

The *family* is both tests of every estimator verified in one :func:`~tpg.verify.harness.verify` call,
``m = 2 x (estimators)``: one run answers "is any of these estimators off?", so the chance of any
false alarm in the run is what a user pays for. Holm's step-down procedure (:func:`holm_adjust`)
controls it: with the p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted p-values are
``p~_(j) = max_{i <= j} min(1, (m - i + 1) p_(i))`` and a hypothesis is rejected iff ``p~ < alpha``;
then P(any false rejection) ``<= alpha`` whatever the dependence between the tests.

The verdict words (:data:`MC_VERDICTS`) say only what the tests support: ``consistent`` (neither
test rejects: a non-rejection, not a proof), ``consistent-scaled`` (``c = 1`` rejected, the direction
not), ``biased`` (the direction test rejects, or the scale interval lies at or below 0). The scale
interval ``cbar +- t_{1 - a/2}(N - 1) s_c / sqrt N`` is taken at ``a`` = the level at which Holm's
procedure decided the scale test (:func:`holm_levels`), so it excludes 1 exactly when ``c = 1`` is
rejected: a verdict never contradicts its own interval. What a ``consistent`` verdict could have
missed is given by the test's power (:func:`f_noncentrality_for_power`, :func:`t_shift_for_power`;
the minimal detectable effects of :class:`tpg.verify.montecarlo.PowerModel`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

#: Exact mode's verdicts (a proof by enumeration, to float64 tolerances) and what each one means.
EXACT_VERDICTS: dict[str, str] = {
    "unbiased": "E[g] = target: relative error below 1e-8 (1e-4 for a float32 plug-in), enumerated exactly",
    "scaled": "E[g] = c target with c > 0, c != 1: 1 - cosine below 1e-10 (1e-8 for float32)",
    "biased": "E[g] is not a positive multiple of the target",
}
#: Monte Carlo mode's verdicts (the outcome of two Holm-adjusted tests) and what each one means.
MC_VERDICTS: dict[str, str] = {
    "consistent": "E[g] = target not rejected (neither the c = 1 nor the direction test rejects); "
                  "not a proof: see the minimal detectable effects",
    "consistent-scaled": "c = 1 rejected (the scale interval excludes 1) but the direction not: consistent "
                         "with E[g] = c target, c in the interval",
    "biased": "the direction test rejects E[g] || target, or the scale interval lies at or below 0",
}
#: The exact verdicts, as a tuple (kept for callers of the earlier API).
VERDICTS = tuple(EXACT_VERDICTS)

#: (rel_tol, cos_tol) of the exact verdict by the estimator's dtype.
TOLERANCES = {torch.float64: (1e-8, 1e-10), torch.float32: (1e-4, 1e-8)}


@dataclass
class Verdict:
    """One estimator's verdict and the numbers behind it (``None`` where a mode has no such number).

    Monte Carlo fields: ``p_value`` / ``p_value_direction`` the raw p-values of the scale test
    (``c = 1``) and the direction test, ``p_value_adjusted`` / ``p_value_direction_adjusted`` their
    Holm-adjusted values in a family of ``holm_family`` tests, ``scale_se`` the standard error of
    ``scale``, ``scale_ci`` its interval at confidence ``scale_ci_level``; ``mde_rel_bias`` (a bias
    ``b`` orthogonal to the target, ``|b| / |target|``) and ``mde_scale`` (``|c - 1|``) the effects
    detected with probability ``power`` at level ``alpha / holm_family``, ``mde_cosine`` the cosine
    ``c / sqrt(c^2 + mde_rel_bias^2)`` of ``c target + b`` with the target (``c = min(1, scale)``),
    ``n_for_cosine`` the number of batches at which a bias leaving cosine ``target_cosine`` is
    detected with that power (see :class:`tpg.verify.montecarlo.PowerModel`,
    :func:`tpg.verify.montecarlo.family_verdicts`).
    """

    verdict: str
    scale: float
    cosine: float
    rel_bias: float
    rel_residual: float
    p_value: float | None = None
    p_value_direction: float | None = None
    p_value_adjusted: float | None = None
    p_value_direction_adjusted: float | None = None
    holm_family: int | None = None
    scale_se: float | None = None
    scale_ci: tuple[float, float] | None = None
    scale_ci_level: float | None = None
    mde_rel_bias: float | None = None
    mde_cosine: float | None = None
    mde_scale: float | None = None
    power: float | None = None
    target_cosine: float | None = None
    n_for_cosine: int | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.scale_ci is not None:
            out["scale_ci"] = list(self.scale_ci)
        return out


def _geometry(mean: torch.Tensor, grad_j: torch.Tensor) -> tuple[float, float, float, float]:
    """``(scale, cosine, rel_bias, rel_residual)`` of ``mean`` against ``grad_j``."""
    m = mean.to(torch.float64).reshape(-1)
    d = grad_j.to(torch.float64).reshape(-1)
    dn, mn = float(d.norm()), float(m.norm())
    if dn == 0.0:
        return math.nan, math.nan, (0.0 if mn == 0.0 else math.inf), 0.0
    c = float(m @ d) / dn ** 2
    cos = float(m @ d) / (mn * dn) if mn > 0 else 0.0
    rel_bias = float((m - d).norm()) / dn
    resid = float((m - c * d).norm()) / mn if mn > 0 else 0.0
    return c, cos, rel_bias, resid


def exact_verdict(mean: torch.Tensor, grad_j: torch.Tensor, dtype=torch.float64,
                  rel_tol: float | None = None, cos_tol: float | None = None) -> Verdict:
    """The exact-mode verdict of ``E[g] = mean`` against ``grad J`` (see the module docstring)."""
    dflt_rel, dflt_cos = TOLERANCES.get(dtype, TOLERANCES[torch.float64])
    rel_tol = dflt_rel if rel_tol is None else rel_tol
    cos_tol = dflt_cos if cos_tol is None else cos_tol
    c, cos, rel_bias, resid = _geometry(mean, grad_j)
    if math.isnan(c):  # grad J = 0: only E[g] = 0 is unbiased
        verdict = "unbiased" if float(mean.norm()) <= 1e-12 else "biased"
    elif rel_bias < rel_tol:
        verdict = "unbiased"
    elif 1.0 - cos < cos_tol and c > 0:
        verdict = "scaled"
    else:
        verdict = "biased"
    return Verdict(verdict=verdict, scale=c, cosine=cos, rel_bias=rel_bias, rel_residual=resid)


def hotelling_test(z_nk: torch.Tensor) -> float:
    """p-value of ``E[z] = 0`` from ``n`` i.i.d. rows ``z_nk`` (Hotelling's ``T^2``, ``F`` reference).

    Directions in which the sample covariance vanishes carry no information the test can calibrate
    (a rarely visited state that no batch reached) and are left out; only when *every* direction
    has zero variance (a deterministic gradient) is a non-zero mean a certain discrepancy (``p = 0``).
    With ``n <= k`` usable rows the chi-square reference ``n zbar^T S^+ zbar ~ chi2(k)`` is used.
    """
    from scipy import stats

    n, k = z_nk.shape
    if n < 2:
        raise ValueError(f"a statistical test needs at least 2 samples, got {n}")
    z = z_nk.to(torch.float64)
    zbar = z.mean(0)
    S = torch.cov(z.T).reshape(k, k)
    lam, Q = torch.linalg.eigh(S)
    scale = float(z.abs().max()) if z.numel() else 0.0
    keep = lam > max(float(lam.max()), 0.0) * 1e-12 + 1e-300
    y = Q.T @ zbar
    if not bool(keep.any()):
        return 0.0 if float(zbar.abs().max()) > 1e-10 * max(scale, 1e-300) else 1.0
    r = int(keep.sum())
    t2 = n * float((y[keep] ** 2 / lam[keep]).sum())
    if n - r < 1:
        return float(stats.chi2.sf(t2, r))
    f = (n - r) / (r * (n - 1)) * t2
    return float(stats.f.sf(f, r, n - r))


def scale_test(c_n: torch.Tensor) -> tuple[float, float, float]:
    """``(cbar, se, p)``: the mean of the per-batch scales ``c_i``, its standard error ``s_c / sqrt N``
    and the two-sided p-value of ``c = 1`` from ``t = (cbar - 1) / se ~ t(N - 1)``.

    A zero standard error (every batch has the same scale) makes ``c != 1`` certain (``p = 0``), unless
    ``cbar`` is 1 to rounding (then ``(1, 0, 1)``, so that the interval ``[1, 1]`` agrees with it)."""
    from scipy import stats

    n = c_n.numel()
    if n < 2:
        raise ValueError(f"a statistical test needs at least 2 samples, got {n}")
    c = c_n.to(torch.float64)
    mean = float(c.mean())
    se = float(c.std(unbiased=True)) / math.sqrt(n)
    if se <= 1e-15 * max(1.0, abs(mean)):
        return (1.0, 0.0, 1.0) if abs(mean - 1.0) <= 1e-12 * max(1.0, abs(mean)) else (mean, 0.0, 0.0)
    return mean, se, float(2.0 * stats.t.sf(abs(mean - 1.0) / se, n - 1))


def scale_interval(mean: float, se: float, n: int, level: float) -> tuple[float, float]:
    """The two-sided ``1 - level`` t-interval ``mean +- t_{1 - level/2}(n - 1) se`` (dual to :func:`scale_test`:
    it excludes 1 exactly when the p-value of ``c = 1`` is below ``level``)."""
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    half = float(stats.t.isf(level / 2, max(n - 1, 1))) * se if se > 0 else 0.0
    return mean - half, mean + half


def _check_p(p_values) -> list[float]:
    ps = [float(p) for p in p_values]
    if any(not (0.0 <= p <= 1.0) for p in ps):  # NaN fails too
        raise ValueError(f"p-values must lie in [0, 1], got {ps}")
    return ps


def holm_adjust(p_values) -> list[float]:
    """Holm's adjusted p-values, in the input order: with ``p_(1) <= ... <= p_(m)`` (ties in input
    order), ``p~_(j) = max_{i <= j} min(1, (m - i + 1) p_(i))``. Rejecting every hypothesis with
    ``p~ < alpha`` keeps the family-wise error at or below ``alpha`` (Holm 1979)."""
    ps = _check_p(p_values)
    m = len(ps)
    out = [1.0] * m
    running = 0.0
    for j, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - j) * ps[i]))
        out[i] = running
    return out


def holm_levels(p_values, alpha: float) -> list[float]:
    """The level at which Holm's step-down procedure decided each hypothesis, in the input order.

    Step ``j`` (``j = 1..m``, p-values ascending) compares ``p_(j)`` with ``alpha / (m - j + 1)`` and
    rejects while ``p_(j)`` is below it; the first failure stops the procedure. A rejected hypothesis
    gets the level of its own step, every other one the level of the step that stopped. Hence
    ``p < level`` exactly for the rejected ones (``p~ < alpha``), and an interval at confidence
    ``1 - level`` excludes the null value exactly when Holm rejects it."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    ps = _check_p(p_values)
    m = len(ps)
    out = [alpha] * m
    stop = None
    for j, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        level = alpha / (m - j)
        if stop is None and ps[i] < level:
            out[i] = level
        else:
            stop = level if stop is None else stop
            out[i] = stop
    return out


def mc_verdict(p_scale: float, p_direction: float, level_scale: float, level_direction: float, scale_mean: float,
               scale_se: float, n: int, mean: torch.Tensor, grad_j: torch.Tensor) -> Verdict:
    """The Monte Carlo verdict (:data:`MC_VERDICTS`) from the two tests' raw p-values and the levels at
    which Holm's procedure decided them (:func:`holm_levels`; ``alpha`` itself for a lone test pair
    taken without adjustment).

    * ``biased``: ``p_direction < level_direction``, or the scale interval lies at or below 0
      (``E[g]`` does not point uphill);
    * ``consistent-scaled``: otherwise, ``p_scale < level_scale`` (the interval excludes 1);
    * ``consistent``: neither test rejects.

    ``scale`` and its interval (at confidence ``1 - level_scale``) come from the per-batch scales;
    ``cosine``, ``rel_bias`` and ``rel_residual`` are those of the sample mean (noisy, for reading only).
    The power fields are left ``None`` (see :func:`tpg.verify.montecarlo.family_verdicts`)."""
    for name, x in (("level_scale", level_scale), ("level_direction", level_direction)):
        if not 0 < x < 1:
            raise ValueError(f"{name} must be in (0, 1), got {x!r}")
    _, cos, rel_bias, resid = _geometry(mean, grad_j)
    lo, hi = scale_interval(scale_mean, scale_se, n, level_scale)
    if p_direction < level_direction or hi <= 0.0:
        verdict = "biased"
    elif p_scale < level_scale:
        verdict = "consistent-scaled"
    else:
        verdict = "consistent"
    return Verdict(verdict=verdict, scale=scale_mean, cosine=cos, rel_bias=rel_bias, rel_residual=resid,
                   p_value=p_scale, p_value_direction=p_direction, scale_se=scale_se, scale_ci=(lo, hi),
                   scale_ci_level=1.0 - level_scale)


# ------------------------------------------------------------------------------ power
def _solve_increasing(fn, target: float) -> float:
    """The ``x >= 0`` with ``fn(x) = target`` for an increasing ``fn`` (bracketed by doubling)."""
    from scipy import optimize

    hi = 1.0
    while fn(hi) < target:
        hi *= 2.0
        if hi > 1e12:
            return math.inf
    if fn(0.0) >= target:
        return 0.0
    return float(optimize.brentq(lambda x: fn(x) - target, 0.0, hi, xtol=1e-10, rtol=1e-10))


@functools.lru_cache(maxsize=4096)
def f_noncentrality_for_power(k: int, df2: int | None, level: float, power: float = 0.8) -> float:
    """The noncentrality ``lambda`` at which a level-``level`` F test with ``(k, df2)`` degrees of freedom
    rejects with probability ``power``: ``P(F'(k, df2, lambda) > F_{1-level}(k, df2)) = power``
    (chi-square with ``k`` degrees of freedom when ``df2`` is ``None``).

    For Hotelling's test of a mean shift ``mu`` with covariance ``Sigma`` on ``n`` rows,
    ``lambda = n mu^T Sigma^{-1} mu``."""
    from scipy import stats

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if df2 is None:
        crit = float(stats.chi2.isf(level, k))
        return _solve_increasing(lambda lam: float(stats.ncx2.sf(crit, k, lam)) if lam > 0
                                 else float(stats.chi2.sf(crit, k)), power)
    crit = float(stats.f.isf(level, k, df2))
    return _solve_increasing(lambda lam: float(stats.ncf.sf(crit, k, df2, lam)) if lam > 0
                             else float(stats.f.sf(crit, k, df2)), power)


@functools.lru_cache(maxsize=4096)
def t_shift_for_power(df: int, level: float, power: float = 0.8) -> float:
    """The shift ``delta`` (in standard errors) at which the two-sided level-``level`` t test with ``df``
    degrees of freedom rejects with probability ``power``:
    ``P(|T'(df, delta)| > t_{1-level/2}(df)) = power`` (``T'`` noncentral t)."""
    from scipy import stats

    crit = float(stats.t.isf(level / 2, df))

    def rejects(delta: float) -> float:
        lower = float(stats.nct.cdf(-crit, df, delta)) if delta > 0 else float(stats.t.cdf(-crit, df))
        upper = float(stats.nct.sf(crit, df, delta)) if delta > 0 else float(stats.t.sf(crit, df))
        return upper + (lower if math.isfinite(lower) else 0.0)  # the far tail underflows to NaN

    return _solve_increasing(rejects, power)


def cosine_of_rel_bias(rel_bias: float) -> float:
    """The cosine of ``d + b`` with ``d`` for a bias ``b`` orthogonal to ``d``: ``1 / sqrt(1 + (|b|/|d|)^2)``."""
    return 1.0 / math.sqrt(1.0 + rel_bias * rel_bias)


def rel_bias_of_cosine(cosine: float) -> float:
    """The inverse of :func:`cosine_of_rel_bias`: ``|b| / |d| = sqrt(1 / cosine^2 - 1)`` for ``cosine`` in (0, 1]."""
    if not 0 < cosine <= 1:
        raise ValueError(f"cosine must be in (0, 1], got {cosine!r}")
    return math.sqrt(max(1.0 / (cosine * cosine) - 1.0, 0.0))
