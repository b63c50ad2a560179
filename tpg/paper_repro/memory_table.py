"""Figure memory_table: the models each method holds and its measured peak memory per training step
(study ``learning``, cells of kind ``memory``; claim 6).

One panel per problem: a bar per method, the tensor bytes held between steps (parameters,
optimiser state, tables: solid) stacked with the measured transient peak of one step (rollouts,
continuations, activations, gradients: light), in KiB; above each bar the models held with their
parameter counts, and the peak relative to GRPO's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "memory_table"
STUDY = "learning"
_TITLES = {"tabular": "tabular policy", "transformer": "tiny transformer"}
_SHORT = {"reward_model": "RM", "reference": "ref"}


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(STUDY, cache_dir), STUDY)
    mem = style.require(df[df["kind"] == "memory"], STUDY)
    problems = list(dict.fromkeys(mem["problem"]))
    fig, axes = style.plt.subplots(1, len(problems), figsize=(6.2 * len(problems), 4.4), squeeze=False,
                                   layout="constrained")
    for ax, prob in zip(axes[0], problems):
        m = mem[mem["problem"] == prob]
        x = np.arange(len(m))
        colors = [style.method_color(s) for s in m["method"]]
        held, step = m["held_bytes"].to_numpy() / 1024, m["step_bytes"].to_numpy() / 1024
        ax.bar(x, held, color=colors, label="held between steps (parameters, optimiser state)")
        ax.bar(x, step, bottom=held, color=colors, alpha=0.35, label="transient peak of one step")
        for xi, (_, r) in zip(x, m.iterrows()):
            models = "\n+ ".join(_SHORT.get(k, k) for k in str(r["models"]).split("+"))
            ax.text(xi, (r["held_bytes"] + r["step_bytes"]) / 1024 * 1.04,
                    f"×{r['peak_vs_grpo']:.2f}\n{int(r['params']):,} p\n{models}", ha="center", va="bottom",
                    fontsize=5)
        ax.set_xticks(x, [style.method_name(s) for s in m["method"]], rotation=30, ha="right")
        ax.set_ylabel("tensor memory of one training step (KiB)")
        ax.set_ylim(0, float(((m["held_bytes"] + m["step_bytes"]) / 1024).max()) * 1.45)
        kind = m["problem_kind"].iloc[0]
        ax.set_title(f"{_TITLES.get(kind, kind)}: {prob.split(':', 1)[1]}", fontsize=8)
        ax.grid(axis="x", visible=False)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle("Memory per method (claim 6): models held (p: their parameters; RM: the reward table), held and "
                 "peak bytes; ×: peak relative to GRPO")
    return style.save(fig, NAME, out_dir)


if __name__ == "__main__":
    style.cli(main)
