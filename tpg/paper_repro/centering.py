"""Figure centering: does centering reduce variance (claim 3), what does the std division do (claim 4)
(study ``centering``).

(a) variance of the centred gradient at equal scale (RLOO, i.e. GRPO mean-only divided by 1 - 1/G)
over REINFORCE's on the same G responses, against G, one line per MDP (reward family); below 1 the
centring reduces the variance. (b) GRPO's std-normalised expected gradient: 1 - cosine with grad J
(log scale; 0, a pure rescaling, is drawn at the floor). (c) its step size relative to the
mean-only form, scale / (1 - 1/G): below 1 a smaller learning rate, above 1 a larger one. Filled
markers: exact (all G-tuples enumerated); open with error bars: Monte Carlo ± SE.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "centering"
STUDY = "centering"
FLOOR = 1e-12


def _short(mdp: str) -> str:
    """``dense:vocab=2,horizon=3,...,seed=0`` -> ``dense V2 H3 s0`` (+ ``EOS`` when it has one)."""
    fam, _, rest = mdp.partition(":")
    kv = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
    eos = " EOS" if kv.get("eos", "none") != "none" else ""
    return f"{fam} V{kv.get('vocab', '?')} H{kv.get('horizon', '?')}{eos} s{kv.get('seed', 0)}"


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    df = df[df["grad_j_norm"] >= 1e-8]
    mdps = list(dict.fromkeys(df["mdp"]))
    cmap = style.plt.get_cmap("tab20")
    fig, axes = style.plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained")
    for i, mdp in enumerate(mdps):
        color = cmap(i % 20)
        d = df[df["mdp"] == mdp]
        for src, marker in (("exact", "o"), ("mc", "s")):
            s = d[d["source"] == src]
            if s.empty:
                continue
            r = s[s["method"] == "rloo"].sort_values("group_size")
            g = s[s["method"] == "grpo"].sort_values("group_size")
            kw = dict(color=color, marker=marker, mfc=color if src == "exact" else "white", ms=4, lw=1, capsize=2,
                      ls="-" if src == "exact" else "--")
            label = _short(mdp) + ("" if src == "exact" else " (MC)")
            axes[0].errorbar(r["group_size"], r["var_ratio"], yerr=r["var_ratio_se"] if src == "mc" else None,
                             label=label, **kw)
            axes[1].errorbar(g["group_size"], np.clip(1 - g["cosine"].to_numpy(), FLOOR, None), **kw)
            axes[2].errorbar(g["group_size"], g["lr_multiplier"], **kw)
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[2].axhline(1.0, color="black", lw=0.8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size G (responses per prompt)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tr Cov, centred at equal scale / REINFORCE's")
    axes[0].set_title("(a) claim 3: centring (RLOO = mean-only / (1 − 1/G))")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("1 − cos(E g_GRPO, ∇J)")
    axes[1].set_title("(b) claim 4: direction after the std division")
    axes[2].set_ylabel("scale / (1 − 1/G)  (step vs mean-only)")
    axes[2].set_title("(c) claim 4: step size after the std division")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="outside right center")
    fig.suptitle("Centring and std normalisation of group rewards (one batch = one prompt, G responses; "
                 "filled: exact, open: Monte Carlo ± SE)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
