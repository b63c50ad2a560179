"""Run every proof check and its negative control on a set of small MDPs; print a table.

``python -m tpg.proofs_checks.runner`` prints the table for :func:`default_cases` and exits with
status 1 if a statement is violated or a negative control goes unflagged.
"""

from __future__ import annotations

from types import ModuleType

from tpg._progress import progress_bar
from tpg._tables import legend_lines
from tpg.cases import mdp_from_spec

from . import STATEMENTS
from .common import NEGATIVE_TOL, STATEMENT_TOL

#: (label, spec) of the default cases: dense and terminal rewards, with and without EOS, one
#: and several prompts, gamma 1 and 0.9, tabular and shared policies, V = 3, H = 3..4
DEFAULT_SPECS = (
    ("dense H3 P1 g1", "dense:vocab=3,horizon=3,seed=0"),
    ("dense H4 eos P2 g1", "dense:vocab=3,horizon=4,eos=0,prompts=2,weights=random,seed=1"),
    ("dense H3 eos P3 g.9", "dense:vocab=3,horizon=3,eos=2,prompts=3,weights=random,gamma=0.9,seed=2"),
    ("dense H4 P1 g.9 shared", "dense:vocab=3,horizon=4,gamma=0.9,policy=shared,seed=3"),
    ("terminal H3 P1 g1", "terminal:vocab=3,horizon=3,seed=4"),
    ("terminal H4 eos P2 g.9", "terminal:vocab=3,horizon=4,eos=0,prompts=2,gamma=0.9,seed=5"),
    ("terminal H4 eos P3 g1 shared", "terminal:vocab=3,horizon=4,eos=1,prompts=3,policy=shared,seed=6"),
    ("sparse H4 P2 g.9", "sparse:vocab=3,horizon=4,prompts=2,gamma=0.9,p=0.3,seed=7"),
    ("first_token H3 eos P2 g1", "first_token:vocab=3,horizon=3,eos=1,prompts=2,seed=8"),
    ("length H4 eos P1 g.9", "length:vocab=3,horizon=4,eos=0,gamma=0.9,seed=9"),
    ("dense-twin H3 eos P2 g.9", "dense:vocab=3,horizon=3,eos=0,prompts=2,gamma=0.9,twin=true,seed=10"),
    ("dense-compact H4 eos P2 g1", "dense:vocab=3,horizon=4,eos=2,prompts=2,compact=true,seed=11"),
)


def default_cases() -> list[tuple]:
    """``(label, mdp, policy)`` for each of :data:`DEFAULT_SPECS`."""
    cases = []
    for label, spec in DEFAULT_SPECS:
        mdp, policy = mdp_from_spec(spec)
        cases.append((label, mdp, policy))
    return cases


def _resolve(statements) -> list[ModuleType]:
    if statements is None:
        return list(STATEMENTS)
    by_name = {m.NAME: m for m in STATEMENTS}
    out = []
    for s in statements:
        if isinstance(s, str):
            if s not in by_name:
                raise ValueError(f"unknown statement {s!r}; known: {', '.join(by_name)}")
            out.append(by_name[s])
        else:
            out.append(s)
    return out


def run_checks(cases=None, statements=None, progress: bool | None = False) -> list[dict]:
    """Every statement's check and negative control on every case.

    Args:
        cases: ``(label, mdp, policy)`` triples (default :func:`default_cases`).
        statements: statement modules or their ``NAME`` s (default all, in docs/THEORY.md order).
        progress: a progress bar on stderr over the statements and cases: True, False, or None (only
            when stderr is a terminal).

    Returns:
        One row per (statement, case, kind) with keys ``statement``, ``case``, ``kind``
        (``"statement"`` or ``"negative control"``), ``difference``, ``threshold`` and ``passed``:
        the statement holds (``difference <= 1e-10``) or the control fails as it must
        (``difference > 1e-6``).
    """
    cases = default_cases() if cases is None else cases
    mods = _resolve(statements)
    rows = []
    bar = progress_bar(progress, total=len(mods) * len(cases), desc="prove", unit="case", leave=False)
    for mod in mods:
        bar.set_postfix_str(mod.NAME)
        for label, mdp, policy in cases:
            diff = float(mod.check(mdp, policy))
            rows.append({"statement": mod.NAME, "case": label, "kind": "statement", "difference": diff,
                         "threshold": STATEMENT_TOL, "passed": diff <= STATEMENT_TOL})
            diff = float(mod.negative_control(mdp, policy))
            rows.append({"statement": mod.NAME, "case": label, "kind": "negative control", "difference": diff,
                         "threshold": NEGATIVE_TOL, "passed": diff > NEGATIVE_TOL})
            bar.update(1)
    bar.close()
    return rows


def _verdict(row: dict) -> str:
    if row["kind"] == "statement":
        return "holds" if row["passed"] else "VIOLATED"
    return "fails as it must" if row["passed"] else "NOT FLAGGED"


def format_table(rows: list[dict]) -> str:
    """An aligned text table of :func:`run_checks` rows (difference in ``%.2e``)."""
    header = ("statement", "case", "kind", "difference", "threshold", "verdict")
    body = [(r["statement"], r["case"], r["kind"], f"{r['difference']:.2e}",
             ("<= " if r["kind"] == "statement" else "> ") + f"{r['threshold']:.0e}", _verdict(r)) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    right = {3, 4}  # numbers align right

    def fmt(line):
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(line) for line in body)])


#: the meaning of each column of :func:`format_table` (printed under it by ``tpg prove``)
COLUMNS = {
    "statement": "the statement of docs/THEORY.md section 2 (one module of tpg.proofs_checks)",
    "case": "the MDP and policy it is checked on (tpg.proofs_checks.runner.DEFAULT_SPECS)",
    "kind": "statement: the identity itself; negative control: a deliberately wrong variant that must fail",
    "difference": "max |lhs - rhs| / max(1, max |rhs|), both sides computed exactly in float64",
    "threshold": "a statement holds at <= 1e-10; a negative control must exceed 1e-6",
    "verdict": "holds / fails as it must (as expected), VIOLATED / NOT FLAGGED (not as expected)",
}


def format_legend() -> str:
    """The legend of :func:`format_table`'s columns."""
    return "\n".join(legend_lines(COLUMNS))


def main() -> int:
    rows = run_checks(progress=None)
    print(format_table(rows))
    print(format_legend())
    failed = [r for r in rows if not r["passed"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows as expected")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
