"""Exact J + grad J of a tiny transformer: prefix sharing against naive full-sequence batching.

Prefix sharing (``tpg.exact.solve``, which calls ``TinyTransformerPolicy.node_logits``) runs one
new token per non-terminal tree node against its parent's key/value cache. The naive baseline
(``tpg.exact.transformer.grad_full_sequences``) runs every complete response as its own padded
full sequence. A third column, per-prefix full forwards without a cache
(``node_logits_naive(by="prefix")``), sits in between. All three give the same J and gradient
(checked here, max abs difference reported).

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/prefix_bench.py            # default sizes, 3 repeats
    .venv/bin/python benchmarks/prefix_bench.py --quick    # smaller, 1 repeat

Writes ``benchmarks/results/prefix.json`` and ``benchmarks/results/prefix.md`` (merged by hand into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tpg.exact import grad_by_enumeration, path_log_probs, path_returns, solve
from tpg.exact.transformer import grad_full_sequences, node_logits_naive, work_counts
from tpg.mdp import make_mdp
from tpg.policies.transformer import TinyTransformerPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported by path
from _common import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = [
    dict(vocab=8, horizon=4, eos=None, prompts=2, d_model=64),
    dict(vocab=8, horizon=4, eos=0, prompts=2, d_model=64),
    dict(vocab=4, horizon=6, eos=None, prompts=2, d_model=64),
    dict(vocab=4, horizon=6, eos=0, prompts=2, d_model=64),
]
QUICK = [dict(vocab=4, horizon=4, eos=None, prompts=2, d_model=32),
         dict(vocab=4, horizon=4, eos=0, prompts=2, d_model=32)]
PROMPT_LEN = 2


def _median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocator, first-call dispatch), not timed
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _grad_per_prefix(mdp, policy):
    params = list(policy.parameters())
    tree = mdp.tree
    rm = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
    rho = mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
    with torch.enable_grad():
        logp = torch.log_softmax(node_logits_naive(policy, tree, by="prefix"), dim=-1)
        J = (rho * path_log_probs(tree, logp).exp() * rm).sum()
        grads = torch.autograd.grad(J, params)
    return float(J.detach()), grads


def bench_case(vocab: int, horizon: int, eos: int | None, prompts: int, d_model: int, n_layer: int = 2,
               n_head: int = 2, repeats: int = 3, seed: int = 0) -> dict:
    """Time J + grad J three ways on a dense random-reward MDP; returns one result row."""
    mdp = make_mdp("dense", vocab=vocab, horizon=horizon, eos=eos, prompts=prompts, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompt_tokens = torch.randint(0, vocab, (prompts, PROMPT_LEN), generator=gen)
    policy = TinyTransformerPolicy(vocab, prompt_tokens, horizon, n_layer=n_layer, d_model=d_model, n_head=n_head,
                                   seed=seed + 1)
    mdp.tree.leaf_paths()  # built once, outside the timings
    t_prefix, sol = _median_time(lambda: solve(mdp, policy), repeats)
    t_enum, (J_enum, g_enum) = _median_time(lambda: grad_by_enumeration(mdp, policy), repeats)
    t_naive, (J_naive, g_naive) = _median_time(lambda: grad_full_sequences(mdp, policy), repeats)
    t_pp, (J_pp, g_pp) = _median_time(lambda: _grad_per_prefix(mdp, policy), repeats)
    grad_diff = max(float((a - b).abs().max()) for gs in (g_naive, g_pp, g_enum) for a, b in zip(sol.grads, gs))
    wc = work_counts(mdp.tree, PROMPT_LEN)
    return dict(vocab=vocab, horizon=horizon, eos=eos, prompts=prompts, prompt_len=PROMPT_LEN, n_layer=n_layer,
                d_model=d_model, n_head=n_head, params=sum(p.numel() for p in policy.parameters()),
                num_nodes=mdp.tree.num_nodes, **wc, prefix_s=t_prefix, prefix_one_pass_s=t_enum, naive_s=t_naive,
                per_prefix_s=t_pp, ratio=t_naive / t_prefix, one_pass_ratio=t_naive / t_enum,
                per_prefix_ratio=t_pp / t_prefix,
                max_J_diff=max(abs(sol.J - J_naive), abs(sol.J - J_pp), abs(sol.J - J_enum)),
                max_grad_diff=grad_diff, repeats=repeats)


def _machine() -> str:
    cpu = cpu_model()
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}")


def write_outputs(rows: list[dict], json_path: Path, md_path: Path, command: str, load: str = "") -> None:
    machine = _machine()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(dict(machine=machine, command=command, load=load, rows=rows), indent=2) + "\n")
    lines = [
        "## Exact enumeration of the transformer: prefix sharing vs naive full sequences",
        "",
        f"Machine: {machine}. Command: `{command}`. Times are the median of {rows[0]['repeats']} runs of exact "
        "J + grad J in float64 (2 layers, 2 heads, prompts of 2 tokens, dense random rewards)."
        + (f" Load average during the run: {load}." if load else ""),
        "",
        "- **prefix**: `tpg.exact.solve` with `TinyTransformerPolicy.node_logits`, the tree expanded level by level "
        "with a key/value cache (one new token per non-terminal node);",
        "- **prefix, one pass**: `tpg.exact.grad_by_enumeration` on the same prefix-shared node logits (one "
        "forward with autograd, no dynamic programme);",
        "- **naive**: `grad_full_sequences`, every complete response one padded full sequence (autograd through J);",
        "- **per-prefix**: one cache-less full forward per non-terminal node's prefix.",
        "",
        "| V | H | EOS | d_model | responses | mean length | positions prefix / naive | prefix s | prefix one pass s "
        "| naive s | naive / prefix | naive / one pass | per-prefix s | max grad diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']} | {r['horizon']} | {r['eos'] if r['eos'] is not None else 'none'} | {r['d_model']} "
            f"| {r['num_responses']:,} | {r['mean_response_length']:.2f} "
            f"| {r['shared_positions']:,} / {r['naive_positions']:,} | {r['prefix_s']:.3f} "
            f"| {r['prefix_one_pass_s']:.3f} | {r['naive_s']:.3f} | **{r['ratio']:.1f}x** | {r['one_pass_ratio']:.1f}x "
            f"| {r['per_prefix_s']:.3f} | {r['max_grad_diff']:.1e} |")
    lines += [
        "",
        "The naive cost grows with responses x length, the shared one with the number of tree nodes; since a "
        "level has V times fewer non-terminal nodes than children, the ratio exceeds the mean response length "
        "(the positions column shows the work ratio). `solve` evaluates the node logits twice (once without "
        "gradient for the dynamic programme, once for the chain rule), which the prefix column includes; the "
        "one-pass column shows what a single forward costs. Wall times on a machine shared with other jobs vary "
        "between runs (see the load average above); the positions column is exact.",
        "",
    ]
    md_path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, for stable timings)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "prefix.json")
    ap.add_argument("--md", type=Path, default=HERE / "results" / "prefix.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, repeats = (QUICK, 1) if args.quick else (SIZES, args.repeats)
    load0 = os.getloadavg()[0]
    rows = []
    for size in sizes:
        row = bench_case(**size, repeats=repeats)
        rows.append(row)
        print(f"V={row['vocab']} H={row['horizon']} eos={row['eos']} d={row['d_model']}: prefix {row['prefix_s']:.3f}s "
              f"naive {row['naive_s']:.3f}s ratio {row['ratio']:.1f}x (mean length {row['mean_response_length']:.2f}, "
              f"positions ratio {row['position_ratio']:.1f}), per-prefix {row['per_prefix_s']:.3f}s, "
              f"grad diff {row['max_grad_diff']:.1e}", flush=True)
    command = "python benchmarks/prefix_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (1-minute averages)"
    write_outputs(rows, args.json, args.md, command.strip(), load)
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
