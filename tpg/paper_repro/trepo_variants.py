"""Figure trepo_variants: TRePO's variants at equal rollout budget (study ``trepo``).

(a) exact relative bias |E g - grad J| / |grad J| of each variant (median over MDPs, bars = min..max;
exact zeros drawn at float64 resolution); (b) variance at equal token budget: tr Cov[g] x tokens per
batch (continuations included), relative to REINFORCE on the same MDP (mean +/- standard error over
MDPs and Monte Carlo seeds; below 1 = more efficient than REINFORCE); (c) where interpolation loses
credit: per token position, the gradient error |m_t - m*_t| / |grad J| of the interpolating variants
against Theorem 2's per-position gradient |m*_t| / |grad J| (grey).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402
from tpg.experiments.studies.trepo import efficiency_table  # noqa: E402

NAME = "trepo_variants"
STUDY = "trepo"
FLOOR = 1e-16


def _label(spec: str) -> str:
    return style.method_label(spec, keep=("anchors", "fill", "K"))


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    s = df[df["kind"] == "summary"]
    specs = list(dict.fromkeys(s["spec"]))
    colors = {"none": style.method_color("reinforce"), "segment": style.method_color("trepo"),
              "ipw": "#9467bd", "interpolate": "#ff7f0e"}
    fill_of = s.drop_duplicates("spec").set_index("spec")["fill"]
    fig, axes = style.plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained",
                                   gridspec_kw={"width_ratios": [1, 1, 1.1]})
    y = np.arange(len(specs))
    rb = s.groupby("spec")["rel_bias"].agg(["median", "min", "max"]).reindex(specs).clip(lower=FLOOR)
    cols = [colors.get(fill_of[sp], "#555555") for sp in specs]
    axes[0].barh(y, rb["median"], color=cols, xerr=[rb["median"] - rb["min"], rb["max"] - rb["median"]])
    axes[0].set_xscale("log")
    axes[0].set_xlim(FLOOR / 3, 3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([_label(sp) for sp in specs], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("relative bias |E g − ∇J| / |∇J| (exact)")
    axes[0].set_title("(a) bias")
    eff = efficiency_table(df).reindex(specs)
    axes[1].barh(y, eff["mean"], xerr=eff["se"].fillna(0), color=cols)
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_yticks(y)
    axes[1].set_yticklabels([])
    axes[1].invert_yaxis()
    axes[1].set_xlabel("tr Cov[g] × tokens per batch, relative to REINFORCE")
    axes[1].set_title("(b) variance at equal token budget")
    p = df[df["kind"] == "position"]
    credit = p.groupby("position")["pos_credit"].median()
    axes[2].plot(credit.index, credit.values, color="0.5", ls="--", marker="s", label="Theorem 2: |m*_t| / |∇J|")
    for sp in [sp for sp in specs if fill_of[sp] == "interpolate"]:
        st = p[p["spec"] == sp].groupby("position")["pos_rel_bias"].agg(["median", "min", "max"])
        style.band(axes[2], st.index, st["median"], lo=st["min"], hi=st["max"], label=_label(sp))
    axes[2].set_xlabel("token position t")
    axes[2].set_ylabel("|m_t − m*_t| / |∇J|  (gradient error at position t)")
    axes[2].set_title("(c) where interpolation loses credit")
    axes[2].legend(fontsize=6)
    axes[2].set_xticks(sorted(p["position"].unique()))
    handles = [style.plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[0].legend(handles, ["REINFORCE (no continuations)", "segment fill", "ipw fill", "interpolate fill"],
                   fontsize=6, loc="lower right")
    fig.suptitle("TRePO variants (exact bias; Monte Carlo variance with continuation noise)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
