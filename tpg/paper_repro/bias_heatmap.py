"""Figure bias_heatmap: the exact verdict matrix (study ``bias``).

(a) log10 relative bias |E g - grad J| / |grad J| and (b) cosine(E g, grad J), estimator by
setting (reward family, EOS, gamma, group size G) with the unbiased aggregation
``seq-mean-token-sum``, worst case over seeds; (c) the worst cosine of each estimator under each
aggregation mode. Reads the cached results; only plots.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "bias_heatmap"
STUDY = "bias"
FLOOR = 1e-16  # exact zeros are rounding: plot them at float64's resolution


def _setting(row) -> str:
    eos = "EOS" if str(row["eos"]) != "none" else "no EOS"
    return f"{row['family']}, {eos}, γ={row['gamma']:g}, G={int(row['group_size'])}"


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY).copy()
    order = list(dict.fromkeys(df["spec"]))
    labels = [style.method_label(s) for s in order]
    df["setting"] = df.apply(_setting, axis=1)
    base = df[df["agg"] == "seq-mean-token-sum"]
    if base.empty:
        base = df[df["agg"] == df["agg"].iloc[0]]
    settings = list(dict.fromkeys(base.sort_values(["family", "eos", "gamma", "group_size"])["setting"]))
    bias = (base.assign(rb=base["rel_bias"].astype(float).fillna(np.inf).clip(lower=FLOOR))
            .pivot_table(index="spec", columns="setting", values="rb", aggfunc="max").reindex(index=order,
                                                                                                columns=settings))
    cos = base.pivot_table(index="spec", columns="setting", values="cosine", aggfunc="min").reindex(
        index=order, columns=settings)
    aggs = list(dict.fromkeys(df["agg"]))
    cos_agg = df.pivot_table(index="spec", columns="agg", values="cosine", aggfunc="min").reindex(
        index=order, columns=aggs)

    n_set = len(settings)
    fig_w = min(18.0, max(8.0, 4.0 + 0.2 * n_set + 0.45 * len(aggs)))
    fig, ax = style.plt.subplot_mosaic([["a", "c"], ["b", "c"]], figsize=(fig_w, 0.5 * len(order) + 4.0),
                                       width_ratios=[n_set, max(len(aggs), 2) * 1.3], layout="constrained")
    lb = np.log10(np.clip(bias.to_numpy(dtype=float), FLOOR, 1e3))
    im0 = ax["a"].imshow(lb, aspect="auto", cmap="magma_r", vmin=-16, vmax=0.5)
    ax["a"].set_title("(a) log10 relative bias |E g − ∇J| / |∇J|  (aggregation seq-mean-token-sum)")
    im1 = ax["b"].imshow(cos.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
    ax["b"].set_title("(b) cosine(E g, ∇J)  (aggregation seq-mean-token-sum)")
    im2 = ax["c"].imshow(cos_agg.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
    ax["c"].set_title("(c) worst cosine per\naggregation mode")
    ax["a"].set_xticks(range(n_set))
    ax["a"].set_xticklabels([])
    ax["b"].set_xticks(range(n_set))
    ax["b"].set_xticklabels(settings, rotation=90, fontsize=6)
    ax["b"].set_xlabel("setting (reward family, EOS, discount γ, group size G)")
    ax["c"].set_xticks(range(len(aggs)))
    ax["c"].set_xticklabels(aggs, rotation=90, fontsize=7)
    for key in ("a", "b", "c"):
        ax[key].set_yticks(range(len(order)))
        ax[key].set_yticklabels(labels, fontsize=7)
        ax[key].grid(False)
    fig.colorbar(im0, ax=ax["a"], shrink=0.8, pad=0.01, label="log10 rel. bias")
    fig.colorbar(im1, ax=ax["b"], shrink=0.8, pad=0.01, label="cosine")
    fig.colorbar(im2, ax=ax["c"], shrink=0.5, pad=0.01, label="cosine")
    fig.suptitle("Exact bias of every estimator (tabular softmax, V=2, H=3, 2 prompts; worst case over seeds)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
