"""Figure zero_groups: GRPO's zero-gradient groups against the per-step signal (study ``zero_groups``).

(a) probability that one batch (a prompt and its G responses) gives a zero gradient, against G:
GRPO's equals P(all G rewards equal) (grey line, closed form), PPO's (exact critic) is 0, TRePO's
with K sampled continuations is small. (b) on the groups where GRPO's gradient is zero, the
probability that the method's gradient is not. (c) expected gradient norm E|g| of a batch. (d) on
those groups, whether the signal climbs J: E[<g, grad J> | GRPO zero] / |grad J|^2 (above 0: uphill;
1: an average unbiased batch's ascent), the number the claim-5 rule decides on.
Exact values (enumerated groups) are filled markers, Monte Carlo ones open markers with error bars
(standard errors); line style tells the MDPs apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "zero_groups"
STUDY = "zero_groups"
_DASHES = ["-", "--", ":", "-."]


def _short(mdp: str) -> str:
    """``sparse:vocab=3,horizon=3,...,seed=1`` -> ``sparse V3 H3 s1``."""
    fam, _, rest = mdp.partition(":")
    kv = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
    return f"{fam} V{kv.get('vocab', '?')} H{kv.get('horizon', '?')} s{kv.get('seed', 0)}"


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    from matplotlib.lines import Line2D

    df = style.require(load_results(STUDY, cache_dir), STUDY)
    mdps = list(dict.fromkeys(df["mdp"]))
    Ks = sorted(df["K"].unique())
    fig, axes = style.plt.subplots(1, 4, figsize=(17, 5.0), layout="constrained")
    panels = (("frac_zero_grad", "frac_zero_grad_se", "P(batch gradient = 0)", "(a) zero-gradient batches"),
              ("frac_nonzero_given_grpo_zero", "frac_nonzero_given_grpo_zero_se", "P(gradient ≠ 0 | GRPO's = 0)",
               "(b) signal where GRPO has none"),
              ("mean_grad_norm", "mean_grad_norm_se", "E|g| (parameter units)", "(c) expected gradient norm"),
              ("uphill_given_grpo_zero", "uphill_given_grpo_zero_se", "E[<g, ∇J> | GRPO's = 0] / |∇J|²",
               "(d) does that signal climb J?"))
    if "uphill_given_grpo_zero" not in df.columns:  # cached before the ascent was measured
        panels = panels[:3]
        axes[3].set_visible(False)
    curves = {}  # legend entry -> (colour, marker, filled)
    for i, mdp in enumerate(mdps):
        d = df[df["mdp"] == mdp]
        dash = _DASHES[i % len(_DASHES)]
        closed = d.groupby("group_size")["p_all_equal"].first().sort_index()
        axes[0].plot(closed.index, closed.to_numpy(), color="0.6", lw=3, alpha=0.5, ls=dash)
        for (method, src, K), c in d.groupby(["method", "source", "K"], sort=False):
            # only TRePO's sampled rows depend on K (exact TRePO takes K -> infinity; the others ignore it)
            if K != Ks[0] and not (method == "trepo" and src == "mc"):
                continue
            c = c.sort_values("group_size")
            color = style.method_color(method)
            name = style.method_name(method)
            marker = "o"
            if method == "trepo":
                name += f" K={K}" if src == "mc" else " K→∞"
                marker = "os^Dv"[Ks.index(K) % 5] if src == "mc" else "o"
            filled = src == "exact"
            curves[f"{name}, {'exact' if filled else 'Monte Carlo'}"] = (color, marker, filled)
            for ax, (col, se, _, _) in zip(axes, panels):
                if method == "grpo" and col in ("frac_nonzero_given_grpo_zero", "uphill_given_grpo_zero"):
                    continue
                ax.errorbar(c["group_size"], c[col], yerr=None if filled else c[se].fillna(0), color=color, ls=dash,
                            marker=marker, mfc=color if filled else "white", ms=4, lw=1, capsize=2)
    for ax, (_, _, ylabel, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size G (responses per prompt)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].set_ylim(-0.03, 1.03)
    axes[3].axhline(0.0, color="0.3", lw=1, ls="--")
    handles = [Line2D([], [], color="0.6", lw=3, alpha=0.5, label="P(all G rewards equal), closed form")]
    handles += [Line2D([], [], color=c, marker=m, mfc=c if f else "white", ls="none", label=lab)
                for lab, (c, m, f) in curves.items()]
    handles += [Line2D([], [], color="black", ls=_DASHES[i % len(_DASHES)], label=_short(mdp))
                for i, mdp in enumerate(mdps)]
    fig.legend(handles=handles, fontsize=6, loc="outside lower center", ncol=5)
    fig.suptitle("Sparse binary rewards: GRPO's all-equal groups give no gradient, per-step advantages still do (and climb J)\n"
                 "(filled: exact, open: Monte Carlo ± SE; line style: MDP)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
