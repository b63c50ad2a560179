"""The ``tpg`` command line.

Commands:
    tpg exact  (--case FILE | --mdp SPEC | --task SPEC) [--engine auto|tree|markov] [--json] [--save-case FILE]
    tpg prove  [--statement NAME ...] [--json] [--progress | --no-progress]
    tpg mdp-help | task-help
and the commands registered by sub-packages (``register(subparsers)`` functions listed in
``_COMMAND_MODULES``). Bad input prints one line ``tpg: error: ...`` and exits with status 2, and so
does an output that cannot be written (``tpg: error: cannot write FILE: reason``). Every command speaks
one vocabulary (the helpers below): ``--estimator``, ``--kl``/``--kl-beta``, ``--jobs`` (processes),
``--threads`` (torch threads), ``--progress/--no-progress`` and ``--json`` (one object with a ``schema``
key, docs/JSON.md); a renamed flag stays a hidden alias for one release (:class:`DeprecatedFlag`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

#: the JSON documents of ``tpg exact --json`` and ``tpg prove --json`` (docs/JSON.md)
EXACT_SCHEMA = "tpg-exact/1"
PROVE_SCHEMA = "tpg-prove/1"
# modules that add sub-commands: each has register(subparsers); missing ones are skipped
_COMMAND_MODULES = ("tpg.verify.cli", "tpg.train.cli", "tpg.experiments.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors: one line, status 2
        self.exit(2, f"tpg: error: {message}\n")


# ------------------------------------------------------------------------------ the shared vocabulary
# One spelling per idea across the commands: --estimator SPEC (repeatable where a command takes several),
# --kl KIND / --kl-beta BETA (the spec options kl= and kl_beta=), --jobs N (worker processes) and
# --threads N (torch threads in this process), --progress/--no-progress (default: a bar only when stderr
# is a terminal), --json (one document with a "schema" key, docs/JSON.md).
class DeprecatedFlag(argparse.Action):
    """A flag renamed in this release: still accepted for one more, hidden from ``--help``, with a one-line
    note on stderr naming the new flag. ``append=True`` adds to the new flag's list (``convert(value)``
    turns one value into several, e.g. a comma-separated list)."""

    def __init__(self, option_strings, dest, new: str, append: bool = False, convert=None, **kw):
        kw.pop("help", None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new, self.append, self.convert = new, append, convert

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"tpg: note: {option_string} is deprecated and will be removed in the next release; use {self.new}",
              file=sys.stderr)
        if not self.append:
            setattr(namespace, self.dest, values)
            return
        items = self.convert(values) if self.convert else [values]
        setattr(namespace, self.dest, list(getattr(namespace, self.dest, None) or []) + list(items))


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--progress/--no-progress`` (``args.progress``: True, False or None = auto), on every long command."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (--no-progress: none; default: only when stderr is a terminal)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads in this process (``args.threads``; None: torch's default)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op CPU threads of this process (default: torch's, one per core); worker "
                        "processes are --jobs, where a command has them")


def check_threads(threads) -> None:
    """``ValueError`` naming ``--threads`` unless it is None or an integer >= 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


def add_json_arg(p: argparse.ArgumentParser, schema: str, what: str) -> None:
    """``--json``: ``what``, as one JSON document (an object) whose ``schema`` key is ``schema``."""
    p.add_argument("--json", action="store_true",
                   help=f"{what}; one JSON object with \"schema\": \"{schema}\" (its keys: docs/JSON.md)")


def add_problem_args(p: argparse.ArgumentParser):
    """``--case FILE`` / ``--mdp SPEC`` / ``--task SPEC`` / ``--max-nodes`` / ``--save-case``, shared by
    every command that takes a problem."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--case", metavar="FILE", help="a tpg-case/1 JSON file (MDP and tabular policy)")
    src.add_argument("--mdp", metavar="SPEC",
                     help="a generated MDP with a seeded random policy, FAMILY:key=value,... "
                          "(e.g. dense:vocab=3,horizon=4,eos=0,prompts=2,seed=0; see `tpg mdp-help`)")
    src.add_argument("--task", metavar="SPEC",
                     help="a transformer task with a seeded tiny transformer policy, TASK:key=value,... "
                          "(e.g. copy:vocab=4,length=2; see `tpg task-help`)")
    p.add_argument("--max-nodes", type=int, default=None, metavar="N", help="size guard of the stored tree")
    p.add_argument("--save-case", metavar="FILE", default=None,
                   help="also write the MDP and policy as a case file")
    return src  # the required group of problem sources, for commands that add one (--suite, --lm)


def check_problem_specs(args) -> None:
    """Parse ``--mdp`` / ``--task`` before anything imports torch, so that a mistyped key, family or
    value is refused at once (:mod:`tpg.mdp.specs`); the ranges that need the MDP are checked when it
    is built."""
    from .mdp.specs import parse_mdp_spec, parse_task_spec

    if getattr(args, "mdp", None):
        parse_mdp_spec(args.mdp)
    if getattr(args, "task", None):
        parse_task_spec(args.task)


def load_problem_from_args(args):
    """``(mdp, policy)`` from the shared arguments; writes ``--save-case`` when given."""
    from .cases import load_problem, save_case
    mdp, policy = load_problem(case=args.case, mdp_spec=args.mdp, max_nodes=args.max_nodes,
                               task_spec=getattr(args, "task", None))
    if getattr(args, "save_case", None):
        save_case(args.save_case, mdp, policy)
        print(f"wrote case file {args.save_case}", file=sys.stderr)
    return mdp, policy


# ------------------------------------------------------------------------------ exact
def _cmd_exact(args) -> int:
    check_problem_specs(args)
    from .exact import choose_engine, solve
    mdp, policy = load_problem_from_args(args)
    if choose_engine(mdp, policy, args.engine) == "markov":
        return _exact_markov(args, mdp, policy)
    sol = solve(mdp, policy)
    tree = mdp.tree
    gnorm = float(sol.flat_grad().norm())
    if args.json:
        grad = sol.grad_logits
        entries = []
        for k in range(tree.num_nonterminal):
            prompt, prefix = tree.prefix(int(tree.nt_node_k[k]))
            entries.append({"prompt": prompt, "prefix": prefix, "grad": [float(x) for x in grad[k]]})
        print(json.dumps({"schema": EXACT_SCHEMA, "engine": "tree", "problem": mdp.name, "J": sol.J,
                          "grad_norm": gnorm, "prompt_values": [float(sol.value[p]) for p in range(mdp.num_prompts)],
                          "grad": entries}))
        return 0
    print(mdp.describe())
    print(f"J              = {sol.J:.12g}")
    print(f"|grad J|       = {gnorm:.6g}  (over {sum(p.numel() for p in policy.parameters())} parameters)")
    print(f"responses      = {tree.num_leaves:,}")
    print(f"non-terminal   = {tree.num_nonterminal:,} states")
    for p in range(mdp.num_prompts):
        print(f"V(prompt {p})   = {float(sol.value[p]):.12g}   rho = {float(mdp.prompt_weights[p]):.6g}")
    top = sol.grad_logits.abs().flatten().topk(min(5, sol.grad_logits.numel()))
    print("largest |dJ/dlogit| entries:")
    for idx in top.indices.tolist():
        k, w = divmod(idx, mdp.vocab_size)
        prompt, prefix = tree.prefix(int(tree.nt_node_k[k]))
        print(f"  prompt {prompt} prefix {prefix} token {w}: {float(sol.grad_logits[k, w]):+.6g}")
    return 0


def _exact_markov(args, mdp, policy) -> int:
    """``tpg exact`` by the Markov engine (shared policy, compact rewards): no tree, any horizon."""
    from .exact import solve_markov
    sol = solve_markov(mdp, policy)
    H, V, P = mdp.horizon, mdp.vocab_size, mdp.num_prompts
    gnorm = float(sol.flat_grad().norm())
    if args.json:
        states = []
        for t, prev in sol.reachable.nonzero().tolist():
            states.append({"position": t, "prev": prev, "reach": float(sol.reach[t, prev]),
                           "grad": [float(x) for x in sol.grad_logits[t, prev]]})
        print(json.dumps({"schema": EXACT_SCHEMA, "engine": "markov", "problem": mdp.name, "J": sol.J,
                          "grad_norm": gnorm, "expected_length": sol.expected_length,
                          "prompt_values": [float(x) for x in sol.prompt_values()], "grad": states}))
        return 0
    eos = "none" if mdp.eos_token is None else str(mdp.eos_token)
    print(f"{mdp.name}: V={V} H={H} eos={eos} gamma={mdp.gamma:g} prompts={P}")
    print(f"engine         = markov ({int(sol.reachable.sum()):,} (position, previous token) states; no tree)")
    print(f"J              = {sol.J:.12g}")
    print(f"|grad J|       = {gnorm:.6g}  (over {sum(p.numel() for p in policy.parameters())} parameters)")
    print(f"E[T]           = {sol.expected_length:.6g}  (expected response length)")
    for p, v in enumerate(sol.prompt_values().tolist()):
        print(f"V(prompt {p})   = {v:.12g}   rho = {float(mdp.prompt_weights[p]):.6g}")
    top = sol.grad_logits.abs().flatten().topk(min(5, sol.grad_logits.numel()))
    print("largest |dJ/dtheta| entries (position t, previous token prev; prev >= V is the prompt V + p):")
    for idx in top.indices.tolist():
        t, rest = divmod(idx, (V + P) * V)
        prev, w = divmod(rest, V)
        print(f"  t {t} prev {prev} token {w}: {float(sol.grad_logits[t, prev, w]):+.6g}")
    return 0


# ------------------------------------------------------------------------------ prove
def _cmd_prove(args) -> int:
    from .proofs_checks.runner import format_legend, format_table, run_checks
    rows = run_checks(statements=args.statement or None, progress=args.progress)
    if args.json:
        print(json.dumps({"schema": PROVE_SCHEMA, "ok": all(r["passed"] for r in rows), "rows": rows}))
    else:
        print(format_table(rows))
        print(format_legend())
        bad = [r for r in rows if not r["passed"]]
        n_stat = sum(r["kind"] == "statement" for r in rows)
        print(f"\n{len(rows) - len(bad)} of {len(rows)} checks as expected "
              f"({n_stat} statement checks must hold, {len(rows) - n_stat} negative controls must fail)")
    return 1 if any(not r["passed"] for r in rows) else 0


def _cmd_mdp_help(args) -> int:
    from .mdp.specs import FAMILIES, spec_help
    print(f"--mdp FAMILY:key=value,...   families: {', '.join(FAMILIES)}\nkeys:\n{spec_help()}")
    return 0


def _cmd_task_help(args) -> int:
    from .mdp.specs import task_help
    print(task_help())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpg", description="Test policy-gradient estimators against exact gradients "
                                             "of token-level objectives.")
    parser.add_argument("--version", action="version", version=f"tpg {__import__('tpg').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("exact", help="exact J and grad J of an MDP and policy (float64)")
    add_problem_args(p)
    add_json_arg(p, EXACT_SCHEMA, "print J, grad J and the prompt values; grad: dJ/dlogits per non-terminal node "
                                  "(tree engine) or per reachable (position, previous token) state (Markov engine)")
    p.add_argument("--engine", choices=("auto", "tree", "markov"), default="auto",
                   help="tree: dynamic programme over the stored tree (needs it within --max-nodes); "
                        "markov: over the (position, previous token) states, for policy=shared with "
                        "compact=true at any horizon; auto (default): tree when it fits, else markov")
    p.set_defaults(func=_cmd_exact)

    p = sub.add_parser("prove", help="exact checks of every statement of docs/THEORY.md section 2, "
                                     "with negative controls")
    p.add_argument("--statement", action="append", metavar="NAME",
                   help="only this statement (repeatable); default all")
    add_json_arg(p, PROVE_SCHEMA, "print every check's row")
    add_progress_arg(p)
    p.set_defaults(func=_cmd_prove)

    p = sub.add_parser("mdp-help", help="the keys of --mdp FAMILY:key=value,...")
    p.set_defaults(func=_cmd_mdp_help)

    p = sub.add_parser("task-help", help="the transformer tasks and the keys of --task TASK:key=value,...")
    p.set_defaults(func=_cmd_task_help)

    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        mod.register(sub)
    return parser


#: options naming a file a command writes, and options naming a directory it writes into (per
#: command where the same option is read elsewhere: ``--cache-dir`` is written only by ``study``)
_OUTPUT_FILES = ("out", "checkpoint", "save_case")
_OUTPUT_DIRS = {"out_dir": None, "cache_dir": ("study",)}


def output_paths(args) -> list[tuple[str, str, bool]]:
    """``(option, path, is_directory)`` of the outputs named by a parsed command's options."""
    found = []
    for name in _OUTPUT_FILES:
        value = getattr(args, name, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            found.append((name, str(value), False))
    for name, commands in _OUTPUT_DIRS.items():
        value = getattr(args, name, None)
        if isinstance(value, (str, os.PathLike)) and str(value) and (commands is None or args.command in commands):
            found.append((name, str(value), True))
    return found


def check_writable(path: str, is_dir: bool) -> None:
    """``OSError`` naming ``path`` unless a file (``is_dir=False``) or files inside a directory could
    be created there. Tries for real, without leaving anything: opens an existing file for appending
    (its contents untouched), else creates and removes a temporary file in the directory, or in the
    nearest existing ancestor of a directory still to be created (so ``/proc/...``, a directory given
    as a file, a file given as a directory and missing permissions all fail here, before the work)."""
    import errno
    import tempfile

    from ._io import nearest_existing_dir

    p = Path(path)
    if p.exists():
        if is_dir and not p.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        if not is_dir:
            if p.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            try:
                with open(p, "ab"):
                    pass
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, path) from None
            return
    anc = nearest_existing_dir(p if p.is_dir() else p.parent, path)
    try:
        with tempfile.TemporaryFile(dir=anc, prefix=".tpg-write-check-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


def _os_error_line(exc: OSError, args) -> str:
    """``cannot write FILE: reason`` for an output of the command (or a file inside an output
    directory), ``cannot access FILE: reason`` for any other file."""
    name = exc.filename
    reason = exc.strerror or str(exc)
    if name is None:
        return f"{reason}"
    target = Path(os.fsdecode(name))
    outputs = [Path(path) for _, path, _ in output_paths(args)]
    writing = any(target == out or out in target.parents for out in outputs)
    return f"cannot {'write' if writing else 'access'} {os.fsdecode(name)}: {reason}"


def run_command(args) -> int:
    """Run a parsed command (``args.func``): its exit code.

    Before the work, every output the options name (``--out``, ``--checkpoint``, ``--save-case``,
    ``--out-dir``, ``study --cache-dir``) is checked writable (:func:`check_writable`). A
    ``ValueError`` is printed as ``tpg: error: ...`` and gives 2; so does an ``OSError``, as
    ``tpg: error: cannot write FILE: reason`` (one line); a closed output pipe gives 0."""
    try:
        for _, path, is_dir in output_paths(args):
            check_writable(path, is_dir)
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"tpg: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `tpg exact --json | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # an output that cannot be written: a directory, no permission, /proc, a full disk
        print(f"tpg: error: {_os_error_line(exc, args)}", file=sys.stderr)
        return 2


def _note_warnings(previous):
    """A ``warnings.showwarning`` that prints deprecations (``FutureWarning``) and tpg's notes
    (:class:`tpg._progress.Note`) as one line ``tpg: note: ...`` and hands every other warning to ``previous``."""
    from ._progress import Note

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, (FutureWarning, Note)):
            print(f"tpg: note: {message}", file=sys.stderr if file is None else file)
        else:
            previous(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    import warnings

    previous = warnings.showwarning
    warnings.showwarning = _note_warnings(previous)
    try:
        return _main(argv)
    finally:
        warnings.showwarning = previous


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print("tpg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
