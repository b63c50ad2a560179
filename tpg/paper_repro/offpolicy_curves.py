"""Figure offpolicy_curves: learning curves under a fixed mismatch, one line per correction (study
``offpolicy``, part ``curve``).

One panel per (problem, behaviour): ``tpg train`` with RLOO (8 prompts x 4 responses, one Adam step per
iteration) sampling from ``mu`` (``top_p:0.8``: the engine's nucleus; ``stale:4``: the policy of 4 iterations
earlier) with each policy loss; the exact normalised objective ``(J - J_min) / (J_max - J_min)`` after every
iteration, mean over seeds with a band of ± one standard error; dashed black: the on-policy reference
(``mu = pi``, loss ``pg``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import _offpolicy as op  # noqa: E402
from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "offpolicy_curves"
_KINDS = {"tabular": "tabular MDP", "transformer": "tiny transformer"}


def _curve(ax, c, label, color, ls="-"):
    st = c.groupby("iter")["j_norm"].agg(["mean", "std", "count"]).reset_index()
    se = st["std"].fillna(0.0) / st["count"].clip(lower=1).map(math.sqrt)
    return style.band(ax, st["iter"], st["mean"], err=se, label=label, color=color, marker=None, ls=ls)


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(op.STUDY, cache_dir), op.STUDY)
    cur = style.require(df[df["part"] == "curve"], op.STUDY)
    panels = [(p, b) for p in dict.fromkeys(cur["problem"]) for b in dict.fromkeys(cur[cur["problem"] == p]["behaviour"])
              if b != "pi"]
    fig, axes = style.plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 2.2, 3.9), squeeze=False,
                                   layout="constrained")
    for j, (prob, beh) in enumerate(panels):
        ax = axes[0, j]
        d = cur[(cur["problem"] == prob) & (cur["behaviour"] == beh)]
        for loss in dict.fromkeys(d["loss"]):
            _curve(ax, d[d["loss"] == loss], op.loss_label(loss), op.loss_color(loss))
        ref = cur[(cur["problem"] == prob) & (cur["behaviour"] == "pi")]
        if len(ref):
            _curve(ax, ref, "on-policy reference (μ = π, pg)", "#000000", ls="--")
        kind = _KINDS.get(str(d["problem_kind"].iloc[0]), "")
        ax.set_title(f"{kind}, μ = {beh}\n{prob.split(':', 1)[1]}, {d['seed'].nunique()} seeds", fontsize=8)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("exact normalised J, (J − J_min)/(J_max − J_min)" if j == 0 else "")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, title="correction", title_fontsize=8)
    fig.suptitle("Learning under a fixed mismatch: does the correction change the outcome? (mean over seeds, "
                 "band ± 1 standard error)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
