"""Shared by the offpolicy_* figure scripts (not a figure: ``tpg figures`` skips private files): the loss
labels and colours, and the sweep summaries they plot."""

from __future__ import annotations

import numpy as np

STUDY = "offpolicy"
#: loss spec -> (label, colour): fixed so that a loss looks the same in every panel and figure
LOSS_STYLE: dict[str, tuple[str, str]] = {
    "pg": ("pg (no correction)", "#7f7f7f"),
    "is_token": ("is_token (π/μ per token)", "#1f77b4"),
    "is_seq": ("is_seq (sequence ratio)", "#d62728"),
    "tis:2": ("tis:2 (truncated, token)", "#2ca02c"),
    "tis:2,level=seq": ("tis:2, level=seq", "#98df8a"),
    "mis:0.5,2": ("mis:0.5,2 (masked)", "#9467bd"),
    "ppo_clip:0.2": ("ppo_clip:0.2 (π_old = μ)", "#ff7f0e"),
    "gspo:0.0004,clip_low=0.0003": ("gspo (geometric-mean ratio)", "#8c564b"),
    "cispo:0.2": ("cispo:0.2", "#e377c2"),
}
KIND_TITLES = {"temperature": "temperature: μ ∝ π^(1/T)", "top_p": "top-p: μ = π on its nucleus, renormalised",
               "logit_noise": "logit noise: z + σ ε (one fixed draw)", "stale": "staleness: μ = π, k ascent steps earlier"}
KIND_X = {"temperature": "engine temperature T (T = 1: μ = π)", "top_p": "mass cut off, 1 − p (0: μ = π)",
          "logit_noise": "noise σ (0: μ = π)", "stale": "staleness k, exact ascent steps (0: μ = π)"}


def loss_label(spec: str) -> str:
    return LOSS_STYLE.get(spec, (spec, "#333333"))[0]


def loss_color(spec: str) -> str:
    return LOSS_STYLE.get(spec, (spec, "#333333"))[1]


def sweep_summary(d, value: str):
    """Per (loss, size): median, min and max of ``value`` over the sweeps in ``d`` (rows without errors)."""
    d = d[d["verdict"] != "error"]
    st = d.groupby(["loss", "size"])[value].agg(["median", "min", "max", "count"]).reset_index()
    return st


def inflation(d):
    """``d`` with ``inflation = nsr / nsr(pg at mu = pi)`` of the same sweep (problem, estimator, kind)."""
    key = ["problem", "estimator", "group_size", "kind"]
    ref = d[d["on_policy"].astype(bool) & (d["loss"] == "pg")].set_index(key)["nsr"].rename("nsr_ref")
    out = d.join(ref, on=key)
    out = out.assign(inflation=out["nsr"] / out["nsr_ref"])
    out.loc[~np.isfinite(out["inflation"]), "inflation"] = np.nan
    return out
