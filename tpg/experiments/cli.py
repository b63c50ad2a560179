"""``tpg study``, ``tpg figures``, ``tpg report``: run the studies, draw their figures, write the claims report.

    tpg study NAME|all [--quick] [--backend processes|sequential|dask|ray] [--address ADDR] [--jobs N]
              [--cache-dir DIR] [--progress | --no-progress]
    tpg figures [NAME ...] [--cache-dir DIR] [--out-dir DIR] [--scripts-dir DIR] [--allow-partial]
                [--progress | --no-progress]
    tpg report [--cache-dir DIR] [--out FILE] [--no-proofs] [--progress | --no-progress]

``tpg figures`` names every figure it drew from a study whose latest grid is not all cached and
then exits 1, unless ``--allow-partial``; ``tpg report`` marks such a study's rows ``incomplete``.

``register(subparsers)`` adds them to ``tpg`` (:mod:`tpg.cli`); ``python -m tpg.experiments.cli``
runs them on their own.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

DEFAULT_CACHE = ".tpg-cache"
DEFAULT_FIGURES = "figures"


def default_scripts_dir() -> Path:
    """The figure scripts shipped with the package, ``tpg/paper_repro/`` of the tpg this process imports
    (an installed wheel, an editable install or a checkout alike)."""
    import tpg

    return Path(tpg.__file__).resolve().parent / "paper_repro"


def figure_scripts(scripts_dir: str | Path | None = None, names=None) -> list[Path]:
    """The figure scripts (every ``*.py`` of ``tpg/paper_repro/`` but ``style.py`` and private files),
    optionally only those named (``bias_heatmap`` or ``bias_heatmap.py``)."""
    d = Path(scripts_dir) if scripts_dir else default_scripts_dir()
    if not d.is_dir():
        raise ValueError(f"--scripts-dir: no figure scripts at {d} (not a directory)")
    scripts = sorted(p for p in d.glob("*.py") if p.stem != "style" and not p.stem.startswith("_"))
    if names:
        wanted = {Path(n).stem for n in names}
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            raise ValueError(f"unknown figure script(s) {', '.join(sorted(unknown))}; "
                             f"the scripts are {', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in wanted]
    return scripts


def run_figure_script(path: Path, cache_dir: str, out_dir: str) -> list[Path]:
    """Import a figure script from its file and call its ``main(cache_dir, out_dir)``."""
    spec = importlib.util.spec_from_file_location(f"paper_repro_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        raise ValueError(f"{path.name} has no main(cache_dir, out_dir)")
    return list(mod.main(cache_dir=cache_dir, out_dir=out_dir) or [])


# ------------------------------------------------------------------------------ commands
def _cmd_study(args) -> int:
    import contextlib

    from .report import format_table
    from .runner import CLUSTER_BACKENDS, ClusterError, cluster_session, run_study
    from .studies import STUDIES, available_studies, load_study

    names = available_studies() if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in STUDIES:
        raise ValueError(f"unknown study {args.name!r}; the studies are {', '.join(STUDIES)} (or all)")
    if args.address is not None and args.backend not in CLUSTER_BACKENDS:
        raise ValueError(f"--address is for --backend {' or '.join(CLUSTER_BACKENDS)}, not {args.backend!r}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    claim_rows = []
    # one cluster for every study of the command (started at the first cell not cached)
    session = (cluster_session(args.backend, args.jobs, args.address) if args.backend in CLUSTER_BACKENDS
               else contextlib.nullcontext())
    with session as cluster:
        try:
            for name in names:
                claim_rows += _run_one_study(name, args, run_study, load_study)
        except ClusterError as exc:  # a worker failure, not bad input: one line and exit 1
            print(f"tpg: error: {exc}", file=sys.stderr)
            return 1
        if cluster is not None and cluster.description is not None:
            print(f"cells ran on: {cluster.description}", flush=True)
    if claim_rows:
        print(format_table(claim_rows))
    return 0


def figure_studies() -> dict[str, list[str]]:
    """Figure script name -> the studies whose results it draws (each study's ``FIGURES``)."""
    from .studies import available_studies, load_study

    out: dict[str, list[str]] = {}
    for name in available_studies():
        for fig in getattr(load_study(name), "FIGURES", []):
            out.setdefault(fig, []).append(name)
    return out


def _run_one_study(name: str, args, run_study, load_study) -> list:
    start = time.perf_counter()
    df = run_study(name, quick=args.quick, backend=args.backend, n_jobs=args.jobs, cache_dir=args.cache_dir,
                   progress=args.progress)
    mod = load_study(name)
    print(f"study {name}: {df['cell_key'].nunique() if len(df) else 0} cells, {len(df)} rows "
          f"({'quick' if args.quick else 'full'}) in {time.perf_counter() - start:.1f} s; "
          f"cache {Path(args.cache_dir) / name}", flush=True)
    return mod.claim_rows(df) if len(df) else []


def _cmd_figures(args) -> int:
    from .._progress import progress_bar
    from .report import partial_note, study_progress

    scripts = figure_scripts(args.scripts_dir, args.names)
    owners = figure_studies()
    progress: dict[str, dict] = {}
    partial: list[str] = []
    failed = skipped = 0
    bar = progress_bar(args.progress, iterable=scripts, desc="figures", unit="script", leave=False)
    for path in bar:
        bar.set_postfix_str(path.stem)
        start = time.perf_counter()
        try:
            written = run_figure_script(path, args.cache_dir, args.out_dir)
        except Exception as exc:  # one broken figure must not stop the others
            # by name: a script may import the style module under another name (tpg.paper_repro.style, style)
            if any(c.__name__ == "MissingResults" for c in type(exc).__mro__):
                skipped += 1
                print(f"{path.stem}: skipped ({exc})", flush=True)
                continue
            failed += 1
            print(f"{path.stem}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        names = ", ".join(str(p) for p in written)
        print(f"{path.stem}: wrote {names} in {time.perf_counter() - start:.1f} s", flush=True)
        for study in owners.get(path.stem, []):
            if study not in progress:
                progress[study] = study_progress(study, args.cache_dir)
            if progress[study]["cells"] and not progress[study]["complete"]:
                partial.append(path.stem)
                print(f"{path.stem}: drawn from a partial grid: {partial_note(study, progress[study])}", flush=True)
    bar.close()
    print(f"{len(scripts) - failed - skipped} of {len(scripts)} figure scripts ran"
          + (f", {skipped} skipped (no cached results)" if skipped else "")
          + (f", {failed} failed" if failed else "")
          + (f", {len(set(partial))} drawn from partial grids ({', '.join(dict.fromkeys(partial))})" if partial else ""))
    if partial and not args.allow_partial:
        print("tpg: figures drawn from partial grids; complete the studies or pass --allow-partial to accept them",
              file=sys.stderr)
        return 1
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from .report import INCOMPLETE, collect_rows, format_markdown, format_table, partial_note

    rows, info, summaries = collect_rows(args.cache_dir, proofs=not args.no_proofs, progress=args.progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_markdown(rows, info, summaries, args.cache_dir))
    print(format_table(rows))
    for name, s in info.items():
        if s.get("status") == INCOMPLETE:
            print(f"incomplete: {partial_note(name, s)}; its rows read incomplete")
    print(f"\nwrote the claims report {out}")
    return 0


def register(subparsers) -> None:
    """Add ``study``, ``figures`` and ``report`` to a ``tpg`` sub-parser set."""
    from ..cli import add_progress_arg
    from .runner import BACKENDS
    from .studies import STUDIES

    p = subparsers.add_parser("study", help="run a study (or all) and cache its cells",
                              description="Run every cell of a study's grid that is not cached yet, in parallel; "
                                          "print its claim rows.")
    p.add_argument("name", metavar="NAME", help=f"one of {', '.join(STUDIES)}, or all")
    p.add_argument("--quick", action="store_true", help="the small grid (seconds to a minute)")
    p.add_argument("--backend", choices=BACKENDS, default="processes",
                   help="where cells run: local processes (default), sequential (this process), or a dask / "
                        "ray cluster (a local one of --jobs workers, or the one at --address)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --backend dask: a running scheduler, tcp://HOST:PORT (default: "
                        "$DASK_SCHEDULER_ADDRESS, else a local cluster); with --backend ray: auto (the cluster "
                        "`ray start --head` started here), HOST:PORT or ray://HOST:10001 (default: $RAY_ADDRESS, "
                        "else a local instance). Workers must import the same tpg; the cache dir must be shared")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="worker processes that run cells in parallel (default 2), each on one torch thread; with "
                        "--address the cluster's workers decide")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, metavar="DIR", help=f"result cache (default {DEFAULT_CACHE})")
    add_progress_arg(p)
    p.set_defaults(func=_cmd_study)

    p = subparsers.add_parser("figures", help="draw every figure (tpg/paper_repro/*.py) from the cached results",
                              description="Draw every figure script's figure from the cached results. A figure "
                                          "whose study has fewer cells cached than its latest run's grid is "
                                          "drawn and named as partial; the exit status is then 1 unless "
                                          "--allow-partial (2 for bad arguments, 1 when a script fails).")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these figure scripts (default all)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, metavar="DIR", help=f"result cache (default {DEFAULT_CACHE})")
    p.add_argument("--out-dir", default=DEFAULT_FIGURES, metavar="DIR", help=f"where figures go (default {DEFAULT_FIGURES})")
    p.add_argument("--scripts-dir", default=None, metavar="DIR", help="a directory of figure scripts (default: tpg/paper_repro/, shipped with the package)")
    p.add_argument("--allow-partial", action="store_true",
                   help="exit 0 even when a figure is drawn from a study whose latest grid is not all cached "
                        "(the figures are drawn and named either way; without this flag the exit status is 1)")
    add_progress_arg(p)
    p.set_defaults(func=_cmd_figures)

    p = subparsers.add_parser("report", help="write the claims report (figures/REPORT.md) from the cached results")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, metavar="DIR", help=f"result cache (default {DEFAULT_CACHE})")
    p.add_argument("--out", default=f"{DEFAULT_FIGURES}/REPORT.md", metavar="FILE",
                   help=f"the report (default {DEFAULT_FIGURES}/REPORT.md)")
    p.add_argument("--no-proofs", action="store_true", help="leave out the proof checks (they take a few seconds)")
    add_progress_arg(p)
    p.set_defaults(func=_cmd_report)


def main(argv: list[str] | None = None) -> int:
    """``python -m tpg.experiments.cli study|figures|report ...``."""
    from tpg.cli import _Parser, run_command

    parser = _Parser(prog="tpg")
    register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
