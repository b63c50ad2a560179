"""Benchmark of the verifier: the standard suite's wall time, and Monte Carlo throughput in verified
gradient samples per second against a per-sample backward-pass reference, side by side.

    python benchmarks/verify_bench.py            # full run, writes benchmarks/results/verify.json
    python benchmarks/verify_bench.py --quick    # a few seconds (the smoke test's setting)

Monte Carlo throughput: the time from sampling ``N`` batches to the verdict, per batch (a verified
gradient sample), in two stages: sampling and the estimator (shared by both paths), then the
per-batch gradients and the test. tpg's gradient stage takes every batch's gradient from the
analytic softmax score (scatters of the score coefficients, :mod:`tpg.verify.score`); the reference
takes the same kind of batches and estimator output and computes each batch's gradient by one
autograd backward pass of its surrogate ``sum_t c_t log pi(w_t | s_t)``, then runs the same kind of
test. The reference is timed on fewer batches and reported per sample. Both the end-to-end speedup
and the gradient-stage speedup are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpg.cases import mdp_from_spec  # noqa: E402
from tpg.estimators import get_estimator  # noqa: E402
from tpg.exact import solve  # noqa: E402
from tpg.verify.montecarlo import mc_test, sample_gradient_terms  # noqa: E402
from tpg.verify.score import ParamMap  # noqa: E402
from tpg.verify.suite import format_suite, run_suite  # noqa: E402
from tpg.verify.verdict import hotelling_test  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported by path
from _common import cpu_model  # noqa: E402

CASES = (
    # (label, --mdp spec, estimator spec, G)
    ("reinforce / tabular", "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=1", "reinforce", 1),
    ("rloo G=4 / tabular", "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=1", "rloo", 4),
    ("ppo_gae / tabular V=4 H=4", "dense:vocab=4,horizon=4,eos=0,prompts=2,seed=2", "ppo_gae:lambda=0.9", 1),
    ("grpo G=4 / shared", "terminal:vocab=3,horizon=4,eos=0,prompts=2,seed=3,policy=shared", "grpo", 4),
)


def machine() -> dict:
    cpu = cpu_model(platform.processor() or "")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _gradients_tpg(mdp, pol, gs, seed):
    """tpg's gradient stage: per-batch gradients from the analytic score, and the test."""
    sol = solve(mdp, pol)
    pmap = ParamMap(pol, mdp.tree)
    t0 = time.perf_counter()
    res = mc_test(gs, sol.flat_grad(), sol.logp.exp(), pmap, seed=seed)
    return time.perf_counter() - t0, res.verdict.verdict


def _gradients_reference(mdp, pol, gs, seed):
    """The reference gradient stage: one autograd backward of the surrogate ``sum_t c_t log pi`` per
    batch, then the same kind of test on the stacked gradients."""
    tree = mdp.tree
    sol = solve(mdp, pol)
    d = sol.flat_grad()
    params = [p for p in pol.parameters() if p.requires_grad]
    N = gs.num_batches
    ends = torch.searchsorted(gs.batch_b, torch.arange(N + 1))
    t0 = time.perf_counter()
    grads = []
    for b in range(N):
        rows = slice(int(ends[b]), int(ends[b + 1]))
        nt, tok, coef = gs.nt_bt[rows], gs.tok_bt[rows], gs.coef_bt[rows]
        logp = pol.node_log_probs(tree)
        lp = torch.where(nt >= 0, logp[nt.clamp(min=0), tok], torch.zeros((), dtype=logp.dtype))
        g = torch.autograd.grad((coef * lp).sum(), params, allow_unused=True)
        grads.append(torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if x is None else x.reshape(-1)
                                for p, x in zip(params, g)]))
    G = torch.stack(grads)
    U = torch.cat([(d / d.norm()).unsqueeze(1),
                   torch.randn(d.numel(), 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)], 1)
    hotelling_test(G @ U - (d @ U))
    return time.perf_counter() - t0


def bench_mc(n_tpg: int, n_ref: int, seed: int = 0, repeats: int = 3) -> list[dict]:
    """Per case: the shared stage (sampling, estimator) and each gradient stage, per sample; each
    stage timed ``repeats`` times, the fastest kept (the machine may be shared)."""
    rows = []
    for label, mdp_spec, spec, G in CASES:
        mdp, pol = mdp_from_spec(mdp_spec)
        est = get_estimator(spec)
        warm = sample_gradient_terms(mdp, pol, est, min(n_tpg, 200), G, seed=seed)  # warm-up (imports, caches)
        _gradients_tpg(mdp, pol, warm, seed)
        _gradients_reference(mdp, pol, sample_gradient_terms(mdp, pol, est, 8, G, seed=seed), seed)
        t_shared = t_grad = t_ref = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            gs = sample_gradient_terms(mdp, pol, est, n_tpg, G, seed=seed)
            t_shared = min(t_shared, (time.perf_counter() - t0) / n_tpg)
            t, verdict = _gradients_tpg(mdp, pol, gs, seed)
            t_grad = min(t_grad, t / n_tpg)
            gs_ref = sample_gradient_terms(mdp, pol, est, n_ref, G, seed=seed)
            t_ref = min(t_ref, _gradients_reference(mdp, pol, gs_ref, seed) / n_ref)
        rows.append({"case": label, "mdp": mdp_spec, "estimator": spec, "group_size": G,
                     "num_params": sum(p.numel() for p in pol.parameters()), "n_tpg": n_tpg, "n_ref": n_ref,
                     "shared_us_per_sample": 1e6 * t_shared, "tpg_gradient_us_per_sample": 1e6 * t_grad,
                     "reference_gradient_us_per_sample": 1e6 * t_ref,
                     "tpg_samples_per_s": 1 / (t_shared + t_grad), "reference_samples_per_s": 1 / (t_shared + t_ref),
                     "speedup": (t_shared + t_ref) / (t_shared + t_grad), "gradient_speedup": t_ref / t_grad,
                     "verdict": verdict})
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("case", "params", "sample+estimator us", "tpg grad us", "backward grad us", "tpg samples/s",
              "backward samples/s", "end-to-end", "gradient stage")
    table = [(r["case"], str(r["num_params"]), f"{r['shared_us_per_sample']:.1f}",
              f"{r['tpg_gradient_us_per_sample']:.2f}", f"{r['reference_gradient_us_per_sample']:.0f}",
              f"{r['tpg_samples_per_s']:,.0f}", f"{r['reference_samples_per_s']:,.0f}", f"{r['speedup']:,.0f}x",
              f"{r['gradient_speedup']:,.0f}x") for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    lines.append("us = microseconds per verified gradient sample (one batch); sample+estimator is shared by both paths")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no suite (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify.json"), help="JSON output path")
    ap.add_argument("--samples", type=int, default=20_000, help="Monte Carlo batches on tpg's path")
    ap.add_argument("--ref-samples", type=int, default=1_000, help="batches on the backward-pass reference path")
    ap.add_argument("--repeats", type=int, default=3, help="timings per stage (the fastest is kept)")
    args = ap.parse_args(argv)
    n_tpg, n_ref = (400, 40) if args.quick else (args.samples, args.ref_samples)
    repeats = 1 if args.quick else args.repeats
    result: dict = {"machine": machine(), "command": "python benchmarks/verify_bench.py" + (" --quick" if args.quick
                                                                                           else ""),
                    "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if not args.quick:
        suite = run_suite("standard")
        result["suite"] = {"wall_s": suite["wall_s"], "verdicts": len(suite["records"]),
                           "disagreements": len(suite["disagreements"])}
        print(format_suite(suite).splitlines()[-1 - len(suite["disagreements"])])
    rows = bench_mc(n_tpg, n_ref, repeats=repeats)
    result["monte_carlo"] = rows
    result["min_speedup"] = min(r["speedup"] for r in rows)
    result["min_gradient_speedup"] = min(r["gradient_speedup"] for r in rows)
    print(format_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
