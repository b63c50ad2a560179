"""Figure variance_frontier: mean squared error to grad J against tokens sampled (study ``variance``).

For each MDP (two per row), top: ``MSE / |grad J|^2`` of the gradient averaged over ``n`` batches against
the tokens those batches cost (responses, continuations and greedy responses), log-log, one line
with markers per method and configuration (``n = 1, 2, 4, ...`` left to right); error bars are
Monte Carlo standard errors (sampled variances: TRePO, large groups). An unbiased method falls with
slope -1; a biased one (GRPO) levels off at its squared bias. Below it: the variance-cost product
``tr Cov[g] x tokens per batch / |grad J|^2`` of one batch (lower is cheaper at any budget for an
unbiased method; hatched: biased, whose MSE does not shrink to 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "variance_frontier"
STUDY = "variance"
_MARKERS = "osD^v<>pPXh*"
_DASHES = ["-", "--", ":", "-."]


def _label(spec: str, G: int) -> str:
    return style.method_label(spec) + (f", G={G}" if G > 1 else "")


def _styles(configs: list[tuple[str, int]]) -> dict:
    """A marker and dash per configuration, cycling within each method (colour = method)."""
    out, seen = {}, {}
    for spec, G in configs:
        name = style.method_name(spec)
        i = seen.get(name, 0)
        seen[name] = i + 1
        out[(spec, G)] = (style.method_color(spec), _MARKERS[i % len(_MARKERS)], _DASHES[i % len(_DASHES)])
    return out


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    mdps = list(dict.fromkeys(df["mdp"]))
    # the cell's spec as written (TRePO's K and anchors always shown), not the canonical one
    configs = list(dict.fromkeys(zip(df["estimator"], df["group_size"].astype(int))))
    look = _styles(configs)
    ncol = min(2, len(mdps))
    nblock = -(-len(mdps) // ncol)
    fig, axes = style.plt.subplots(2 * nblock, ncol, figsize=(6.2 * ncol + 2.8, 8.0 * nblock), squeeze=False,
                                   layout="constrained", gridspec_kw={"height_ratios": [1.3, 1.0] * nblock})
    for ax in axes.flat[2 * len(mdps):]:
        ax.set_visible(False)
    for j, mdp in enumerate(mdps):
        blk, col = divmod(j, ncol)
        ax, bx = axes[2 * blk, col], axes[2 * blk + 1, col]
        d = df[df["mdp"] == mdp]
        bars = []
        for (spec, G), c in d.groupby(["estimator", "group_size"], sort=False):
            c = c.sort_values("batches")
            color, marker, dash = look[(spec, int(G))]
            gn2 = c["grad_norm_sq"].to_numpy()
            y = np.clip(c["rel_mse"].to_numpy(), 1e-12, None)
            ax.errorbar(c["tokens"], y, yerr=c["mse_se"].to_numpy() / gn2, color=color, marker=marker, ls=dash,
                        ms=3.5, lw=1.0, capsize=1.5, label=_label(spec, int(G)))
            first = c.iloc[0]
            biased = float(first["bias_sq"]) > 1e-10 * float(first["grad_norm_sq"])
            gn2_1 = float(first["grad_norm_sq"])
            bars.append((_label(spec, int(G)), float(first["variance_x_tokens"]) / gn2_1,
                         float(first["variance_trace_se"]) * float(first["tokens_per_batch"]) / gn2_1, color, biased))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens sampled per gradient (responses + continuations + greedy)")
        ax.set_ylabel("MSE to ∇J / |∇J|²")
        ax.set_title(mdp, fontsize=8)
        bars.sort(key=lambda b: b[1])
        ypos = np.arange(len(bars))
        bx.barh(ypos, [b[1] for b in bars], xerr=[b[2] for b in bars], color=[b[3] for b in bars],
                hatch=None, edgecolor="white")
        for y, b in zip(ypos, bars):
            if b[4]:
                bx.barh([y], [b[1]], color="none", edgecolor="black", hatch="///", linewidth=0)
        bx.set_yticks(ypos, [b[0] for b in bars], fontsize=6)
        bx.set_xscale("log")
        bx.xaxis.set_minor_formatter(NullFormatter())
        bx.set_xlabel("tr Cov[g] × tokens per batch / |∇J|²  (tokens; lower = cheaper)")
    axes[0, ncol - 1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1)
    fig.suptitle("Cost-efficiency frontier: MSE of the averaged gradient against tokens sampled "
                 "(hatched: biased estimator)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
