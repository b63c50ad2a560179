"""Figure offpolicy_variance: variance of every policy loss against the size of the mismatch (study
``offpolicy``, part ``sweep``).

Layout as ``offpolicy_bias``. The y axis is the variance inflation ``nsr / nsr(pg, mu = pi)``: the
noise-to-signal ratio per response, ``n tr Cov_mu[g] / |grad J(pi)|^2``, over the on-policy estimator's on the
same problem (1: the on-policy variance), median over the row's problems and estimators, band = min..max.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import _offpolicy as op  # noqa: E402
from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "offpolicy_variance"
ROWS = (("tabular", "tabular MDPs"), ("transformer", "tiny transformer (copy task)"))


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(op.STUDY, cache_dir), op.STUDY)
    sw = style.require(df[df["part"] == "sweep"], op.STUDY)
    sw = op.inflation(sw)
    kinds = [k for k in ("temperature", "top_p", "logit_noise", "stale") if k in set(sw["kind"])]
    rows = [(k, t) for k, t in ROWS if k in set(sw["problem_kind"])]
    fig, axes = style.plt.subplots(len(rows), len(kinds), figsize=(3.4 * len(kinds) + 2.4, 3.0 * len(rows) + 0.6),
                                   squeeze=False, layout="constrained")
    for i, (pkind, ptitle) in enumerate(rows):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            d = sw[(sw["problem_kind"] == pkind) & (sw["kind"] == kind)]
            st = op.sweep_summary(d, "inflation")
            for loss in dict.fromkeys(d["loss"]):
                s = st[st["loss"] == loss]
                style.band(ax, s["size"], s["median"], lo=s["min"], hi=s["max"], label=op.loss_label(loss),
                           color=op.loss_color(loss), marker="o")
            ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
            ax.set_yscale("log")
            n = d.groupby(["problem", "estimator"]).ngroups
            ax.set_title(f"{op.KIND_TITLES[kind]}\n{ptitle}, {n} sweep{'s' if n != 1 else ''}", fontsize=8)
            ax.set_xlabel(op.KIND_X[kind])
            ax.set_ylabel("variance inflation nsr / nsr(on-policy)" if j == 0 else "")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, title="policy loss", title_fontsize=8)
    fig.suptitle("Off-policy variance of each loss against the mismatch: noise-to-signal per response "
                 "n tr Cov[g] / |∇J(π)|², relative to on-policy (exact; median, band min..max)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
