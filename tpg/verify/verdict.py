"""Verdicts: is ``E[g] = grad J`` (unbiased), ``E[g] = c grad J`` with ``c != 1`` (scaled), or neither?

Exact mode (:func:`exact_verdict`), with ``m = E[g]`` and ``d = grad J``:

* best-fit scale ``c = <m, d> / |d|^2``, cosine ``<m, d> / (|m| |d|)``,
  relative bias ``|m - d| / |d|``, relative residual after scaling ``|m - c d| / |m|`` (the sine of
  the angle between ``m`` and ``d``);
* ``unbiased`` when the relative bias is below ``rel_tol`` (``1e-8`` for float64 estimators),
  ``scaled`` when ``1 - cosine < cos_tol`` (``1e-10``) with ``c > 0``, ``biased`` otherwise.
  A float32 estimator gets ``rel_tol = 1e-4`` and ``cos_tol = 1e-8`` (about a thousand float32
  ulps: rounding that stays at the ulp level is not a bias, a catastrophic cancellation is).

Monte Carlo mode (:func:`hotelling_test`, :func:`mc_verdict`): from ``n`` i.i.d. projected gradients
``z_i = U^T g_i - U^T c d`` (``k`` fixed directions ``U``, chosen independently of the ``z_i``),
Hotelling's ``T^2 = n zbar^T S^{-1} zbar``, ``(n - k) / (k (n - 1)) T^2 ~ F(k, n - k)`` under the null
(exact for Gaussian ``z``, asymptotic otherwise), so the false-alarm rate is ``alpha`` by
construction, with tolerances that come from the sample covariance. The verdict is ``unbiased``
when ``c = 1`` is not rejected at ``alpha``, ``scaled`` when only a free ``c`` survives (the
directions orthogonal to ``d``), ``biased`` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

VERDICTS = ("unbiased", "scaled", "biased")

#: (rel_tol, cos_tol) of the exact verdict by the estimator's dtype.
TOLERANCES = {torch.float64: (1e-8, 1e-10), torch.float32: (1e-4, 1e-8)}


@dataclass
class Verdict:
    """One estimator's verdict and the numbers behind it (``None`` where a mode has no such number)."""

    verdict: str
    scale: float
    cosine: float
    rel_bias: float
    rel_residual: float
    p_value: float | None = None
    p_value_direction: float | None = None
    scale_ci: tuple[float, float] | None = None

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


def scale_interval(c_n: torch.Tensor, alpha: float) -> tuple[float, float, float]:
    """Mean of per-batch scales ``c_i = <g_i, d> / |d|^2`` and its two-sided ``1 - alpha`` t-interval."""
    from scipy import stats

    n = c_n.numel()
    mean = float(c_n.mean())
    se = float(c_n.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    half = float(stats.t.ppf(1 - alpha / 2, max(n - 1, 1))) * se
    return mean, mean - half, mean + half


def mc_verdict(p_unbiased: float, p_direction: float, alpha: float, mean: torch.Tensor, grad_j: torch.Tensor,
               c_n: torch.Tensor) -> Verdict:
    """The Monte Carlo verdict from the two tests' p-values (``c = 1``; free ``c``) at level ``alpha``.

    ``scale`` and its interval come from the per-batch scales ``c_n``; ``cosine``, ``rel_bias`` and
    ``rel_residual`` are those of the sample mean (noisy, for reading only)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    _, cos, rel_bias, resid = _geometry(mean, grad_j)
    c, lo, hi = scale_interval(c_n, alpha)
    if p_unbiased >= alpha:
        verdict = "unbiased"
    elif p_direction >= alpha and c > 0:
        verdict = "scaled"
    else:
        verdict = "biased"
    return Verdict(verdict=verdict, scale=c, cosine=cos, rel_bias=rel_bias, rel_residual=resid,
                   p_value=p_unbiased, p_value_direction=p_direction, scale_ci=(lo, hi))
