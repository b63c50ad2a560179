"""The one look of every tpg figure: Agg backend, one rc dict, the names users know methods by.

Every ``tpg.paper_repro`` script starts with (the path line lets ``python tpg/paper_repro/NAME.py``
run from a checkout)::

    import sys; from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tpg.paper_repro import style          # selects Agg and applies RC

and ends with ``style.save(fig, NAME, out_dir)`` (writes ``NAME.png`` and ``NAME.pdf``);
``if __name__ == "__main__": style.cli(main)`` gives it ``--cache-dir`` / ``--out-dir``. A script
whose study has no cached results calls ``style.require(df, study)``, which raises
:class:`MissingResults`; ``tpg figures`` reports that script as skipped.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display anywhere: figures are files

import matplotlib.pyplot as plt  # noqa: E402

# one matplotlibrc, as a dict
RC: dict = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 4,
    "image.cmap": "viridis",
    "pdf.fonttype": 42,  # embed TrueType: editable text in the PDF
}
plt.rcParams.update(RC)

# estimator catalog name -> the name users know the method by
METHOD_NAMES: dict[str, str] = {
    "ppo_gae": "PPO",
    "ppo": "PPO",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "rloo": "RLOO",
    "remax": "ReMax",
    "reinforce": "REINFORCE",
    "reinforce_baseline": "REINFORCE + baseline",
    "reinforce_pp": "REINFORCE++",
    "reinforce_pp_baseline": "REINFORCE++ (baseline)",
    "trepo": "TRePO",
    "reward_to_go": "token oracle",
    "opo": "OPO",
}

# fixed colours so a method looks the same in every figure (tab10 order)
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"]
METHOD_COLORS: dict[str, str] = {
    "PPO": _PALETTE[0], "GRPO": _PALETTE[1], "Dr. GRPO": _PALETTE[8], "RLOO": _PALETTE[2],
    "ReMax": _PALETTE[4], "REINFORCE": _PALETTE[7], "REINFORCE + baseline": _PALETTE[5],
    "REINFORCE++": _PALETTE[6], "REINFORCE++ (baseline)": _PALETTE[10], "TRePO": _PALETTE[3],
    "token oracle": "#000000", "OPO": _PALETTE[9],
}


class MissingResults(RuntimeError):
    """A figure's study has no cached results (run ``tpg study NAME`` first)."""


def method_name(spec: str) -> str:
    """``"grpo:std_norm=false"`` -> ``"GRPO"``: the display name of an estimator spec's base."""
    base = str(spec).split(":", 1)[0].strip()
    return METHOD_NAMES.get(base, base)


def method_label(spec: str, keep: tuple[str, ...] | None = None) -> str:
    """The display name plus the spec's options: ``"trepo:fill=interpolate,K=4"`` ->
    ``"TRePO (fill=interpolate, K=4)"``; ``keep`` limits the options shown."""
    base, _, rest = str(spec).partition(":")
    name = METHOD_NAMES.get(base.strip(), base.strip())
    opts = []
    # option values may contain ":" and ","-free text only, so split on "," then "="
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if eq and (keep is None or key.strip() in keep):
            opts.append(f"{key.strip()}={value.strip()}")
    return f"{name} ({', '.join(opts)})" if opts else name


def method_color(spec_or_name: str) -> str:
    """The fixed colour of a method (by spec or display name); grey for unknown names."""
    name = spec_or_name if spec_or_name in METHOD_COLORS else method_name(spec_or_name)
    return METHOD_COLORS.get(name, "#555555")


def require(df, study: str):
    """``df`` if it has rows, else :class:`MissingResults` naming the command to run."""
    if df is None or len(df) == 0:
        raise MissingResults(f"no cached results of study {study!r}: run `tpg study {study}` first")
    return df


def band(ax, x, mean, err=None, lo=None, hi=None, label=None, color=None, marker="o", **kw):
    """A line of ``mean`` against ``x`` with a shaded band: ``mean +/- err`` or ``[lo, hi]``
    (seed spread or a confidence interval)."""
    import numpy as np

    x, mean = np.asarray(x, float), np.asarray(mean, float)
    line, = ax.plot(x, mean, marker=marker, label=label, color=color, **kw)
    if err is not None:
        err = np.asarray(err, float)
        lo, hi = mean - err, mean + err
    if lo is not None and hi is not None:
        ax.fill_between(x, np.asarray(lo, float), np.asarray(hi, float), color=line.get_color(), alpha=0.2,
                        linewidth=0)
    return line


def save(fig, name: str, out_dir: str | Path = "figures") -> list[Path]:
    """Write ``out_dir/NAME.png`` and ``out_dir/NAME.pdf``, close the figure, return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def cli(main) -> None:
    """``python -m tpg.paper_repro.NAME [--cache-dir DIR] [--out-dir DIR]``: run a script's ``main`` and
    print the files it wrote; a missing study is one line on stderr and exit status 1."""
    import argparse
    import sys

    doc = getattr(sys.modules.get(main.__module__), "__doc__", None) or "Draw one figure."
    p = argparse.ArgumentParser(description=" ".join(doc.strip().split("\n\n")[0].split()))  # its first paragraph
    p.add_argument("--cache-dir", default=".tpg-cache", help="result cache (default .tpg-cache)")
    p.add_argument("--out-dir", default="figures", help="where NAME.png and NAME.pdf go (default figures)")
    args = p.parse_args()
    try:
        paths = main(cache_dir=args.cache_dir, out_dir=args.out_dir)
    except MissingResults as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        sys.exit(1)
    for path in paths or []:
        print(f"wrote {path}")


__all__ = ["cli", "RC", "METHOD_NAMES", "METHOD_COLORS", "MissingResults", "method_name", "method_label",
           "method_color", "require", "band", "save", "plt"]
