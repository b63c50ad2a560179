"""Figure offpolicy_length: how each correction's variance grows with the response length (study
``offpolicy``, part ``length``).

REINFORCE on stationary problems (the same policy and token reward at every state, no EOS, so every response
has H tokens) under one fixed per-token mismatch per panel. y: the variance inflation
``nsr(loss, mu) / nsr(pg, pi)`` at each length H, median over the seeds, band = min..max; dashed black: the
sequence ratio's second moment ``E_mu[rho^2]``, the variance factor of sequence-level IS, which is
``E_mu[r^2]^H`` here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import _offpolicy as op  # noqa: E402
from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "offpolicy_length"


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(op.STUDY, cache_dir), op.STUDY)
    ln = style.require(df[df["part"] == "length"], op.STUDY)
    ref = ln[ln["on_policy"].astype(bool) & (ln["loss"] == "pg")].set_index(["series", "horizon"])["nsr"]
    off = ln[~ln["on_policy"].astype(bool)].copy()
    off["inflation"] = off["nsr"].to_numpy() / ref.reindex(list(zip(off["series"], off["horizon"]))).to_numpy()
    behaviours = list(dict.fromkeys(off["behaviour"]))
    fig, axes = style.plt.subplots(1, len(behaviours), figsize=(5.0 * len(behaviours) + 2.2, 3.8), squeeze=False,
                                   layout="constrained")
    for j, beh in enumerate(behaviours):
        ax = axes[0, j]
        d = off[off["behaviour"] == beh]
        for loss in dict.fromkeys(d["loss"]):
            st = d[d["loss"] == loss].groupby("horizon")["inflation"].agg(["median", "min", "max"]).reset_index()
            style.band(ax, st["horizon"], st["median"], lo=st["min"], hi=st["max"], label=op.loss_label(loss),
                       color=op.loss_color(loss), marker="o")
        rho = d[d["loss"] == "is_seq"].groupby("horizon")["seq_ratio_second_moment"].median()
        ax.plot(rho.index, rho.to_numpy(), "k--", lw=1.2, label="E_μ[ρ²] (sequence ratio's second moment)")
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("response length H (tokens)")
        ax.set_ylabel("variance inflation nsr(loss, μ) / nsr(pg, π)")
        ax.set_title(f"REINFORCE, μ = {beh}, {d['series'].nunique()} seeds", fontsize=9)
        ax.set_xticks(sorted(d["horizon"].unique()))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle("Variance of each correction against the response length (exact; median over seeds, band min..max)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
