"""The claims report: every theorem and analysis claim of docs/THEORY.md with a computed status.

``write_report(cache_dir, out)`` gathers

* the ``claim_rows`` of every study, computed from its cached results (the latest run of each
  study, :func:`tpg.experiments.runner.load_results`); each row carries its status
  (``confirmed`` / ``refuted`` / ``qualified``), computed by the stated rule from the numbers. A
  study whose grid is not all in the cache (fewer cells cached than its latest run's grid, or no
  run recorded) is ``incomplete``, never ``ok``, and every row it reports reads ``incomplete``:
  a rule applied to part of a grid does not decide a claim (:func:`study_progress`);
* the exact proof checks of :mod:`tpg.proofs_checks` (cheap, so computed afresh): ``lemma1``,
  ``lemma2``, ``critic_identity`` and ``td_identity`` get their row from them (confirmed when every
  statement holds on every default case AND every negative control fails; qualified when the
  statements hold but a negative control goes unflagged; refuted when a statement is violated),
  and every theorem row shows its proof-check tally beside the study's number;

and writes one Markdown table per section: theorems (docs/THEORY.md section 2), analysis claims
(section 6), further checks (sections 3-5), tpg's off-policy checks (section 8: rows the ``offpolicy``
study has not reported read ``not run``), followed by each row's rule and secondary numbers,
the proof-check summary and the studies' provenance (quick or full run, cells).

A theorem whose study has not run falls back on its proof check; a claim nobody reported reads
``not run``, with the command that produces it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .._tables import legend_lines

#: (id, claim, study that reports it, proof-check module) in docs/THEORY.md section 2 order
THEOREMS: tuple[tuple[str, str, str | None, str | None], ...] = (
    ("lemma1", "Lemma 1: grad J = E sum_t gamma^(t-1) Q(s_t, w_t) grad log pi(w_t|s_t)", None, "lemma1"),
    ("lemma2", "Lemma 2: a prefix-only c(s_t) added to token t's weight leaves the expectation unchanged", None,
     "lemma2"),
    ("thm1", "Theorem 1: sum_t RM(W) grad log pi(w_t|s_t) is unbiased for grad J, for any token rewards and gamma",
     "bias", "theorem1"),
    ("eq26", "Eq. 26: ZRA with gamma < 1 is inconsistent; PPO/GAE with gamma < 1 on ZRA rewards is biased",
     "gamma", "eq26_gamma"),
    ("thm2", "Theorem 2: the advantage V'(s_{t+1}) - V'(s_t) gives an unbiased gradient", "bias", "theorem2"),
    ("critic_identity", "Response-level critic identity: V'(s_t) = sum_{k<t} gamma^(k-1) r_k + gamma^(t-1) V(s_t)",
     None, "critic_identity"),
    ("td_identity", "TD identity: delta'_t = gamma^(t-1) delta_t (gamma = 1: equal TD errors)", None, "td_identity"),
    ("gae", "GAE: exact critic unbiased for every lambda; inexact critic only for lambda = 1", "critic",
     "gae_equality"),
)
#: (id, claim, study expected to report it) for docs/THEORY.md section 6
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("claim1", "PPO's critic estimates E[RM(W^(t+1))]: with a good critic its gradient has lower variance than "
               "GRPO/ReMax/RLOO", "critic"),
    ("claim2", "GRPO/ReMax/RLOO baselines amount to one global baseline E[RM(W^(1))] instead of one per step",
     "critic"),
    ("claim3", "centering by subtracting the mean does not reduce variance", "centering"),
    ("claim4", "dividing by the std acts like a smaller learning rate", "centering"),
    ("claim5", "an all-zero group gives GRPO a zero gradient; per-step PPO/TRePO advantages can be non-zero",
     "zero_groups"),
    ("claim6", "TRePO is simpler than PPO and matches GRPO's memory", "learning"),
    ("claim7", "response-level and token-level RL produce the same expected update", "learning"),
)
#: (id, claim, study expected to report it): tpg's own off-policy checks, docs/THEORY.md section 8
OFFPOLICY_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("offpolicy_is_seq", "sequence-level importance sampling is unbiased for grad J(pi) under every behaviour with "
                         "full support, and its variance grows exponentially with the response length", "offpolicy"),
    ("offpolicy_tis", "truncated importance sampling (tis:2) trades a bias that grows with the mismatch for a "
                      "variance below sequence-level IS's", "offpolicy"),
    ("offpolicy_gspo", "GSPO's sequence ratio is biased for grad J(pi) unless mu = pi", "offpolicy"),
    ("offpolicy_top_p", "training on a top-p sampler without correction is biased, and the bias vanishes as p -> 1",
     "offpolicy"),
    ("offpolicy_curves", "under a fixed mismatch the correction changes the outcome of training (the final exact J), "
                         "not only the gradient", "offpolicy"),
)
SECTION_NAMES = {"theorem": "Theorems (docs/THEORY.md section 2)",
                 "claim": "Analysis claims (docs/THEORY.md section 6)",
                 "further": "Further checks (docs/THEORY.md sections 3-5)",
                 "offpolicy": "Off-policy checks (docs/THEORY.md section 8)"}


# ------------------------------------------------------------------------------ proof checks
def proof_summary(rows: list[dict]) -> dict[str, dict]:
    """Per statement of :func:`tpg.proofs_checks.runner.run_checks` rows: cases, statements holding,
    negative controls failing as they must, the max statement difference, the min control difference."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["statement"], {"cases": 0, "hold": 0, "controls": 0, "flagged": 0,
                                            "max_difference": 0.0, "min_control": math.inf})
        if r["kind"] == "statement":
            s["cases"] += 1
            s["hold"] += int(bool(r["passed"]))
            s["max_difference"] = max(s["max_difference"], float(r["difference"]))
        else:
            s["controls"] += 1
            s["flagged"] += int(bool(r["passed"]))
            s["min_control"] = min(s["min_control"], float(r["difference"]))
    return out


def proof_status(summary: dict) -> str:
    """``refuted`` if a statement fails, ``qualified`` if a negative control goes unflagged, else ``confirmed``."""
    if summary["hold"] < summary["cases"] or summary["cases"] == 0:
        return "refuted"
    if summary["flagged"] < summary["controls"]:
        return "qualified"
    return "confirmed"


def proof_tally(summary: dict | None) -> str:
    if summary is None:
        return "-"
    return (f"{summary['hold']}/{summary['cases']} hold, {summary['flagged']}/{summary['controls']} controls fail")


def proof_row(id: str, claim: str, summary: dict) -> dict:
    """A report row computed from a statement's proof checks."""
    from tpg.proofs_checks.common import NEGATIVE_TOL, STATEMENT_TOL

    return {"id": id, "claim": claim, "status": proof_status(summary), "number": summary["max_difference"],
            "uncertainty": None, "unit": "max difference over the default cases (exact)", "figure": "",
            "rule": f"confirmed if the statement's difference is <= {STATEMENT_TOL:g} on every default case and every "
                    f"negative control's difference is > {NEGATIVE_TOL:g}; qualified if a control goes unflagged; "
                    f"refuted if a statement is violated",
            "detail": f"smallest negative-control difference {summary['min_control']:.3g}",
            "source": "proof checks"}


# ------------------------------------------------------------------------------ gathering
#: the status of every row of a study whose grid is not all in the cache
INCOMPLETE = "incomplete"


def study_progress(name: str, cache_dir: str | Path, df=None) -> dict:
    """How much of a study's latest grid is cached: ``{"cells", "grid_cells", "quick", "complete"}``.

    ``cells``: distinct cells whose results :func:`~tpg.experiments.runner.load_results` reads
    (``df``, loaded when not given); ``grid_cells``: the cells of the latest run's grid
    (:func:`~tpg.experiments.runner.latest_run_info`; 0 when no run is recorded); ``complete``:
    a run is recorded and every one of its cells is cached (``cells >= grid_cells > 0``).
    """
    from .runner import latest_run_info, load_results

    if df is None:
        df = load_results(name, cache_dir)
    run = latest_run_info(name, cache_dir) or {}
    cells = int(df["cell_key"].nunique()) if len(df) and "cell_key" in df.columns else 0
    grid = len(run.get("keys", []))
    return {"cells": cells, "grid_cells": grid, "quick": run.get("quick"), "complete": grid > 0 and cells >= grid}


def partial_note(name: str, progress: dict) -> str:
    """One line saying a study's grid is partial and how to complete it."""
    if progress["grid_cells"] == 0:
        return f"study {name}: {progress['cells']} cells cached but no run recorded (run `tpg study {name}`)"
    mode = " --quick" if progress.get("quick") else ""
    return (f"study {name}: partial grid, {progress['cells']} of {progress['grid_cells']} cells cached "
            f"(run `tpg study {name}{mode}` to complete it)")


def study_rows(cache_dir: str | Path, studies=None) -> tuple[list[dict], dict[str, dict]]:
    """Claim rows of every study with cached results, and per study ``{"status", "cells",
    "grid_cells", "rows", "quick", "error"}``; status ``ok`` (grid complete), ``incomplete`` (its rows
    then read ``incomplete``, with what the rule gives on the cached part in their detail), ``not run``
    or ``error`` (a rule raised)."""
    from .runner import load_results
    from .studies import STUDIES, load_study

    rows, info = [], {}
    for name in studies or STUDIES:
        try:
            mod = load_study(name)
        except (ImportError, ValueError) as exc:
            info[name] = {"status": "missing", "error": str(exc)}
            continue
        df = load_results(name, cache_dir)
        prog = study_progress(name, cache_dir, df)
        status = "not run" if df.empty else ("ok" if prog["complete"] else INCOMPLETE)
        entry = {"status": status, "rows": int(len(df)), "cells": prog["cells"], "grid_cells": prog["grid_cells"],
                 "quick": prog["quick"], "error": ""}
        if not df.empty:
            try:
                for r in mod.claim_rows(df):
                    if status == INCOMPLETE:
                        r = {**r, "status": INCOMPLETE,
                             "detail": f"{partial_note(name, prog)}; on the cached cells alone the rule gives "
                                       f"{r['status']}" + (f"; {r['detail']}" if r.get("detail") else "")}
                    rows.append({**r, "source": f"study {name}"})
            except Exception as exc:  # a broken rule must not hide the other rows
                entry["status"] = "error"
                entry["error"] = f"{type(exc).__name__}: {exc}"
        info[name] = entry
    return rows, info


def collect_rows(cache_dir: str | Path = ".tpg-cache", proofs: bool = True, studies=None,
                 proof_rows: list[dict] | None = None, progress: bool | None = False) -> tuple[list[dict], dict, dict]:
    """``(rows, study_info, proof_summaries)``: every report row with ``section`` (theorem | claim |
    further | offpolicy) and ``source``, in report order. ``progress``: a bar over the proof checks
    on stderr (True, False, or None: only when stderr is a terminal)."""
    found, info = study_rows(cache_dir, studies)
    summaries: dict[str, dict] = {}
    if proof_rows is None and proofs:
        from tpg.proofs_checks.runner import run_checks

        proof_rows = run_checks(progress=progress)
    if proof_rows:
        summaries = proof_summary(proof_rows)
    by_id: dict[str, list[dict]] = {}
    for r in found:
        by_id.setdefault(r["id"], []).append(r)
    out = []
    for id, claim, study, proof in THEOREMS:
        summary = summaries.get(proof) if proof else None
        rows = by_id.pop(id, [])
        if not rows and summary is not None:
            row = proof_row(id, claim, summary)
            if study:
                row["detail"] += f"; study row missing: run `tpg study {study}`"
            rows = [row]
        if not rows:
            rows = [_not_run(id, claim, study)]
        for r in rows:
            out.append({**r, "section": "theorem", "proof": proof_tally(summary)})
    for id, claim, study in CLAIMS:
        rows = by_id.pop(id, []) or [_not_run(id, claim, study)]
        out += [{**r, "section": "claim", "proof": "-"} for r in rows]
    offpolicy = []
    for id, claim, study in OFFPOLICY_CLAIMS:
        rows = by_id.pop(id, []) or [_not_run(id, claim, study)]
        offpolicy += [{**r, "section": "offpolicy", "proof": "-"} for r in rows]
    for id in sorted(by_id):
        out += [{**r, "section": "further", "proof": "-"} for r in by_id[id]]
    out += offpolicy
    return out, info, summaries


def _not_run(id: str, claim: str, study: str | None) -> dict:
    how = f"run `tpg study {study}`" if study else "computed by the proof checks, left out of this report"
    return {"id": id, "claim": claim, "status": "not run", "number": math.nan, "uncertainty": None, "unit": "",
            "figure": "", "rule": how, "detail": "", "source": "-"}


# ------------------------------------------------------------------------------ formatting
def format_number(row: dict) -> str:
    """``number +/- uncertainty unit`` (``-`` for a missing number)."""
    x = row.get("number")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{x:.3g}"
    u = row.get("uncertainty")
    if u is not None and not (isinstance(u, float) and math.isnan(u)):
        text += f" ± {u:.2g}"
    return text + (f" ({row['unit']})" if row.get("unit") else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(rows: list[dict], info: dict, summaries: dict, cache_dir: str | Path = ".tpg-cache") -> str:
    """The report as Markdown (see the module docstring)."""
    from tpg import __version__

    lines = ["# tpg claims report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by tpg {__version__} from the cache `{cache_dir}`. "
             "Each status is computed from the numbers by the rule listed under *Rules*; numbers are exact "
             "(float64 enumeration) unless an uncertainty is given.", ""]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines += ["Statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]
    partial = [n for n, s in info.items() if s.get("status") == INCOMPLETE]
    if partial:
        lines += [f"**Incomplete:** {', '.join(partial)} — fewer cells cached than in the latest run's grid; their "
                  "rows read `incomplete` until the grid is complete (see *Studies*).", ""]
    for section in ("theorem", "claim", "further", "offpolicy"):
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        lines += [f"## {SECTION_NAMES[section]}", ""]
        head = ["id", "claim", "status", "number", "figure", "source"]
        if section == "theorem":
            head.append("proof checks")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sec:
            fig = f"[{Path(r['figure']).name}]({Path(r['figure']).name})" if r.get("figure") else "-"
            cells = [r["id"], r["claim"], f"**{r['status']}**", format_number(r), fig, r.get("source", "-")]
            if section == "theorem":
                cells.append(r.get("proof", "-"))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    lines += ["## Rules and secondary numbers", ""]
    for r in rows:
        extra = f" — {r['detail']}" if r.get("detail") else ""
        lines.append(f"- **{r['id']}** ({r.get('source', '-')}): {r['rule']}{extra}")
    lines.append("")
    if summaries:
        lines += ["## Proof checks (`tpg prove`, default cases)", "",
                  "| statement | statements hold | controls fail | max difference | min control difference |",
                  "|---|---|---|---|---|"]
        for name, s in summaries.items():
            lines.append(f"| {name} | {s['hold']}/{s['cases']} | {s['flagged']}/{s['controls']} | "
                         f"{s['max_difference']:.2e} | {s['min_control']:.2e} |")
        lines.append("")
    lines += ["## Studies", "", "| study | status | run | cells cached / in grid | rows |", "|---|---|---|---|---|"]
    for name, s in info.items():
        if s["status"] == "missing":
            lines.append(f"| {name} | not installed | - | - | - |")
            continue
        mode = "-" if s.get("quick") is None else ("quick" if s["quick"] else "full")
        status = s["status"] + (f": {s['error']}" if s.get("error") else "")
        lines.append(f"| {name} | {_cell(status)} | {mode} | {s['cells']} / {s['grid_cells']} | {s['rows']} |")
    lines.append("")
    return "\n".join(lines)


def write_report(cache_dir: str | Path = ".tpg-cache", out: str | Path = "figures/REPORT.md", proofs: bool = True,
                 studies=None) -> Path:
    """Write the claims report to ``out`` (Markdown) and return its path."""
    rows, info, summaries = collect_rows(cache_dir, proofs=proofs, studies=studies)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_markdown(rows, info, summaries, cache_dir))
    return out


def format_table(rows: list[dict]) -> str:
    """A short aligned text table (id, status, number) for the terminal."""
    body = [(r["id"], r["status"], format_number(r)) for r in rows]
    w = [max(len(x[i]) for x in body + [("id", "status", "number")]) for i in range(3)]
    lines = [f"{'id':<{w[0]}}  {'status':<{w[1]}}  number", f"{'-' * w[0]}  {'-' * w[1]}  {'-' * 6}"]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in body]
    lines += legend_lines({"id": "the claim (its row in the claims report, from docs/THEORY.md sections 2 and 6)",
                           "status": "confirmed, qualified, refuted, not run, incomplete (part of the grid cached) "
                                     "or error, decided from the number by the rule printed in the report",
                           "number": "the deciding measurement, with its unit"})
    return "\n".join(lines)


__all__ = ["write_report", "collect_rows", "format_markdown", "format_table", "proof_summary", "proof_status",
           "study_progress", "partial_note", "INCOMPLETE", "THEOREMS", "CLAIMS", "OFFPOLICY_CLAIMS"]
