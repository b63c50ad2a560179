"""Figure variance_length: gradient noise against response length, H = 64 .. 1024 (study ``long_horizon``).

One column per problem (reward family x EOS or not), log-log axes, error bars one standard error
(Monte Carlo, 1000 batches per point; exact grad J from the Markov engine):

(top) noise-to-signal per response, tr Cov[g] x responses per batch / (c |grad J|)^2, with ``c`` the
best-fit scale of the estimator's mean (1 for the unbiased ones; it puts GRPO's scaled means on the
same footing: a step size rescales mean and noise alike);
(bottom) noise-to-signal per token spent, tr Cov[g] x tokens per batch / (c |grad J|)^2 (TRePO's
continuations included; the learned critic's fitting tokens are not): the noise-to-signal of the
gradient averaged over a budget of one token (divide by the budget).

Markers hollow where the Monte Carlo verdict is not ``consistent`` (biased or scaled).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402
from tpg.experiments.studies.long_horizon import METHODS  # noqa: E402

NAME = "variance_length"
STUDY = "long_horizon"

#: method -> (catalog name for the colour, line style, marker)
LOOK = {"reinforce": ("reinforce", "-", "o"), "rloo": ("rloo", "-", "s"), "grpo_mean": ("grpo", "-", "^"),
        "grpo_std": ("grpo", "--", "v"), "ppo_exact": ("ppo_gae", "-", "D"), "ppo_learned": ("ppo_gae", "--", "d"),
        "trepo": ("trepo", "-", "P")}


def _errorbar(ax, x, y, se, method, label, hollow):
    """One method's line with standard-error bars (lower bars clipped above 0 for the log axis)."""
    name, ls, marker = LOOK.get(method, (method, "-", "o"))
    color = style.method_color(name)
    y, se = np.asarray(y, float), np.nan_to_num(np.asarray(se, float))
    lower = np.minimum(se, 0.9 * y)
    ax.errorbar(x, y, yerr=[lower, se], color=color, ls=ls, marker=None, capsize=2, lw=1.2, label=label)
    face = np.where(hollow, "white", color)
    ax.scatter(x, y, marker=marker, facecolors=face, edgecolors=color, s=22, zorder=3)


def own_scale(y, y_se, c, c_se):
    """``y / c^2`` and its standard error (delta method; NaN where ``c <= 0``)."""
    y, y_se, c, c_se = (np.asarray(a, float) for a in (y, y_se, c, c_se))
    c = np.where(c > 0, c, np.nan)
    out = y / c ** 2
    return out, out * np.sqrt((y_se / y) ** 2 + (2 * c_se / c) ** 2)


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    problems = sorted({(r.family, float(r.eos_rate)) for r in df[["family", "eos_rate"]].itertuples()},
                      key=lambda p: (p[0], -p[1]))
    fig, axes = style.plt.subplots(2, len(problems), figsize=(3.3 * len(problems) + 1.5, 6.6), squeeze=False,
                                   sharex="col", layout="constrained")
    labels = dict(METHODS)
    for j, (family, rate) in enumerate(problems):
        p = df[(df["family"] == family) & (df["eos_rate"] == rate)]
        mean_len = p.groupby("horizon")["expected_length"].first()
        for method, label in METHODS:
            m = p[p["method"] == method].sort_values("horizon")
            if m.empty:
                continue
            hollow = (m["verdict"] != "consistent").to_numpy()
            _errorbar(axes[0, j], m["horizon"], m["nsr_own_scale"], m["nsr_own_scale_se"], method, label, hollow)
            y, se = own_scale(m["nsr_x_tokens"], m["nsr_x_tokens_se"], m["scale"], m["scale_se"])
            _errorbar(axes[1, j], m["horizon"], y, se, method, label, hollow)
        eos = (f"EOS, π(EOS) = {rate:g}/H, E[T] ≈ {float((mean_len / mean_len.index).mean()):.2f} H" if rate > 0
               else "no EOS, T = H")
        axes[0, j].set_title(f"{family} rewards\n{eos}")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sorted(p["horizon"].unique()))
            ax.set_xticklabels([str(int(h)) for h in sorted(p["horizon"].unique())])
        axes[1, j].set_xlabel("horizon H (max response length, tokens)")
    axes[0, 0].set_ylabel("noise-to-signal per response\ntr Cov[g]·G / (c |∇J|)²")
    axes[1, 0].set_ylabel("noise-to-signal per token spent\ntr Cov[g]·tokens / (c |∇J|)²")
    handles, names = axes[0, 0].get_legend_handles_labels()
    order = [names.index(labels[m]) for m, _ in METHODS if labels[m] in names]
    fig.legend([handles[i] for i in order], [names[i] for i in order], loc="outside right center",
               title="estimator\n(hollow: verdict not\n'consistent')")
    fig.suptitle("Gradient noise against length on a shared softmax policy (exact ∇J by the Markov engine; "
                 "±1 s.e., 1000 Monte Carlo batches per point)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
