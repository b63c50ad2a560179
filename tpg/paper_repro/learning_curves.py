"""Figure learning_curves: exact J during training, every method, over seeds (study ``learning``).

Top row, one panel per problem (a tabular MDP, the copy task with the tiny transformer): the
exact objective J after each iteration for every method trained on the dense token rewards, mean
over seeds with a band of ± one standard deviation (seed spread). Bottom row, claim 7: the
token-level oracle (reward-to-go of the dense token rewards) against the same oracle on the
zero-reward twin (all of RM on the last token, which makes it REINFORCE) and REINFORCE itself:
the same expected update, a different variance.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "learning_curves"
STUDY = "learning"
_TITLES = {"tabular": "tabular policy", "transformer": "tiny transformer"}


def _curve(ax, c, label, color, ls="-"):
    st = c.groupby("iter")["J"].agg(["mean", "std", "count"]).reset_index()
    return style.band(ax, st["iter"], st["mean"], err=st["std"].fillna(0.0),
                      label=f"{label} (n={int(st['count'].max())})", color=color, marker=None, ls=ls)


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    cur = style.require(df[df["kind"] == "curve"], STUDY)
    problems = list(dict.fromkeys(cur["problem"]))
    fig, axes = style.plt.subplots(2, len(problems), figsize=(5.6 * len(problems) + 1.5, 7.6), squeeze=False,
                                   layout="constrained")
    for j, prob in enumerate(problems):
        d = cur[cur["problem"] == prob]
        kind = d["problem_kind"].iloc[0]
        ax, bx = axes[0, j], axes[1, j]
        dense = d[d["reward"] == "dense"]
        for method in dict.fromkeys(dense["method"]):
            _curve(ax, dense[dense["method"] == method], style.method_name(method), style.method_color(method))
        j_max = float(d["j_max"].iloc[0])
        for a in (ax, bx):
            a.axhline(j_max, color="0.5", lw=0.8, ls=":")
            a.set_xlabel("training iteration")
            a.set_ylabel("exact J (reward units; dotted: best J)")
        ax.set_title(f"{_TITLES.get(kind, kind)}: {prob.split(':', 1)[1]}", fontsize=8)
        comp = (("reward_to_go", "dense", "token oracle, dense token rewards", "-"),
                ("reward_to_go", "terminal", "token oracle, terminal twin (= REINFORCE)", "--"),
                ("reinforce", "dense", "REINFORCE (RM only)", ":"))
        for method, reward, label, ls in comp:
            c = d[(d["method"] == method) & (d["reward"] == reward)]
            if len(c):
                _curve(bx, c, label, style.method_color(method), ls)
        bx.set_title("claim 7: token-level vs response-level rewards", fontsize=9)
        if bx.get_legend_handles_labels()[0]:
            bx.legend(fontsize=6, loc="lower right")
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Learning curves with the exact objective (mean over seeds, band: ± 1 sd)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
