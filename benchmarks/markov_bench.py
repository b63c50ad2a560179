"""Exact J and grad J at long horizons: the Markov engine (``tpg.exact.solve_markov``) at H = 1024, V = 64,
and side by side with the tree engine (``tpg.exact.solve``) where both run.

The problems: dense ``N(0, 1)`` compact rewards (a table over (position, previous token, token)), one
prompt, a :class:`~tpg.policies.SharedSoftmax` policy with ``N(0, 1)`` logits, float64.

1. **Long horizon** (the issue's target: under 1 s on 2 cores): ``solve_markov(mdp, policy,
   with_grad=True)`` at ``H = 1024``, ``V = 64``, for no EOS / ``gamma = 1`` and EOS / ``gamma = 0.99``;
   the median of ``--repeats`` warm runs after one cold run. Building the MDP and the policy (the
   random tables) is set-up, timed separately and excluded. At this size the only independent
   exact computation is autograd through the forward-only objective
   (:func:`tpg.exact.markov_objective`): its J and gradient are compared (max abs difference) and
   its time reported for scale.
2. **Side by side** on trees up to a few million nodes: ``solve`` and ``solve_markov`` on the same
   problem in one run, alternating, each the median of ``--repeats`` warm runs; the tree build and the
   materialisation of the compact rewards on the tree are set-up (excluded), as in
   ``exact_bench.py``. Reported: both times, the ratio ``tree / markov``, and the max abs
   difference of J and of the gradient (the ``[H, V + P, V]`` logit table; the tree engine sums its
   per-node gradients into it by autograd through the policy's gather). Agreement must be <= 1e-10.

Timings mean something only on a quiet machine (the JSON records the load average at the start and
the end). Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/markov_bench.py            # writes benchmarks/results/markov.json
    .venv/bin/python benchmarks/markov_bench.py --tiny     # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tpg.exact import markov_objective, solve, solve_markov
from tpg.mdp.families import make_mdp
from tpg.mdp.tree import count_nodes
from tpg.policies import SharedSoftmax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported by path
from _common import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_S = 1.0
AGREEMENT_TOL = 1e-10
#: the long-horizon problems: (V, H, eos, gamma)
LONG = [(64, 1024, None, 1.0), (64, 1024, 0, 0.99)]
#: side-by-side problems (V, H, eos, gamma), trees from 10^4 to about 5 10^6 nodes
SIDE = [(2, 14, None, 1.0), (2, 20, None, 1.0), (4, 8, None, 1.0), (4, 10, 0, 0.9), (8, 6, None, 1.0),
        (8, 7, 0, 1.0), (16, 5, None, 0.95), (32, 4, 0, 1.0), (64, 3, None, 1.0)]
TINY_LONG = [(8, 64, None, 1.0), (8, 64, 0, 0.99)]
TINY_SIDE = [(2, 6, None, 1.0), (3, 4, 0, 0.9)]


def machine_info() -> dict:
    """nproc, CPU model, torch version and threads, date, load average."""
    return dict(nproc=len(os.sched_getaffinity(0)), cpu=cpu_model(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                loadavg_start=round(os.getloadavg()[0], 2))


def build(vocab: int, horizon: int, eos: int | None, gamma: float, seed: int = 0):
    """``(mdp, policy, setup_s)``: dense compact rewards and a seeded shared policy."""
    t = time.perf_counter()
    mdp = make_mdp("dense", vocab=vocab, horizon=horizon, eos=eos, gamma=gamma, seed=seed, compact=True,
                   max_nodes=10_000_000)
    policy = SharedSoftmax(vocab, horizon, 1, seed=seed + 1000)
    return mdp, policy, time.perf_counter() - t


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """Cold time, warm times and the last result of ``fn()``."""
    t = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return cold, times, out


def long_horizon(cases, repeats: int) -> list[dict]:
    rows = []
    for V, H, eos, gamma in cases:
        mdp, policy, setup = build(V, H, eos, gamma)
        cold, times, sol = timed(lambda: solve_markov(mdp, policy, with_grad=True), repeats)
        t = time.perf_counter()
        J_auto = markov_objective(mdp, policy)
        (g_auto,) = torch.autograd.grad(J_auto, policy.logits)
        autograd_s = time.perf_counter() - t
        err_J = abs(sol.J - float(J_auto.detach()))
        err_g = float((sol.grads[0] - g_auto).abs().max())
        median = statistics.median(times)
        is_target = (V, H) == (64, 1024)  # the target size; other sizes are smoke runs
        rows.append(dict(vocab=V, horizon=H, eos=eos, gamma=gamma, prompts=1, parameters=policy.logits.numel(),
                         setup_excluded_s=setup, solve_markov_s=median, solve_markov_cold_s=cold,
                         solve_markov_all_s=times, J=sol.J, grad_norm=float(sol.flat_grad().norm()),
                         expected_length=sol.expected_length, autograd_forward_s=autograd_s,
                         autograd_max_abs_err_J=err_J, autograd_max_abs_err_grad=err_g,
                         target_s=TARGET_S if is_target else None,
                         target_met=(median <= TARGET_S) if is_target else None,
                         agreement_ok=err_J <= AGREEMENT_TOL and err_g <= AGREEMENT_TOL))
        target = (f"; target <= {TARGET_S} s {'met' if median <= TARGET_S else 'NOT met'}" if is_target else "")
        print(f"long  V={V} H={H} eos={eos} gamma={gamma}: solve_markov {median:.4f} s (cold {cold:.3f} s{target}); "
              f"E[T]={sol.expected_length:.1f}; "
              f"autograd check |dJ|={err_J:.1e} |dgrad|={err_g:.1e} ({autograd_s:.2f} s)")
    return rows


def side_by_side(cases, repeats: int) -> list[dict]:
    rows = []
    for V, H, eos, gamma in cases:
        mdp, policy, setup = build(V, H, eos, gamma)
        t = time.perf_counter()
        mdp.tree  # noqa: B018 - build it (set-up)
        mdp.reward_matrix()  # materialise the compact rewards on the tree (set-up)
        tree_setup = time.perf_counter() - t
        tree_cold, _, tsol = timed(lambda: solve(mdp, policy, with_grad=True), 0)
        markov_cold, _, msol = timed(lambda: solve_markov(mdp, policy, with_grad=True), 0)
        tree_times, markov_times = [], []
        for _ in range(repeats):  # alternate, so both see the same machine conditions
            t = time.perf_counter()
            tsol = solve(mdp, policy, with_grad=True)
            tree_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            msol = solve_markov(mdp, policy, with_grad=True)
            markov_times.append(time.perf_counter() - t)
        err_J = abs(tsol.J - msol.J)
        err_g = float((tsol.grads[0] - msol.grads[0]).abs().max())
        tree_s, markov_s = statistics.median(tree_times), statistics.median(markov_times)
        nodes = sum(count_nodes(1, V, H, eos))
        rows.append(dict(vocab=V, horizon=H, eos=eos, gamma=gamma, prompts=1, nodes=nodes,
                         setup_excluded_s=setup, tree_setup_excluded_s=tree_setup,
                         tree_s=tree_s, markov_s=markov_s, tree_all_s=tree_times, markov_all_s=markov_times,
                         tree_cold_s=tree_cold, markov_cold_s=markov_cold, ratio=tree_s / markov_s,
                         max_abs_err_J=err_J, max_abs_err_grad=err_g,
                         ok=err_J <= AGREEMENT_TOL and err_g <= AGREEMENT_TOL))
        print(f"side  V={V:<2d} H={H:<2d} eos={str(eos):4s} gamma={gamma:<4g} nodes={nodes:>10,}: tree {tree_s:8.4f} s  "
              f"markov {markov_s:7.4f} s  ratio {tree_s / markov_s:9.1f}x  |dJ|={err_J:.1e} |dgrad|={err_g:.1e} "
              f"{'ok' if rows[-1]['ok'] else 'FAIL'}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="warm runs per timing (the median is reported)")
    ap.add_argument("--tiny", action="store_true", help="H = 64, V = 8 and two small trees (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "markov.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    long_cases, side_cases = (TINY_LONG, TINY_SIDE) if args.tiny else (LONG, SIDE)
    if args.tiny:
        args.repeats = min(args.repeats, 2)
    command = "python benchmarks/markov_bench.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load {info['loadavg_start']}")
    long_rows = long_horizon(long_cases, args.repeats)
    side_rows = side_by_side(side_cases, args.repeats)
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    agreement_ok = all(r["agreement_ok"] for r in long_rows) and all(r["ok"] for r in side_rows)
    result = dict(benchmark="markov", command=command, machine=info, tiny=args.tiny, repeats=args.repeats,
                  family="dense", policy="shared", rewards="compact", target_s=TARGET_S,
                  target_met=(all(r["target_met"] for r in long_rows) if not args.tiny else None),
                  long_horizon=long_rows,
                  side_by_side=side_rows, agreement_tol=AGREEMENT_TOL, agreement_ok=agreement_ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if agreement_ok else 1


if __name__ == "__main__":
    sys.exit(main())
