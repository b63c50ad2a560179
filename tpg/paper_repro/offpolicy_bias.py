"""Figure offpolicy_bias: exact relative bias of every policy loss against the size of the mismatch (study
``offpolicy``, part ``sweep``).

One column per kind of mismatch (engine temperature, top-p, logit noise, staleness), one row per problem kind
(tabular MDPs; the tiny transformer on the copy task): ``|E_mu g - grad J(pi)| / |grad J(pi)|`` of each loss,
median over the problems and estimators (REINFORCE, RLOO with G = 2) of the row, band = min..max. At size 0
(T = 1) mu = pi and every loss is unbiased.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import _offpolicy as op  # noqa: E402
from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "offpolicy_bias"
ROWS = (("tabular", "tabular MDPs"), ("transformer", "tiny transformer (copy task)"))


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(op.STUDY, cache_dir), op.STUDY)
    sw = style.require(df[df["part"] == "sweep"], op.STUDY)
    kinds = [k for k in ("temperature", "top_p", "logit_noise", "stale") if k in set(sw["kind"])]
    rows = [(k, t) for k, t in ROWS if k in set(sw["problem_kind"])]
    fig, axes = style.plt.subplots(len(rows), len(kinds), figsize=(3.4 * len(kinds) + 2.4, 3.0 * len(rows) + 0.6),
                                   squeeze=False, layout="constrained")
    for i, (pkind, ptitle) in enumerate(rows):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            d = sw[(sw["problem_kind"] == pkind) & (sw["kind"] == kind)]
            st = op.sweep_summary(d, "rel_bias")
            for loss in dict.fromkeys(d["loss"]):
                s = st[st["loss"] == loss]
                style.band(ax, s["size"], s["median"], lo=s["min"], hi=s["max"], label=op.loss_label(loss),
                           color=op.loss_color(loss), marker="o")
            n = d.groupby(["problem", "estimator"]).ngroups
            ax.set_title(f"{op.KIND_TITLES[kind]}\n{ptitle}, {n} sweep{'s' if n != 1 else ''}", fontsize=8)
            ax.set_xlabel(op.KIND_X[kind])
            ax.set_ylabel("relative bias |E_μ g − ∇J(π)| / |∇J(π)|" if j == 0 else "")
            ax.set_ylim(bottom=0)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, title="policy loss", title_fontsize=8)
    fig.suptitle("Off-policy bias of each loss against the mismatch (exact; median over problems and estimators, "
                 "band min..max)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
