"""Figure gamma_bias: bias of GAE with gamma < 1 on zero-reward-assumption rewards (study ``gamma``).

(a) relative bias |E g - grad J| / |grad J| against the GAE discount, per reward family (median
over EOS, horizon and seeds, band = min..max), PPO/GAE with lambda = 1 (line) and the Eq. 26
closed form (crosses); (b) the same against 1 - gamma on log-log axes, where gamma = 1 (exactly
unbiased, plotted at float64 resolution) sits off the axis; (c) cosine between E g and grad J.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "gamma_bias"
STUDY = "gamma"
FLOOR = 1e-16


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    fig, axes = style.plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
    colors = style.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, fam in enumerate(dict.fromkeys(df["family"])):
        c = colors[i % len(colors)]
        sub = df[(df["family"] == fam)]
        ppo = sub[(sub["method"] == "ppo_gae") & (sub["gae_lambda"] == 1.0)]
        st = ppo.groupby("gae_gamma")["rel_bias"].agg(["median", "min", "max"]).reset_index()
        label = f"{fam} rewards" + (" (ZRA twin)" if fam in ("dense", "sparse", "length") else "")
        style.band(axes[0], st["gae_gamma"], st["median"].clip(lower=FLOOR), lo=st["min"].clip(lower=FLOOR),
                   hi=st["max"].clip(lower=FLOOR), label=f"PPO/GAE λ=1, {label}", color=c)
        eq = sub[sub["method"] == "eq26"].groupby("gae_gamma")["rel_bias"].median().reset_index()
        axes[0].plot(eq["gae_gamma"], eq["rel_bias"].clip(lower=FLOOR), "x", color=c, markersize=7)
        lt1 = st[st["gae_gamma"] < 1]
        style.band(axes[1], 1 - lt1["gae_gamma"], lt1["median"], lo=lt1["min"], hi=lt1["max"], color=c)
        cs = ppo.groupby("gae_gamma")["cosine"].agg(["median", "min", "max"]).reset_index()
        style.band(axes[2], cs["gae_gamma"], cs["median"], lo=cs["min"], hi=cs["max"], color=c)
    axes[0].plot([], [], "x", color="k", label="Eq. 26 closed form (enumeration)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("GAE discount γ (dimensionless)")
    axes[0].set_ylabel("relative bias |E g − ∇J| / |∇J|")
    axes[0].set_title("(a) bias against γ (γ = 1: float64 rounding)")
    axes[0].legend(loc="lower left", fontsize=6)
    xs = sorted({1 - g for g in df["gae_gamma"] if g < 1})
    if len(xs) == 1:  # one discount below 1: give the log axis a decade around it
        axes[1].set_xlim(xs[0] / 3, xs[0] * 3)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("1 − γ (dimensionless)")
    axes[1].set_ylabel("relative bias")
    axes[1].set_title("(b) bias against 1 − γ (log-log)")
    axes[2].set_xlabel("GAE discount γ (dimensionless)")
    axes[2].set_ylabel("cosine(E g, ∇J)")
    axes[2].set_title("(c) direction")
    ppo_all = df[(df["method"] == "ppo_gae")]
    if len(ppo_all):
        lo = float(np.nanmin(ppo_all["cosine"]))
        axes[2].set_ylim(min(lo - 0.02, 0.95), 1.005)
    fig.suptitle("PPO/GAE with γ < 1 on zero-reward-assumption rewards (exact, tabular softmax)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
