"""``tpg verify`` and ``tpg probe`` (registered into :mod:`tpg.cli` by :func:`register`).

    tpg verify (--case FILE | --mdp SPEC | --task SPEC | --suite standard) [--estimator SPEC ...] [--group-size G]
               [--mode exact|mc] [--samples N] [--seed S] [--alpha A] [--dtype float64|float32] [--target-reward SPEC]
               [--max-rows N] [--plugin-timeout SECONDS] [--json] [--fail-on-bias] [--behaviour SPEC] [--loss SPEC]
               [--hooks-from behaviour|policy] [--engine auto|tree|markov] [--threads N] [--progress | --no-progress]
    tpg probe FILE.py:FUNCTION [--dtype float64|float32] [--plugin-timeout SECONDS] [--json]
    tpg offpolicy-help

Exit status of ``verify`` (:data:`VERIFY_EXIT`): 0 when every estimator got a verdict (and, with
``--fail-on-bias``, none is biased); 1 with ``--fail-on-bias`` when an estimator is biased and
none errored; 2 on bad input (an unknown estimator, a bad plug-in spec, an estimator whose exact
expectation cannot be computed, a sample space past the size guard); 3 when any estimator
errored: the estimators expanded from ``all`` that fail, and plug-ins whose own code fails
(raises, ``sys.exit`` included, runs past ``--plugin-timeout``, returns NaN or a wrong shape),
are rows with verdict ``error`` and the run goes on, but it never exits 0. 3 takes precedence
over 1. ``--suite standard`` exits 1 when a verdict disagrees with docs/THEORY.md's.

Exit status of ``probe``: 0 when every case is ok, 1 when a case is flagged or raised, 2 on bad
input (a bad spec, a plug-in that fails to import).
"""

from __future__ import annotations

import json
import math
import sys

# no torch at the top: `tpg --help`, `tpg verify --help` and a mistyped spec answer before torch loads
_DTYPES = ("float64", "float32")
#: ``tpg verify``'s exit statuses.
VERIFY_EXIT = {"ok": 0, "biased": 1, "bad_input": 2, "errored": 3}
#: the JSON documents of ``tpg verify --json`` and ``tpg verify --suite NAME --json`` (docs/JSON.md)
VERIFY_SCHEMA = "tpg-verify/1"
SUITE_SCHEMA = "tpg-suite/1"
_VERIFY_EPILOG = ("Exit status: 0 every estimator got a verdict (with --fail-on-bias: and none is biased); 1 with "
                  "--fail-on-bias, an estimator is biased; 2 bad input; 3 an estimator errored (a row with verdict "
                  "'error': an estimator expanded from 'all' that could not run, or a plug-in that raised, called "
                  "sys.exit, ran past --plugin-timeout or returned NaN or a wrong shape); 3 takes precedence over 1.")


def _torch_dtype(name: str):
    """``--dtype`` as a torch dtype (torch is imported here, once a command runs)."""
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def _plugin_timeout(seconds: float) -> float | None:
    """``--plugin-timeout`` as the library's ``timeout``: 0 means no limit."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"--plugin-timeout must be a number of seconds >= 0 (0: no limit), got {seconds}")
    return None if seconds == 0 else float(seconds)


def _add_timeout(p) -> None:
    from ..estimators.defaults import DEFAULT_TIMEOUT

    p.add_argument("--plugin-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"time limit of a plug-in's import and of each call (default {DEFAULT_TIMEOUT:g}; 0: none); "
                        f"a plug-in past it is interrupted (main thread, POSIX) and becomes an error")


def _add_verify(sub) -> None:
    from ..cli import add_json_arg, add_problem_args, add_progress_arg, add_threads_arg
    from .defaults import DEFAULT_ALPHA, DEFAULT_MAX_ROWS, DEFAULT_SAMPLES, MODES, SUITES

    p = sub.add_parser("verify", help="verdicts of estimators against the exact gradient: unbiased, scaled or biased "
                                      "(exact mode); consistent, consistent-scaled or biased (Monte Carlo)",
                       description="Verify policy-gradient estimators against the exact gradient of the token-level "
                                   "objective, exactly (enumerating the sample space) or by a calibrated Monte Carlo "
                                   "test.",
                       epilog=_VERIFY_EPILOG)
    # --suite and --lm join the problem sources' required group: exactly one of them
    src = add_problem_args(p)
    src.add_argument("--suite", choices=SUITES,
                     help="the whole catalog in exact mode on a fixed set of MDPs: prints the verdict matrix")
    from .lm_args import add_lm_args
    add_lm_args(p, src)
    p.add_argument("--estimator", action="append", metavar="SPEC",
                   help="NAME[:key=value,...], 'all', or FILE.py:FUNCTION (repeatable), e.g. grpo:std_norm=false, "
                        "ppo_gae:lambda=0.9,critic=noisy,sigma=0.1, trepo:anchors=random:2,fill=interpolate,K=4")
    p.add_argument("--target-reward", metavar="SPEC", default=None,
                   help="the objective the estimators target, E[R(x, W)] for a response-level reward R they are fed "
                        "instead of RM (an intended change of objective, not a bug): rm (default), "
                        "length_penalty:alpha (RM - alpha T), scaled:c, clip:lo,hi, overlong:L,cache (DAPO), or "
                        "FILE.py:FUNCTION taking keywords among rm, length, tokens, mask, prompt; the target "
                        "becomes grad J[SPEC]")
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
    p.add_argument("--dtype", choices=_DTYPES, default="float64",
                   help="dtype fed to plug-ins (float32 as in training: verdicts for both dtypes when they differ)")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help=f"exact mode's size guard: responses in the sample space (default {DEFAULT_MAX_ROWS:,})")
    p.add_argument("--engine", choices=("auto", "tree", "markov"), default="auto",
                   help="where the exact target comes from: tree (the stored response tree; exact and mc modes); "
                        "markov (policy=shared with compact=true at any horizon: the Markov engine's exact grad J, "
                        "--mode mc only); auto (default): tree when it fits, else markov")
    add_json_arg(p, VERIFY_SCHEMA, f"print the run and its records (with --suite: schema {SUITE_SCHEMA})")
    p.add_argument("--fail-on-bias", action="store_true", help="exit with status 1 when any estimator is biased "
                                                               "(3 if any errored)")
    _add_timeout(p)
    add_threads_arg(p)
    add_progress_arg(p)
    _add_offpolicy_args(p)
    p.set_defaults(func=cmd_verify)


def _add_offpolicy_args(p) -> None:
    """``--behaviour``, ``--loss``, ``--hooks-from`` (tpg.offpolicy; ``tpg offpolicy-help`` lists the specs)."""
    g = p.add_argument_group("off-policy", "sample from a behaviour policy mu and form the gradient through a policy "
                             "loss; the target stays grad J(pi) of the given policy pi (see `tpg offpolicy-help`)")
    g.add_argument("--behaviour", "--behavior", metavar="SPEC", default=None,
                   help="the policy mu the responses are sampled from, a chain STAGE[+STAGE...] of: pi, "
                        "temperature:T, top_k:k, top_p:p, min_p:m, logit_noise:sigma[,seed], precision:bf16|fp16|fp32, "
                        "stale:k[,lr=eta], file:PATH (a case file or a tpg train checkpoint), mix:w,SPEC1,SPEC2 "
                        "(e.g. temperature:0.7+top_p:0.9); default: pi (on-policy)")
    g.add_argument("--loss", metavar="SPEC", default=None,
                   help="the policy loss the gradient is taken through (autograd through its ratios): pg, is_token, "
                        "is_seq, tis:C[,level=token|seq|geo], mis:lo,hi, ppo_clip:eps[,clip_low=,clip_high=,dual_clip=c,"
                        "old=mu|pi], gspo[:eps], cispo:eps, or FILE.py:FUNCTION (verl's policy-loss form); every loss "
                        "takes filter_degenerate_groups=true|same_prompt (DAPO's dynamic sampling); default pg")
    g.add_argument("--hooks-from", choices=("behaviour", "policy"), default="behaviour",
                   help="whose context answers the estimators' hooks (continuations, critic, greedy response): the "
                        "behaviour mu (default: what the engine samples) or the training policy pi")


def _check_specs(args) -> None:
    """Parse the spec strings before anything imports torch, so that a mistyped key, value or range, an
    unknown estimator, behaviour, loss or option, or a missing plug-in file is refused at once
    (:mod:`tpg.mdp.specs`, :mod:`tpg.estimators.names`, :mod:`tpg.offpolicy.specs`)."""
    from ..cli import check_problem_specs, check_threads
    from ..estimators.names import check_estimator_spec

    check_problem_specs(args)
    if getattr(args, "target_reward", None):
        from ..mdp.specs import parse_target_reward
        parse_target_reward(args.target_reward)
    for spec in getattr(args, "estimator", None) or ():
        check_estimator_spec(spec)
    if getattr(args, "behaviour", None) is not None or getattr(args, "loss", None) is not None:
        from ..offpolicy.specs import check_loss_spec, parse_behaviour

        if args.behaviour is not None:
            parse_behaviour(args.behaviour)
        if args.loss is not None:
            check_loss_spec(args.loss)
    check_threads(getattr(args, "threads", None))


def cmd_verify(args) -> int:
    """The handler of ``tpg verify``; returns the exit status."""
    _check_specs(args)
    if args.suite:
        if args.estimator:
            raise ValueError("--suite runs its own estimators; do not combine it with --estimator")
        if args.target_reward is not None:
            raise ValueError("--suite verifies against grad J; do not combine it with --target-reward")
        if args.behaviour is not None or args.loss is not None:
            raise ValueError("--suite runs on-policy; do not combine it with --behaviour or --loss")
        if args.engine != "auto":
            raise ValueError("--suite runs its own problems on the tree; do not combine it with --engine")
        from .suite import format_suite, run_suite

        with _torch_threads(args.threads):
            result = run_suite(args.suite, progress=args.progress)
        status = 1 if result["disagreements"] else 0
        if args.json:
            print(json.dumps({"schema": SUITE_SCHEMA, **result, "exit_status": status}))
        else:
            print(format_suite(result))
        return status
    if not args.estimator:
        raise ValueError("give at least one --estimator SPEC (a catalog name, 'all', or FILE.py:FUNCTION)")
    if args.samples < 8:
        raise ValueError(f"--samples must be >= 8, got {args.samples}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {args.group_size}")
    timeout = _plugin_timeout(args.plugin_timeout)
    from .._guards import check_seed
    for name in ("seed", "reward_seed", "lm_seed"):  # one line naming the flag, before torch sees a seed
        if getattr(args, name, None) is not None:
            check_seed(getattr(args, name), "--" + name.replace("_", "-"))
    with _torch_threads(args.threads):
        return _verify_records(args, timeout)


def _torch_threads(threads: int | None):
    """``--threads``: torch's intra-op threads inside the block (None: leave torch's setting)."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    from .._threads import intra_op_threads

    return intra_op_threads(threads)


def _verify_records(args, timeout) -> int:
    """``tpg verify`` on a problem (not the suite), once the flags are checked: build it, verify, print."""
    from ..rollouts import check_batches_fit
    from .harness import format_records, verify

    mc_groups = dict(num_groups=args.samples, groups_flag="--samples") if args.mode == "mc" else {}
    check_batches_fit(None, args.group_size, **mc_groups)  # O(1), before the problem is built
    if getattr(args, "lm", None):
        from .lm import problem_from_lm_args
        mdp, policy = problem_from_lm_args(args)
    else:
        from ..cli import load_problem_from_args
        mdp, policy = load_problem_from_args(args)
    check_batches_fit(mdp.horizon, args.group_size, **mc_groups)
    goal = None
    if args.target_reward is not None:
        from .harness import resolve_target_reward
        goal = resolve_target_reward(args.target_reward, timeout)  # a FILE.py:FUNCTION is imported once
    records = verify(mdp, policy, args.estimator, group_size=args.group_size, mode=args.mode, samples=args.samples,
                     seed=args.seed, dtype=_torch_dtype(args.dtype), alpha=args.alpha, max_rows=args.max_rows,
                     progress=args.progress, on_error="record_all", plugin_timeout=timeout,
                     behaviour=args.behaviour, loss=args.loss, hooks=args.hooks_from, target_reward=goal,
                     engine=args.engine)
    errored = [r["spec"] for r in records if r["verdict"] == "error"]
    if errored:
        status = VERIFY_EXIT["errored"]
    elif args.fail_on_bias and any(r["verdict"] == "biased" for r in records):
        status = VERIFY_EXIT["biased"]
    else:
        status = VERIFY_EXIT["ok"]
    if args.json:
        print(json.dumps(verify_document(mdp.describe(), args, records, status)))
    else:
        print(mdp.describe())
        if goal is not None:
            from ..mdp.objectives import describe_target
            print("target reward " + describe_target(goal))
        if args.behaviour is not None or args.loss is not None:
            from ..offpolicy.record import format_offpolicy_header
            print(format_offpolicy_header(records))
        print(format_records(records))
    if errored:
        print(f"tpg: {len(errored)} of {len(records)} estimators errored ({', '.join(errored)}): exit status "
              f"{status}", file=sys.stderr)
    return status


def verify_document(problem: str, args, records: list[dict], status: int) -> dict:
    """``tpg verify --json``'s document (schema :data:`VERIFY_SCHEMA`, docs/JSON.md): the run's settings, one
    record per estimator (:func:`tpg.verify.verify`'s records), the Holm family of a Monte Carlo run and the
    exit status."""
    mc = args.mode == "mc"
    holm = None
    tested = [r for r in records if r["mode"] == "mc" and r["verdict"] != "error"]
    if mc and tested:
        holm = {"alpha": args.alpha, "family_size": max(r["holm_family"] for r in tested),
                "rejections": sum(p is not None and p < args.alpha for r in tested
                                  for p in (r["p_value_adjusted"], r["p_value_direction_adjusted"]))}
    return {"schema": VERIFY_SCHEMA, "problem": problem, "mode": args.mode, "group_size": args.group_size,
            "samples": args.samples if mc else None, "seed": args.seed, "alpha": args.alpha if mc else None,
            "target_reward": args.target_reward, "behaviour": args.behaviour, "loss": args.loss,
            "records": records, "holm": holm, "errored": [r["spec"] for r in records if r["verdict"] == "error"],
            "exit_status": status}


def _add_probe(sub) -> None:
    from ..cli import add_json_arg

    p = sub.add_parser("probe", help="run a plug-in (or any estimator spec) on edge cases and print what it returns",
                       description="Run an advantage function FILE.py:FUNCTION (or a catalog spec) on edge cases: "
                                   "identical rewards, a singleton group, all-zero rewards, ragged lengths, reward "
                                   "scales 1e6 and 1e-6, float32 against float64 (rewards 0.1, 0.7, -0.884, which "
                                   "binary floating point cannot hold exactly).",
                       epilog="Exit status: 0 every case ok; 1 a case is flagged or raised; 2 bad input (a bad spec, "
                              "a plug-in that fails to import).")
    p.add_argument("spec", metavar="FILE.py:FUNCTION")
    p.add_argument("--dtype", choices=_DTYPES, default="float64", help="dtype fed to the plug-in")
    add_json_arg(p, "tpg-probe/1", "print the cases and the flags")
    _add_timeout(p)
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    """The handler of ``tpg probe``; returns the exit status."""
    from ..estimators import format_probe, probe
    from ..estimators.plugin import probe_report

    dtype = _torch_dtype(args.dtype)
    rows = probe(args.spec, dtype=dtype, timeout=_plugin_timeout(args.plugin_timeout))
    report = probe_report(args.spec, rows, dtype)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_probe(rows))
    return 0 if report["ok"] else 1


def _add_offpolicy_help(sub) -> None:
    p = sub.add_parser("offpolicy-help", help="the behaviour policies and policy losses of `tpg verify --behaviour "
                                              "--loss`, with their formulas")
    p.set_defaults(func=cmd_offpolicy_help)


def cmd_offpolicy_help(args) -> int:
    """Print the behaviour stages and the loss catalog."""
    from ..offpolicy import describe_behaviours, describe_losses

    print("Behaviours (--behaviour STAGE[+STAGE...]; mu = softmax of the last stage's logits):")
    print(describe_behaviours())
    print("\nLosses (--loss NAME[:ARG,...,key=value,...]; every loss also takes filter_degenerate_groups="
          "false|true|new_prompts|same_prompt):")
    print(describe_losses())
    print("  FILE.py:FUNCTION[:key=value,...]                     a plug-in: fn(old_log_prob, log_prob, advantages, "
          "response_mask, loss_agg_mode, ...) -> loss (verl) or fn(old_log_prob, log_prob, advantages) -> "
          "per-token loss")
    print("\nFormulas and sources: python -c 'import tpg.offpolicy.losses as m; help(m)' (and .behaviour).")
    return 0


def register(subparsers) -> None:
    """Add ``verify``, ``probe`` and ``offpolicy-help`` to the ``tpg`` command line."""
    _add_verify(subparsers)
    _add_probe(subparsers)
    _add_offpolicy_help(subparsers)


__all__ = ["register", "cmd_verify", "cmd_probe", "cmd_offpolicy_help", "verify_document", "VERIFY_EXIT",
           "VERIFY_SCHEMA", "SUITE_SCHEMA"]
