"""Figure aggregation_kl: loss aggregation under variable lengths, and KL placements (study ``aggregation_kl``).

(a) direction error of each aggregation mode (the sine of the angle between E g and grad J)
against the batch size, median over MDPs and estimators (REINFORCE, RLOO, PPO), band = min..max;
(b) the best-fit scale <E g, grad J> / |grad J|^2 against the batch size; (c) the KL term each
placement adds to the expected gradient, k_hat = (E g_none - E g_kl) / beta, against the exact
gradient of the sequence KL: relative error |k_hat - grad KL_seq| / |grad KL_seq| per estimator
(exact zeros drawn at float64 resolution).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "aggregation_kl"
STUDY = "aggregation_kl"
FLOOR = 1e-16
KL_LABELS = {"k1_reward": "k1 in reward", "k1": "k1 loss", "k2": "k2 loss", "k3": "k3 loss (low_var_kl)"}


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    fig, axes = style.plt.subplots(1, 3, figsize=(13, 4.0), layout="constrained")
    a = df[df["part"] == "agg"]
    colors = style.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(dict.fromkeys(a["agg_mode"])):
        sub = a[a["agg_mode"] == mode]
        st = sub.groupby("batch_size").agg(m=("rel_residual", "median"), lo=("rel_residual", "min"),
                                           hi=("rel_residual", "max"), s=("scale", "median"), slo=("scale", "min"),
                                           shi=("scale", "max")).reset_index()
        c = colors[i % len(colors)]
        style.band(axes[0], st["batch_size"], st["m"].clip(lower=FLOOR), lo=st["lo"].clip(lower=FLOOR),
                   hi=st["hi"].clip(lower=FLOOR), label=mode, color=c)
        style.band(axes[1], st["batch_size"], st["s"], lo=st["slo"], hi=st["shi"], label=mode, color=c)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("batch size (responses per batch)")
    axes[0].set_ylabel("sine of the angle between E g and ∇J")
    axes[0].set_title("(a) direction error of each aggregation mode")
    axes[0].legend(fontsize=6)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("batch size (responses per batch)")
    axes[1].set_ylabel("scale ⟨E g, ∇J⟩ / |∇J|² (dimensionless)")
    axes[1].set_title("(b) scale of each aggregation mode")
    if len(a):
        sizes = sorted(a["batch_size"].unique())
        for ax in axes[:2]:
            ax.set_xticks(sizes)
    k = df[df["part"] == "kl"]
    if len(k):
        kinds = [x for x in KL_LABELS if x in set(k["kl_kind"])]
        ests = list(dict.fromkeys(k["spec"]))
        width = 0.8 / max(len(ests), 1)
        x = np.arange(len(kinds))
        for j, e in enumerate(ests):
            st = k[k["spec"] == e].groupby("kl_kind")["kl_rel_err"].agg(["median", "min", "max"]).reindex(kinds)
            med = st["median"].clip(lower=FLOOR)
            axes[2].bar(x + (j - (len(ests) - 1) / 2) * width, med, width, color=style.method_color(e),
                        label=style.method_name(e),
                        yerr=[med - st["min"].clip(lower=FLOOR), st["max"].clip(lower=FLOOR) - med])
        axes[2].set_xticks(x)
        axes[2].set_xticklabels([KL_LABELS[x_] for x_ in kinds])
        axes[2].set_yscale("log")
        axes[2].set_ylim(FLOOR / 3, 10)
        axes[2].legend(fontsize=6)
    axes[2].set_ylabel("|k̂ − ∇KL_seq| / |∇KL_seq|")
    axes[2].set_title("(c) KL placement vs the exact sequence-KL gradient")
    fig.suptitle("Aggregation modes under EOS-variable lengths and KL placements (exact, tabular softmax)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
