"""Sampler throughput: ``tpg.rollouts.sample`` against a per-trajectory pure-Python sampler.

The problem: ``V = 8``, ``H = 16``, one prompt, no EOS, the shared-parameter softmax policy
(logits ``theta[t, prev]``) and compact dense rewards (``--mdp`` changes it). tpg's side is
``sample(mdp, policy, num_prompts=B, seed=rep)`` for each batch size ``B``, timed end to end
(rollouts with log-probabilities, token rewards and ``RM``); the reference is
:func:`reference_sampler.sample_reference` (one response at a time, :mod:`random` and
``bisect``) on ``--reference-responses`` responses. Tokens per second are sampled tokens over
wall time, the median of ``--repeats`` runs, tpg and the reference interleaved so that both see
the same machine load. The same run checks that both samplers agree in distribution: the mean
``RM`` and the mean ``log P(W|x)`` of tpg's batch and the reference's, as z-scores.

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/sampler_bench.py            # writes benchmarks/results/sampler.json
    .venv/bin/python benchmarks/sampler_bench.py --tiny     # V=3, H=4, B=1000: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exact_bench import machine_info  # noqa: E402
from reference_sampler import mean_and_se, sample_reference, shared_tables  # noqa: E402

from tpg.cases import mdp_from_spec  # noqa: E402
from tpg.rollouts import sample  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MDP = "dense:vocab=8,horizon=16,compact=true,policy=shared,seed=0"
TINY_MDP = "dense:vocab=3,horizon=4,compact=true,policy=shared,seed=0"
TARGET_TOKENS_PER_S = 20e6
MAX_Z = 5.0


def agreement(ro, ref) -> dict:
    """z-scores of the difference in mean RM and mean log P(W|x) between the two samplers' batches."""
    out = {}
    for name, a, b in (("rm", ro.rm.tolist(), [r[4] for r in ref]),
                       ("logp", ro.logp.sum(1).tolist(), [math.fsum(r[2]) for r in ref])):
        (ma, sa), (mb, sb) = mean_and_se(a), mean_and_se(b)
        out[f"{name}_tpg"], out[f"{name}_reference"] = ma, mb
        out[f"{name}_z"] = (ma - mb) / math.sqrt(sa ** 2 + sb ** 2) if sa + sb > 0 else 0.0
    out["ok"] = abs(out["rm_z"]) <= MAX_Z and abs(out["logp_z"]) <= MAX_Z
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mdp", default=DEFAULT_MDP, help="MDP spec (a shared policy with compact rewards)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[100_000, 200_000])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--reference-responses", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="V=3, H=4, B=1000 (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sampler.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.mdp, args.batch_sizes, args.repeats = TINY_MDP, [1000], 2
        args.reference_responses = min(args.reference_responses, 500)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/sampler_bench.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load {info['loadavg_start']}")
    mdp, policy = mdp_from_spec(args.mdp)
    tables = shared_tables(mdp, policy)
    sample(mdp, policy, num_prompts=min(args.batch_sizes), seed=12345)  # warm-up (allocator, kernels)

    tpg_rates = {B: [] for B in args.batch_sizes}
    ref_rates = []
    first = ref = None
    for rep in range(args.repeats):
        for B in args.batch_sizes:
            t = time.perf_counter()
            ro = sample(mdp, policy, num_prompts=B, seed=rep)
            tpg_rates[B].append(ro.num_tokens / (time.perf_counter() - t))
            first = first or ro
        if rep < max(1, args.repeats // 3):  # the reference is slow and steady: fewer repeats
            t = time.perf_counter()
            ref = sample_reference(tables, args.reference_responses, seed=rep)
            ref_rates.append(sum(len(r[1]) for r in ref) / (time.perf_counter() - t))
    ref_rate = statistics.median(ref_rates)
    check = agreement(first, ref)
    rows = []
    for B in args.batch_sizes:
        rate = statistics.median(tpg_rates[B])
        rows.append(dict(batch=B, tokens_per_s=rate, tokens_per_s_all=tpg_rates[B], ratio=rate / ref_rate,
                         target_met=rate >= TARGET_TOKENS_PER_S))
    print(f"problem: {mdp.describe()}, shared policy, compact rewards")
    print()
    print(f"{'sampler':34s} {'M tokens/s':>11s} {'ratio':>8s}")
    for row in rows:
        print(f"{'tpg sample, B = ' + format(row['batch'], ','):34s} {row['tokens_per_s'] / 1e6:11.2f} "
              f"{row['ratio']:7.0f}x")
    print(f"{'reference (pure Python), ' + format(args.reference_responses, ',') + ' resp.':34s} "
          f"{ref_rate / 1e6:11.3f} {1:7.0f}x")
    print(f"agreement: mean RM z = {check['rm_z']:+.2f}, mean log P(W|x) z = {check['logp_z']:+.2f} "
          f"({'ok' if check['ok'] else 'FAIL'})")
    met = all(r["target_met"] for r in rows)
    print(f"target: >= {TARGET_TOKENS_PER_S / 1e6:.0f} M tokens/s at every batch size: {'met' if met else 'NOT met'}")
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    result = dict(benchmark="sampler", command=command, machine=info, mdp=args.mdp, rows=rows,
                  reference_tokens_per_s=ref_rate, reference_tokens_per_s_all=ref_rates,
                  reference_responses=args.reference_responses, agreement=check,
                  target_tokens_per_s=TARGET_TOKENS_PER_S, target_met=met)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
