"""``tpg compare-runs``: learning curves of several runs, grouped by label, with a seed band.

Runs with the same label (by default the pair ``algo, reward``) are the seeds of one curve: the
line is their mean at each iteration and the band is either their ``min``-``max`` range
(``band="minmax"``, the default) or the mean ``+/- 1`` standard deviation over the seeds
(``band="std"``, ``ddof = 0``); the legend says which, and how many runs each curve has. With
``x="tokens"`` a curve's x-coordinate at iteration ``i`` is the mean over its runs of the
cumulative policy tokens spent (``tokens_total``), so TRePO's continuations move its curve right.
Plotting uses matplotlib's Agg canvas directly (no global backend switch, no display needed).
"""

from __future__ import annotations

from pathlib import Path

from .logio import read_log

X_COLUMNS = {"iter": "iter", "tokens": "tokens_total"}
BANDS = ("minmax", "std")
_STYLES = ("-", "--", ":", "-.")


def load_runs(paths) -> "object":
    """The logs of ``paths`` stacked, with a ``run`` column (the file's index)."""
    import pandas as pd

    paths = list(paths)
    if not paths:
        raise ValueError("compare-runs needs at least one run log")
    frames = []
    for i, p in enumerate(paths):
        df = read_log(str(p))
        df["run"] = i
        df["run_file"] = Path(p).name
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def curve_table(df, x: str = "iter", label_by=("method", "reward"), y: str = "J", band: str = "minmax"):
    """Per label and iteration: ``x`` (iteration or mean cumulative tokens), mean, low, high of ``y``
    and the number of runs, as a DataFrame."""
    import pandas as pd

    if x not in X_COLUMNS:
        raise ValueError(f"--x must be one of {', '.join(X_COLUMNS)}, got {x!r}")
    if band not in BANDS:
        raise ValueError(f"--band must be one of {', '.join(BANDS)}, got {band!r}")
    label_by = [c for c in label_by if c]
    for col in [*label_by, y, X_COLUMNS[x], "iter"]:
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the run logs; they have {', '.join(map(str, df.columns))}")
    df = df.copy()
    df["label"] = df[label_by].astype(str).agg(" / ".join, axis=1) if label_by else "all runs"
    out = []
    for label, g in df.groupby("label", sort=False):
        stats = g.groupby("iter").agg(x=(X_COLUMNS[x], "mean"), mean=(y, "mean"), lo=(y, "min"), hi=(y, "max"),
                                      std=(y, lambda s: float(s.std(ddof=0))), runs=("run", "nunique"))
        if band == "std":
            stats["lo"] = stats["mean"] - stats["std"]
            stats["hi"] = stats["mean"] + stats["std"]
        stats["label"] = label
        out.append(stats.reset_index())
    return pd.concat(out, ignore_index=True)


def compare_runs(paths, out: str, x: str = "iter", label_by=("method", "reward"), y: str = "J",
                 band: str = "minmax", title: str | None = None) -> list[dict]:
    """Plot the runs of ``paths`` into the PNG ``out``; a summary row per label (final mean, low, high, runs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not str(out).lower().endswith(".png"):
        raise ValueError(f"--out must be a .png file, got {out!r}")
    table = curve_table(load_runs(paths), x, label_by, y, band)
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    band_text = "min-max over runs" if band == "minmax" else "mean +/- 1 std over runs"
    summary = []
    for label, g in table.groupby("label", sort=False):
        g = g.sort_values("iter")
        n = int(g["runs"].max())
        # identical curves (dense and terminal runs of a response-level method) stay visible as dashes
        (line,) = ax.plot(g["x"], g["mean"], label=f"{label} (n={n})", linewidth=1.6,
                          linestyle=_STYLES[len(summary) % len(_STYLES)])
        if n > 1:
            ax.fill_between(g["x"], g["lo"], g["hi"], color=line.get_color(), alpha=0.2, linewidth=0)
        last = g.iloc[-1]
        summary.append({"label": label, "runs": n, "iter": int(last["iter"]), "mean": float(last["mean"]),
                        "lo": float(last["lo"]), "hi": float(last["hi"])})
    ax.set_xlabel("iteration" if x == "iter" else "policy forward tokens (cumulative, mean over runs)")
    ax.set_ylabel(f"exact {y}" if y in ("J", "kl_ref", "entropy") else y)
    ax.set_title(title or f"{y}: mean over runs, band = {band_text}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return summary


__all__ = ["compare_runs", "curve_table", "load_runs", "BANDS", "X_COLUMNS"]
