"""Shared by the offpolicy_* figure scripts (not a figure: ``tpg figures`` skips private files): the loss
labels and colours, the sweep summaries they plot, and the sweep figures' grid."""

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
#: the kinds of mismatch of the sweeps (one column each) and the problem kinds (one row each)
KINDS = ("temperature", "top_p", "logit_noise", "stale")
SWEEP_ROWS = (("tabular", "tabular MDPs"), ("transformer", "tiny transformer (copy task)"))
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


def sweep_figure(sw, value: str, ylabel: str, title: str, name: str, out_dir: str, *, log: bool):
    """The sweep figures (``offpolicy_bias``, ``offpolicy_variance``): one column per kind of mismatch, one
    row per problem kind; in each panel every loss's median of ``value`` over the row's problems and
    estimators against the size of the mismatch, band = min..max. ``log``: a log y axis with a dotted
    line at 1 (a ratio), else a linear one from 0. Saved as ``name`` in ``out_dir``; the written paths."""
    from . import style

    kinds = [k for k in KINDS if k in set(sw["kind"])]
    rows = [(k, t) for k, t in SWEEP_ROWS if k in set(sw["problem_kind"])]
    fig, axes = style.plt.subplots(len(rows), len(kinds), figsize=(3.4 * len(kinds) + 2.4, 3.0 * len(rows) + 0.6),
                                   squeeze=False, layout="constrained")
    for i, (pkind, ptitle) in enumerate(rows):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            d = sw[(sw["problem_kind"] == pkind) & (sw["kind"] == kind)]
            st = sweep_summary(d, value)
            for loss in dict.fromkeys(d["loss"]):
                s = st[st["loss"] == loss]
                style.band(ax, s["size"], s["median"], lo=s["min"], hi=s["max"], label=loss_label(loss),
                           color=loss_color(loss), marker="o")
            if log:
                ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
                ax.set_yscale("log")
            n = d.groupby(["problem", "estimator"]).ngroups
            ax.set_title(f"{KIND_TITLES[kind]}\n{ptitle}, {n} sweep{'s' if n != 1 else ''}", fontsize=8)
            ax.set_xlabel(KIND_X[kind])
            ax.set_ylabel(ylabel if j == 0 else "")
            if not log:
                ax.set_ylim(bottom=0)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, title="policy loss", title_fontsize=8)
    fig.suptitle(title)
    return style.save(fig, name, out_dir)
