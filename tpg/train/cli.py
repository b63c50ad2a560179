"""``tpg train`` and ``tpg compare-runs`` (registered into :mod:`tpg.cli` by :func:`register`).

    tpg train --estimator SPEC (--task SPEC | --mdp SPEC | --case FILE) [--reward dense|terminal] --iters N
              [--kl KIND --kl-beta BETA] [--threads N] [--seed S] [--out FILE.parquet|FILE.csv] [--resume | --force]
              [--checkpoint-every N] [--checkpoint-seconds S] [--progress | --no-progress] [...]
    tpg train --report-memory (--task SPEC | --mdp SPEC | --case FILE) [--estimator SPEC ...] [--json]
    tpg compare-runs RUN_LOG... --out FILE.png [--x iter|tokens] [--label-by method,reward] [--band minmax|std]

Every ``tpg train`` flag is a field of :class:`~tpg.train.config.TrainConfig` (``--help`` lists
them with their help lines). Bad input raises ``ValueError`` naming the field (exit status 2); a
mistyped ``--mdp``/``--task`` spec or an unknown estimator or option is refused before torch loads.
``--algo NAME`` and ``--algos A,B,...`` (the earlier names) still work for one release, hidden
from ``--help``, with a one-line note on stderr.

Nothing is lost: with ``--out`` (or ``--checkpoint``) the run checkpoints at the start, every 10
iterations or 30 seconds (``--checkpoint-every``, ``--checkpoint-seconds``) and at the end, and
rewrites the log atomically with each checkpoint; an existing log or checkpoint stops a new run
unless ``--resume`` (continue it) or ``--force`` (start afresh over it) is given. SIGINT (Ctrl-C)
or SIGTERM finishes the iteration in progress, writes both files and exits with status 130 or 143
(``128 + signal``) and a message saying how to resume; a second signal stops at once.
"""

from __future__ import annotations

import json
import sys

from .config import TRAIN_ALGOS, add_config_args, config_from_args

#: the JSON document of ``tpg train --report-memory --json`` (docs/JSON.md)
MEMORY_SCHEMA = "tpg-train-memory/1"


def _split_methods(text: str) -> list[str]:
    """``--algos``' list: comma-separated, or ``;``-separated when a spec carries options."""
    return [a.strip() for a in text.split(";" if ":" in text else ",") if a.strip()]


def _add_train(sub) -> None:
    from ..cli import DeprecatedFlag, add_json_arg

    p = sub.add_parser("train", help="train with any estimator of the catalog; the exact J at every iteration",
                       description="Train a tabular or tiny-transformer policy with one estimator of the catalog "
                                   "(PPO-style clipped loss, several epochs and minibatches, optional KL to the "
                                   "initial policy, Adam). Logs the exact J, exact KL to the reference, entropy, "
                                   "gradient norm, tokens spent, wall time and peak memory per iteration.")
    add_config_args(p)
    p.add_argument("--report-memory", action="store_true",
                   help="instead of training: for every method (or every --estimator given; repeatable here), the "
                        "models it holds (parameter counts) and the measured peak memory of one training step at "
                        f"the same batch (default methods: {', '.join(TRAIN_ALGOS)})")
    add_json_arg(p, MEMORY_SCHEMA, "with --report-memory: print the table as one JSON document")
    p.add_argument("--algo", action=DeprecatedFlag, dest="estimator", new="--estimator", append=True)
    p.add_argument("--algos", action=DeprecatedFlag, dest="estimator", new="--estimator (repeated)", append=True,
                   convert=_split_methods)
    p.set_defaults(func=cmd_train)


def _check_train_specs(args) -> None:
    """The problem, estimator, behaviour and loss specs, before torch loads (a mistyped one answers at
    once; what only the trainer refuses, e.g. dynamic sampling, is checked by :class:`TrainConfig`)."""
    from ..cli import check_problem_specs
    from ..estimators.names import check_estimator_spec

    check_problem_specs(args)
    for spec in args.estimator or ():
        check_estimator_spec(spec, training=True)
    if getattr(args, "behaviour", None) is not None or getattr(args, "loss", None) is not None:
        from ..offpolicy.specs import check_loss_spec, parse_behaviour

        for name, check in (("behaviour", parse_behaviour), ("loss", check_loss_spec)):
            if getattr(args, name) is not None:
                try:
                    check(getattr(args, name))
                except ValueError as exc:
                    raise ValueError(f"TrainConfig.{name}: {exc}") from None


def cmd_train(args) -> int:
    """The handler of ``tpg train``; returns the exit status."""
    _check_train_specs(args)
    if args.report_memory:
        specs = list(args.estimator or TRAIN_ALGOS)
        cfg = config_from_args(args, estimator=specs[0], progress=False)
        from .report import format_memory_table, memory_report

        rows = memory_report(cfg, specs)
        print(json.dumps({"schema": MEMORY_SCHEMA, "rows": rows}) if args.json else format_memory_table(rows))
        return 0
    if args.json:
        raise ValueError("--json goes with --report-memory (a training run writes its log with --out)")
    cfg = config_from_args(args)
    from .trainer import TrainingInterrupted, train

    try:
        df = train(cfg, handle_signals=True)
    except TrainingInterrupted as stop:
        print(f"tpg train: {stop.message()}", file=sys.stderr)
        return stop.exit_status
    first, last = df.iloc[0], df.iloc[-1]
    print(f"{last['method']} on {last['problem']} ({cfg.reward} reward), seed {cfg.seed}: "
          f"J {first['J']:.6g} -> {last['J']:.6g} in {int(last['iter'])} iterations, "
          f"KL to reference {last['kl_ref']:.4g}, {int(last['tokens_total']):,} policy tokens")
    if cfg.out:
        print(f"wrote {cfg.out}" + (f" and checkpoint {cfg.checkpoint_path}" if cfg.checkpoint_path else ""),
              file=sys.stderr)
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare-runs", help="plot the exact-J curves of several runs with seed bands (PNG)",
                       description="Plot the learning curves of run logs (tpg train --out), one curve per label "
                                   "(runs sharing it are seeds): the mean line and a band over the runs.")
    p.add_argument("logs", nargs="+", metavar="RUN_LOG", help="run logs (.parquet or .csv)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--x", choices=("iter", "tokens"), default="iter",
                   help="x axis: iteration, or cumulative policy forward tokens (default iter)")
    p.add_argument("--label-by", default="method,reward", metavar="COL,COL",
                   help="log columns whose values name a curve (default method,reward; a log of an earlier "
                        "release has its algo column read as method)")
    p.add_argument("--y", default="J", metavar="COLUMN", help="the log column to plot (default J)")
    p.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="seed band: min-max over the runs, or mean +/- 1 std (default minmax)")
    p.add_argument("--title", default=None, help="figure title")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    """The handler of ``tpg compare-runs``; returns the exit status."""
    from .plots import compare_runs

    label_by = [c.strip() for c in args.label_by.split(",") if c.strip()]
    summary = compare_runs(args.logs, args.out, x=args.x, label_by=label_by, y=args.y, band=args.band,
                           title=args.title)
    for s in summary:
        print(f"{s['label']}: {args.y} at iter {s['iter']} = {s['mean']:.6g} [{s['lo']:.6g}, {s['hi']:.6g}] "
              f"over {s['runs']} run(s)")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``train`` and ``compare-runs`` to the ``tpg`` command line."""
    _add_train(subparsers)
    _add_compare(subparsers)


__all__ = ["register", "cmd_train", "cmd_compare"]
