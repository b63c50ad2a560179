"""Exact J and grad J on a 1.4-million-node tree: ``tpg.exact.solve`` against a per-trajectory reference.

The problem: ``V = 4``, ``H = 10``, one prompt, no EOS (``1,398,101`` nodes, ``4^10 = 1,048,576``
complete responses), dense ``N(0, 1)`` token rewards, a tabular softmax policy with ``N(0, 1)``
logits. tpg's side is ``solve(mdp, policy, with_grad=True)`` (float64), timed as the median of
``--repeats`` warm runs after one cold run; the one-off setup (tree build, rewards, policy) is
timed separately and excluded.

The reference is :func:`tpg.reference.reference_exact`, which enumerates every response in pure
Python and sums ``rho P(W|x) RM(W) (e_w - pi)`` along it. Over a million responses it takes about a
minute, so by default it is timed on a random subset of ``--reference-trajectories`` responses
(100,000) and extrapolated linearly per trajectory::

    t_full ~= t_0 + L (t_N - t_0) / N

where ``t_0`` is a run summing no response (the reference's fixed cost: enumerating every
response and softmaxing every prefix) and ``t_N`` one summing ``N`` random responses, ``L`` the
number of responses. ``--full-reference`` runs it on every response instead. In both cases the
same run checks that ``solve`` agrees with the reference (J and every ``dJ/dlogit``) to 1e-10 on
small trees with and without EOS, gamma 1 and 0.9.

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/exact_bench.py                    # writes benchmarks/results/exact.json
    .venv/bin/python benchmarks/exact_bench.py --full-reference   # the reference on all 1,048,576 responses
    .venv/bin/python benchmarks/exact_bench.py --tiny             # V=3, H=4: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import tpg.reference as reference
from tpg.exact import solve
from tpg.mdp.families import make_mdp, tree_rewards
from tpg.mdp.mdp import TokenMDP
from tpg.mdp.tree import TokenTree
from tpg.policies import TabularSoftmax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported by path
from _common import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_S = 0.2
AGREEMENT_TOL = 1e-10
#: small trees on which solve is checked against the full reference (V, H, eos, prompts, gamma)
AGREEMENT_CASES = [(3, 4, None, 1, 1.0), (3, 4, 0, 2, 0.9), (4, 3, 2, 2, 1.0), (2, 6, None, 1, 0.9)]


def machine_info() -> dict:
    """nproc, CPU model, torch version and threads, date, load average."""
    cpu = cpu_model()
    return dict(nproc=len(os.sched_getaffinity(0)), cpu=cpu, torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                loadavg_start=round(os.getloadavg()[0], 2))


def build_problem(vocab: int, horizon: int, eos: int | None = None, prompts: int = 1, gamma: float = 1.0,
                  seed: int = 0):
    """``(mdp, policy, setup_times)``: dense rewards and a seeded tabular policy, each step timed."""
    times = {}
    t = time.perf_counter()
    tree = TokenTree.build(prompts, vocab, horizon, eos, max_nodes=10_000_000)
    times["tree_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rho = torch.full((prompts,), 1.0 / prompts, dtype=torch.float64)
    mdp = TokenMDP(vocab, horizon, rho, tree_rewards("dense", tree, seed), eos, gamma,
                   max_nodes=10_000_000, name=f"dense:V={vocab},H={horizon}", tree=tree)
    mdp.reward_matrix()
    times["rewards_s"] = time.perf_counter() - t
    t = time.perf_counter()
    policy = TabularSoftmax(tree, seed=seed + 1000)
    times["policy_s"] = time.perf_counter() - t
    return mdp, policy, times


def time_solve(mdp, policy, repeats: int) -> dict:
    """Cold first call (includes torch's one-off autograd start-up), then the median of warm calls."""
    t = time.perf_counter()
    solve(mdp, policy, with_grad=True)
    cold = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sol = solve(mdp, policy, with_grad=True)
        times.append(time.perf_counter() - t)
    return dict(solve_cold_s=cold, solve_s=statistics.median(times), solve_all_s=times, J=sol.J)


def reference_callables(mdp, policy):
    """``(reward_fn, logits_fn, nt_of)`` over plain Python lists, for :func:`tpg.reference.reference_exact`.

    Built once from the tree (not timed): ``nt_of[(prompt, prefix)]`` is the non-terminal index."""
    tree = mdp.tree
    P, V = tree.num_prompts, tree.vocab_size
    parent, token, prompt = tree.parent_n.tolist(), tree.token_n.tolist(), tree.prompt_n.tolist()
    prefix_of = {}
    nt_of = {}
    for k, node in enumerate(tree.nt_node_k.tolist()):
        pre = () if parent[node] < 0 else prefix_of[parent[node]] + (token[node],)
        prefix_of[node] = pre
        nt_of[(prompt[node], pre)] = k
    edge = mdp.edge_rewards().tolist()
    logits = policy.logits.detach().tolist()

    def reward_fn(p, prefix, w):
        return edge[P + nt_of[(p, prefix)] * V + w]

    def logits_fn(p, prefix):
        return logits[nt_of[(p, prefix)]]

    return reward_fn, logits_fn, nt_of


def run_reference(mdp, policy, callables=None):
    """``(J, grad)`` of :func:`tpg.reference.reference_exact` on ``mdp`` (every response)."""
    reward_fn, logits_fn, _ = callables or reference_callables(mdp, policy)
    return reference.reference_exact(mdp.vocab_size, mdp.horizon, mdp.eos_token, mdp.gamma,
                                     mdp.prompt_weights.tolist(), reward_fn, logits_fn)


@contextmanager
def responses_subset(n: int, seed: int):
    """Make the reference sum only ``n`` random responses (it still enumerates all of them)."""
    original = reference.enumerate_responses
    used = []

    def subset(vocab_size, horizon, eos_token):
        used.append(True)
        responses = list(original(vocab_size, horizon, eos_token))
        keep = sorted(random.Random(seed).sample(range(len(responses)), min(n, len(responses))))
        return iter([responses[i] for i in keep])

    reference.enumerate_responses = subset
    try:
        yield used
    finally:
        reference.enumerate_responses = original


def time_reference(mdp, policy, n_traj: int, full: bool, repeats: int, seed: int = 0) -> dict:
    """Wall time of the reference on every response (``full``) or extrapolated from ``n_traj``."""
    t = time.perf_counter()
    callables = reference_callables(mdp, policy)
    prep = time.perf_counter() - t
    num_responses = mdp.tree.num_leaves
    if full:
        t = time.perf_counter()
        J_ref, grad_ref = run_reference(mdp, policy, callables)
        elapsed = time.perf_counter() - t
        sol = solve(mdp, policy, with_grad=True)
        nt_of = callables[2]
        err_g = max(max(abs(float(a) - b) for a, b in zip(sol.grad_logits[nt_of[key]].tolist(), row))
                    for key, row in grad_ref.items())
        return dict(reference_s=elapsed, reference_extrapolated=False, reference_trajectories=num_responses,
                    reference_input_prep_s=prep, full_tree_max_abs_err_J=abs(sol.J - J_ref),
                    full_tree_max_abs_err_grad=err_g)
    n_traj = min(n_traj, num_responses)
    fixed, with_n = [], []
    for rep in range(repeats):
        for n, out in ((0, fixed), (n_traj, with_n)):
            with responses_subset(n, seed + rep) as used:
                t = time.perf_counter()
                run_reference(mdp, policy, callables)
                out.append(time.perf_counter() - t)
            if not used:
                raise RuntimeError("tpg.reference.reference_exact no longer calls enumerate_responses; "
                                   "time it with --full-reference")
    t0, tn = statistics.median(fixed), statistics.median(with_n)
    per_traj = max(tn - t0, 0.0) / n_traj
    return dict(reference_s=t0 + num_responses * per_traj, reference_extrapolated=True,
                reference_trajectories=n_traj, reference_fixed_s=t0, reference_subset_s=tn,
                reference_per_trajectory_s=per_traj, reference_input_prep_s=prep)


def check_agreement(cases=AGREEMENT_CASES) -> list[dict]:
    """Max |J - J_ref| and max |dJ/dlogit - reference| of ``solve`` on small trees."""
    rows = []
    for V, H, eos, P, gamma in cases:
        mdp = make_mdp("dense", vocab=V, horizon=H, eos=eos, prompts=P, weights="random", gamma=gamma, seed=3)
        policy = TabularSoftmax(mdp.tree, seed=4)
        callables = reference_callables(mdp, policy)
        J_ref, grad_ref = run_reference(mdp, policy, callables)
        sol = solve(mdp, policy, with_grad=True)
        grad = torch.zeros_like(sol.grad_logits)
        for key, row in grad_ref.items():
            grad[callables[2][key]] = torch.tensor(row, dtype=torch.float64)
        err_J = abs(sol.J - J_ref)
        err_g = float((sol.grads[0] - grad).abs().max())
        rows.append(dict(vocab=V, horizon=H, eos=eos, prompts=P, gamma=gamma, nodes=mdp.tree.num_nodes,
                         max_abs_err_J=err_J, max_abs_err_grad=err_g,
                         ok=err_J <= AGREEMENT_TOL and err_g <= AGREEMENT_TOL))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=9, help="warm solve() runs (the median is reported)")
    ap.add_argument("--reference-trajectories", type=int, default=100_000,
                    help="responses the reference sums when extrapolating (default 100000)")
    ap.add_argument("--reference-repeats", type=int, default=3, help="reference timings (median)")
    ap.add_argument("--full-reference", action="store_true", help="run the reference on every response")
    ap.add_argument("--tiny", action="store_true", help="V=3, H=4 and few repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "exact.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.vocab, args.horizon, args.repeats, args.reference_repeats = 3, 4, 2, 1
        args.reference_trajectories = min(args.reference_trajectories, 20)
    command = "python benchmarks/exact_bench.py" + ("".join(f" {a}" for a in argv) if argv is not None
                                                   else "".join(f" {a}" for a in sys.argv[1:]))
    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load {info['loadavg_start']}")

    agreement = check_agreement()
    for row in agreement:
        print(f"agreement V={row['vocab']} H={row['horizon']} eos={row['eos']} P={row['prompts']} "
              f"gamma={row['gamma']}: |dJ|={row['max_abs_err_J']:.1e} |dgrad|={row['max_abs_err_grad']:.1e} "
              f"{'ok' if row['ok'] else 'FAIL'}")

    mdp, policy, setup = build_problem(args.vocab, args.horizon)
    tree = mdp.tree
    print(f"problem: V={args.vocab} H={args.horizon} nodes={tree.num_nodes:,} responses={tree.num_leaves:,}; "
          f"setup (excluded): tree {setup['tree_build_s']:.3f} s, rewards {setup['rewards_s']:.3f} s, "
          f"policy {setup['policy_s']:.3f} s")
    tpg_times = time_solve(mdp, policy, args.repeats)
    ref = time_reference(mdp, policy, args.reference_trajectories, args.full_reference, args.reference_repeats)
    tpg_times_after = time_solve(mdp, policy, args.repeats)  # bracket the reference: same conditions
    solve_s = statistics.median(tpg_times["solve_all_s"] + tpg_times_after["solve_all_s"])
    ratio = ref["reference_s"] / solve_s
    how = (f"extrapolated from {ref['reference_trajectories']:,} random responses "
           f"(fixed {ref['reference_fixed_s']:.2f} s + {ref['reference_per_trajectory_s'] * 1e6:.1f} us/response)"
           if ref["reference_extrapolated"] else f"measured on all {ref['reference_trajectories']:,} responses")
    print()
    print(f"{'':34s} {'seconds':>10s}")
    print(f"{'tpg solve (J + grad), median':34s} {solve_s:10.4f}   "
          f"(first call on this tree {tpg_times['solve_cold_s']:.3f} s)")
    print(f"{'reference_exact (pure Python)':34s} {ref['reference_s']:10.2f}   {how}")
    print(f"{'ratio reference / tpg':34s} {ratio:10,.1f}x")
    if not ref["reference_extrapolated"]:
        print(f"agreement on this tree: |dJ| = {ref['full_tree_max_abs_err_J']:.1e}, "
              f"max |dgrad| = {ref['full_tree_max_abs_err_grad']:.1e}")
    print(f"target: solve <= {TARGET_S} s on 2 cores: {'met' if solve_s <= TARGET_S else 'NOT met'}")
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    result = dict(
        benchmark="exact", command=command, machine=info,
        problem=dict(vocab=args.vocab, horizon=args.horizon, eos=None, prompts=1, gamma=1.0, family="dense",
                     policy="tabular", nodes=tree.num_nodes, nonterminal=tree.num_nonterminal,
                     responses=tree.num_leaves),
        setup_excluded=setup, solve_s=solve_s, solve_cold_s=tpg_times["solve_cold_s"],
        solve_all_s=tpg_times["solve_all_s"] + tpg_times_after["solve_all_s"], J=tpg_times["J"],
        **ref, ratio=ratio, target_s=TARGET_S, target_met=solve_s <= TARGET_S,
        agreement=agreement,
        agreement_ok=all(r["ok"] for r in agreement)
        and ref.get("full_tree_max_abs_err_J", 0.0) <= AGREEMENT_TOL
        and ref.get("full_tree_max_abs_err_grad", 0.0) <= AGREEMENT_TOL)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["agreement_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
