"""Figure critic_error: PPO/GAE against critic error (study ``critic``).

(a) relative bias |E g - grad J| / |grad J| against the critic's error sigma, one line per GAE
lambda (median over MDPs and critic seeds, band = min..max); lambda = 1 stays at rounding level.
(b) per-response noise-to-signal ratio n tr Cov[g] / |E g|^2 relative to RLOO's on the same MDP,
with the critic-free GRPO and ReMax as horizontal lines (below 1 = less noisy than RLOO).
(c) per-response mean squared error (n tr Cov[g] + |E g - grad J|^2) relative to RLOO's.
(d) claim 2: per-response tr Cov of RLOO (G = 2, 4) and of the exact critic's per-step advantages,
relative to REINFORCE with the exact global baseline E[RM(W^(1))], one point per MDP (bar = median);
the claim-2 rule decides on RM - V'(s_t), the per-step baseline a practitioner can use.
(e) claim 1: PPO's (lambda = 0.9) noise-to-signal ratio to the best critic-free method (GRPO, RLOO,
ReMax) against the critic's measured error (RMS of V_hat - V' over visited states / std RM), one
line per MDP; the dotted line marks a good critic's error bound, the crosses each MDP's crossover.
sigma = 0 (exact critic) is drawn at the left edge of the symlog axes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402
from tpg.experiments.studies.critic import (CLAIM1_LAMBDA, GOOD_CRITIC_ERROR, claim1_curves,  # noqa: E402
                                            claim1_table, claim2_table)

NAME = "critic_error"
STUDY = "critic"
FLOOR = 1e-16
KEY = ["family", "eos", "seed"]


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    ppo = df[df["method"] == "ppo_gae"].copy()
    base = df[df["method"] != "ppo_gae"]
    if "group_size" in base.columns and len(base):
        base = base[base["group_size"] == base["group_size"].max()]  # RLOO also ran at smaller G (panel d)
    ref = base[base["method"] == "rloo"].set_index(KEY)[["nsr", "mse_per_response"]].add_suffix("_rloo")
    fig, axes = style.plt.subplots(1, 5, figsize=(20, 3.9), layout="constrained")
    lams = sorted(ppo["gae_lambda"].dropna().unique())
    cmap = style.plt.get_cmap("viridis")
    for i, lam in enumerate(lams):
        c = cmap(0.1 + 0.8 * i / max(len(lams) - 1, 1))
        sub = ppo[ppo["gae_lambda"] == lam].join(ref, on=KEY)
        sub["nsr_rel"] = sub["nsr"] / sub["nsr_rloo"]
        sub["mse_rel"] = sub["mse_per_response"] / sub["mse_per_response_rloo"]
        st = sub.groupby("sigma").agg(b=("rel_bias", "median"), blo=("rel_bias", "min"), bhi=("rel_bias", "max"),
                                      n=("nsr_rel", "median"), nlo=("nsr_rel", "min"), nhi=("nsr_rel", "max"),
                                      m=("mse_rel", "median"), mlo=("mse_rel", "min"), mhi=("mse_rel", "max"))
        st = st.reset_index()
        label = f"PPO, GAE λ={lam:g}"
        style.band(axes[0], st["sigma"], st["b"].clip(lower=FLOOR), lo=st["blo"].clip(lower=FLOOR),
                   hi=st["bhi"].clip(lower=FLOOR), label=label, color=c)
        style.band(axes[1], st["sigma"], st["n"], lo=st["nlo"], hi=st["nhi"], label=label, color=c)
        style.band(axes[2], st["sigma"], st["m"], lo=st["mlo"], hi=st["mhi"], label=label, color=c)
    for m, ls in (("grpo", "--"), ("remax", ":"), ("dr_grpo", "-.")):
        b = base[base["method"] == m].set_index(KEY).join(ref)
        if b.empty:
            continue
        g = int(b["responses_per_batch"].iloc[0])
        name = style.method_name(m) + (f" (G={g})" if g > 1 else "")
        axes[1].axhline(float(np.median(b["nsr"] / b["nsr_rloo"])), color=style.method_color(m), ls=ls, label=name)
        axes[2].axhline(float(np.median(b["mse_per_response"] / b["mse_per_response_rloo"])),
                        color=style.method_color(m), ls=ls, label=name)
    for ax in axes[1:3]:
        ax.axhline(1.0, color=style.method_color("rloo"), lw=1, label="RLOO (reference)")
    smax = float(ppo["sigma"].max()) if len(ppo) else 1.0
    for ax in axes[:3]:
        ax.set_xscale("symlog", linthresh=0.02)
        ax.set_xlim(-0.002, smax * 1.2)
        ax.set_xlabel("critic error σ (reward units; 0 = exact critic)")
    for ax in axes[1:3]:
        ax.set_yscale("log")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative bias |E g − ∇J| / |∇J|")
    axes[0].set_title("(a) bias")
    axes[0].legend(fontsize=6)
    axes[1].set_ylabel("noise-to-signal per response / RLOO's")
    axes[1].set_title("(b) variance (scale-free)")
    axes[1].legend(fontsize=6)
    axes[2].set_ylabel("MSE per response / RLOO's")
    axes[2].set_title("(c) mean squared error to ∇J")
    t2 = claim2_table(df)
    cols = [c for c in t2.columns if c.startswith("rloo_G")] + [c for c in ("step_mc", "step_td") if c in t2.columns]
    names = {"step_mc": "PPO λ=1\nRM − V'(s_t)", "step_td": "PPO λ=0\nV'(s_t+1) − V'(s_t)"}
    rng = np.random.default_rng(0)
    for i, c in enumerate(cols):
        vals = t2[c].to_numpy(dtype=float)
        axes[3].scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=12, alpha=0.7,
                        color=style.method_color("rloo") if c.startswith("rloo") else style.method_color("ppo_gae"))
        axes[3].hlines(np.median(vals), i - 0.3, i + 0.3, color="k", lw=1.5)
    axes[3].axhline(1.0, color="0.3", ls="--", lw=1, label="exact global baseline E[RM(W⁽¹⁾)]")
    axes[3].set_xticks(range(len(cols)))
    axes[3].set_xticklabels([names.get(c, f"RLOO G={c[6:]}") for c in cols], fontsize=7)
    axes[3].set_yscale("log")
    axes[3].set_ylabel("tr Cov per response / global baseline's")
    axes[3].set_title("(d) one global baseline vs per step")
    axes[3].legend(fontsize=6)
    if "critic_rel_error" in df.columns:
        curves, cross = claim1_curves(df), claim1_table(df)
        key = [c for c in KEY if c in curves.columns]
        for _, c in curves.groupby(key, sort=False):
            axes[4].plot(c["critic_rel_error"], c["ratio"], color=style.method_color("ppo_gae"), alpha=0.4, lw=1)
        crossed = cross.loc[~cross["censored"].astype(bool)]
        axes[4].plot(crossed["crossover"], np.ones(len(crossed)), "x", color="k", label="crossover e* per MDP")
        axes[4].axhline(1.0, color="0.3", ls="--", lw=1, label="best of GRPO, RLOO, ReMax")
        axes[4].axvline(GOOD_CRITIC_ERROR, color="0.3", ls=":", lw=1, label=f"good critic: e ≤ {GOOD_CRITIC_ERROR:g}")
        axes[4].set_xscale("symlog", linthresh=0.02)
        axes[4].set_xlim(-0.002, float(curves["critic_rel_error"].max()) * 1.2 if len(curves) else 1.0)
        axes[4].set_yscale("log")
        axes[4].set_xlabel("measured critic error e (RMS of V̂ − V′ / std RM)")
        axes[4].set_ylabel(f"nsr(PPO λ={CLAIM1_LAMBDA:g}) / best critic-free nsr")
        axes[4].set_title("(e) claim 1: where PPO's advantage ends")
        axes[4].legend(fontsize=6)
    fig.suptitle("PPO/GAE with a fixed noisy critic (exact moments; median over MDPs and critic seeds)")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
