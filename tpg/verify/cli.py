"""``tpg verify`` and ``tpg probe`` (registered into :mod:`tpg.cli` by :func:`register`).

    tpg verify (--case FILE | --mdp SPEC | --task SPEC | --suite standard) [--estimator SPEC ...] [--group-size G]
               [--mode exact|mc] [--samples N] [--seed S] [--alpha A] [--dtype float64|float32]
               [--max-rows N] [--json] [--fail-on-bias]
    tpg probe FILE.py:FUNCTION [--dtype float64|float32] [--json]

Exit status of ``verify``: 0; 1 with ``--fail-on-bias`` when an estimator is biased; 2 on bad
input (an unknown estimator, an estimator whose exact expectation cannot be computed, a sample
space past the size guard). Estimators expanded from ``all`` that fail are reported as rows with
verdict ``error`` instead. ``--suite standard`` exits 1 when a verdict disagrees with THEORY.md's.
"""

from __future__ import annotations

import json

import torch

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _add_verify(sub) -> None:
    from ..cli import add_problem_args
    from .exact_moments import DEFAULT_MAX_ROWS
    from .harness import DEFAULT_ALPHA, DEFAULT_SAMPLES, MODES
    from .suite import SUITES

    p = sub.add_parser("verify", help="verdicts of estimators against the exact gradient: unbiased, scaled or biased "
                                      "(exact mode); consistent, consistent-scaled or biased (Monte Carlo)",
                       description="Verify policy-gradient estimators against the exact gradient of the token-level "
                                   "objective, exactly (enumerating the sample space) or by a calibrated Monte Carlo "
                                   "test.")
    # --suite and --lm join the problem sources' required group: exactly one of them
    src = add_problem_args(p)
    src.add_argument("--suite", choices=SUITES,
                     help="the whole catalog in exact mode on a fixed set of MDPs: prints the verdict matrix")
    from .lm import add_lm_args
    add_lm_args(p, src)
    p.add_argument("--estimator", action="append", metavar="SPEC",
                   help="NAME[:key=value,...], 'all', or FILE.py:FUNCTION (repeatable), e.g. grpo:std_norm=false, "
                        "ppo_gae:lambda=0.9,critic=noisy,sigma=0.1, trepo:anchors=random:2,fill=interpolate,K=4")
    p.add_argument("--group-size", type=int, default=2, metavar="G",
                   help="responses per prompt for group estimators (batch size of batch-coupled ones); default 2")
    p.add_argument("--mode", choices=MODES, default="exact",
                   help="exact: expectation over the whole sample space (small MDPs); mc: a statistical test on "
                        "--samples batches (default exact)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"Monte Carlo batches (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the Monte Carlo batches, fixed critics "
                                                                   "and the KL reference policy (default 0)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, metavar="A",
                   help="family-wise false-alarm rate of a Monte Carlo run: every estimator's two tests, "
                        f"Holm-adjusted together (default {DEFAULT_ALPHA})")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float64",
                   help="dtype fed to plug-ins (float32 as in training: verdicts for both dtypes when they differ)")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help=f"exact mode's size guard: responses in the sample space (default {DEFAULT_MAX_ROWS:,})")
    p.add_argument("--json", action="store_true", help="print the records as JSON (a list; the suite: an object)")
    p.add_argument("--fail-on-bias", action="store_true", help="exit with status 1 when any estimator is biased")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    """The handler of ``tpg verify``; returns the exit status."""
    from .harness import format_records, verify
    from .suite import format_suite, run_suite

    if args.suite:
        if args.estimator:
            raise ValueError("--suite runs its own estimators; do not combine it with --estimator")
        result = run_suite(args.suite, progress=not args.json)
        if args.json:
            print(json.dumps(result))
        else:
            print(format_suite(result))
        return 1 if result["disagreements"] else 0
    if not args.estimator:
        raise ValueError("give at least one --estimator SPEC (a catalog name, 'all', or FILE.py:FUNCTION)")
    if args.samples < 8:
        raise ValueError(f"--samples must be >= 8, got {args.samples}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {args.group_size}")
    if getattr(args, "lm", None):
        from .lm import problem_from_lm_args
        mdp, policy = problem_from_lm_args(args)
    else:
        from ..cli import load_problem_from_args
        mdp, policy = load_problem_from_args(args)
    records = verify(mdp, policy, args.estimator, group_size=args.group_size, mode=args.mode, samples=args.samples,
                     seed=args.seed, dtype=_DTYPES[args.dtype], alpha=args.alpha, max_rows=args.max_rows,
                     progress=not args.json, on_error="record_all")
    if args.json:
        print(json.dumps(records))
    else:
        print(mdp.describe())
        print(format_records(records))
    if args.fail_on_bias and any(r["verdict"] == "biased" for r in records):
        return 1
    return 0


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="run a plug-in (or any estimator spec) on edge cases and print what it returns",
                       description="Run an advantage function FILE.py:FUNCTION (or a catalog spec) on edge cases: "
                                   "identical rewards, a singleton group, all-zero rewards, ragged lengths, reward "
                                   "scales 1e6 and 1e-6, float32 against float64.")
    p.add_argument("spec", metavar="FILE.py:FUNCTION")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float64", help="dtype fed to the plug-in")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    """The handler of ``tpg probe``; returns the exit status."""
    from ..estimators import format_probe, probe

    rows = probe(args.spec, dtype=_DTYPES[args.dtype])
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_probe(rows))
    return 0


def register(subparsers) -> None:
    """Add ``verify`` and ``probe`` to the ``tpg`` command line."""
    _add_verify(subparsers)
    _add_probe(subparsers)


__all__ = ["register", "cmd_verify", "cmd_probe"]
