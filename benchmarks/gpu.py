"""The GPU benchmark: exact J + grad J and restricted sampling on GPT-2 124M and 1.5B.

For each model (random init from its config, bfloat16, on the GPU):

* **exact**, for ``K = 8, H = 4`` and ``K = 16, H = 3`` with one 16-token prompt and random
  (position, token) rewards: ``J`` and ``grad J`` over all parameters with prefix sharing
  (``tpg.exact.hf.solve_lm``: the packed tree forward, and the level-by-level key/value cache)
  against naive full-sequence enumeration (``tpg.exact.hf.enumerate_lm``: every complete response
  one forward, through the model's full-vocabulary head as a plain ``model(input_ids)`` call; also
  through the restricted head), in the same run, with the model FLOP utilisation of each (useful
  FLOPs: ``2 x block params`` per token plus the head columns and causal attention, times 3 for
  forward + backward, over the card's dense bf16 peak);
* **sampling**, batch 256, 64 new tokens after a 16-token prompt: the restricted policy's sampler
  (``HFRestrictedPolicy.sample``: static key/value cache, CUDA-graph decode step, ``K = 16``)
  against Hugging Face ``generate`` (``do_sample=True``, full vocabulary, 64 tokens forced), tokens/s.

Targets: prefix sharing >= 10x faster than naive enumeration, restricted sampling >= 10x more
tokens/s than ``generate``. Writes a JSON file and prints a table. ``--tiny`` runs the same code
on a 2-layer GPT-2 on the CPU in a few seconds (the smoke test; its timings mean nothing).

    python benchmarks/gpu.py --out OUT/gpu.json          # one H200: about 1-2 minutes
    python benchmarks/gpu.py --tiny --out /tmp/gpu.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

#: dense bf16 peak FLOP/s by card name (substring, case-insensitive); first match wins
PEAK_BF16 = (("h200", 989.4e12), ("h100", 989.4e12), ("gh200", 989.4e12), ("a100", 312e12), ("l40s", 362e12),
             ("a10g", 125e12), ("l4", 121e12), ("4090", 165e12), ("b200", 2250e12))
MODELS = {"124m": "gpt2-124m", "1.5b": "gpt2-1.5b"}
TINY_MODEL = "gpt2-tiny:n_layer=2,n_embd=64,n_head=2,vocab_size=512,n_positions=128"
TARGET = 10.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int):
    """Median wall time of ``repeats`` calls after one warm-up call; returns ``(seconds, last output)``."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_flops(device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key, val in PEAK_BF16:
        if key in name:
            return val, key
    return None, name


def model_shape(lm) -> dict:
    """Block parameters (those that cost ``2`` FLOPs per token each), width, depth, vocabulary."""
    from tpg.policies.hf import decoder_blocks
    blocks = decoder_blocks(lm)
    cfg = lm.config
    return {"block_params": sum(p.numel() for p in blocks.parameters()),
            "params": sum(p.numel() for p in lm.parameters()),
            "d": int(getattr(cfg, "n_embd", getattr(cfg, "hidden_size", 0))), "layers": len(blocks),
            "vocab": int(cfg.vocab_size)}


def forward_flops(shape: dict, tokens: float, ctx: float, head_cols: int) -> float:
    """Useful forward FLOPs of ``tokens`` positions attending to ``ctx`` positions on average."""
    per_token = 2 * shape["block_params"] + 2 * shape["d"] * head_cols + 4 * shape["layers"] * shape["d"] * ctx
    return per_token * tokens


def _problem(lm, K: int, H: int, prompt_len: int, seed: int, tree_mode: str):
    from tpg.exact.hf import make_lm_problem
    gen = torch.Generator().manual_seed(seed)
    V = int(lm.config.vocab_size)
    allowed = torch.randperm(V, generator=gen)[:K].tolist()
    prompt = torch.randint(V, (prompt_len,), generator=gen).tolist()
    param = next(lm.parameters())
    return make_lm_problem(lm, allowed, [prompt], H, reward="table", reward_seed=seed, tree_mode=tree_mode,
                           dtype=param.dtype, device=param.device)


def bench_exact(lm, device, K: int, H: int, prompt_len: int, repeats: int, naive_tokens: int, peak, shape,
                skip_naive: bool = False) -> dict:
    from tpg.exact.hf import enumerate_lm, solve_lm, work_counts
    mdp, pol = _problem(lm, K, H, prompt_len, seed=K * 100 + H, tree_mode="packed")
    tree = mdp.tree
    work = work_counts(mdp, pol)
    row = {"K": K, "H": H, "prompt_len": prompt_len, **work}

    def flat(grads):
        return torch.cat([g.reshape(-1).to(device="cpu", dtype=torch.float64) for g in grads])

    t_packed, sol = _timed(lambda: solve_lm(mdp, pol), device, repeats)
    pol.tree_mode = "levels"
    t_levels, sol_l = _timed(lambda: solve_lm(mdp, pol), device, repeats)
    pol.tree_mode = "packed"
    g_ref = flat(sol.grads)
    # useful FLOPs: each shared position attends to the prompt and its ancestors (about prompt + depth)
    mean_depth = float(tree.depth_n[tree.nt_node_k].double().mean())
    shared = 3 * forward_flops(shape, work["shared_tokens"], prompt_len + mean_depth, K)
    row.update({"J": sol.J, "prefix_packed_s": t_packed, "prefix_levels_s": t_levels,
                "prefix_flops": shared, "levels_vs_packed_grad_rel": float((flat(sol_l.grads) - g_ref).norm()
                                                                          / g_ref.norm().clamp_min(1e-30))})
    best = min(t_packed, t_levels)
    row["prefix_s"] = best
    row["prefix_mfu"] = shared / best / peak if peak else None
    if skip_naive:
        return row
    seq = prompt_len + H
    for name, full in (("naive_full_head", True), ("naive_restricted", False)):
        t, (J, grads) = _timed(lambda: enumerate_lm(mdp, pol, max_tokens=naive_tokens, full_head=full), device,
                               max(1, repeats - 1))
        fl = 3 * forward_flops(shape, work["naive_tokens"], (seq + 1) / 2, shape["vocab"] if full else K)
        g = flat(grads)
        row.update({f"{name}_s": t, f"{name}_flops": fl, f"{name}_mfu": fl / t / peak if peak else None,
                    f"{name}_J_abs_diff": abs(J - sol.J),
                    f"{name}_grad_cos": float((g @ g_ref) / (g.norm() * g_ref.norm()).clamp_min(1e-30)),
                    f"speedup_vs_{name}": t / best})
    row["speedup_vs_naive"] = row["speedup_vs_naive_full_head"]
    row["meets_target"] = row["speedup_vs_naive"] >= TARGET
    return row


def bench_sampling(lm, device, batch: int, new_tokens: int, prompt_len: int, K: int, repeats: int, peak, shape,
                   skip_generate: bool = False) -> dict:
    from tpg.policies.hf import HFRestrictedPolicy
    gen = torch.Generator().manual_seed(7)
    V = int(lm.config.vocab_size)
    allowed = torch.randperm(V, generator=gen)[:K].tolist()
    prompt = torch.randint(V, (prompt_len,), generator=gen).tolist()
    pol = HFRestrictedPolicy(lm, allowed, [prompt], new_tokens, device=device, dtype=next(lm.parameters()).dtype)
    prompt_b = torch.zeros(batch, dtype=torch.long)
    counter = iter(range(10 ** 6))
    t_r, (tok, lp, ln) = _timed(lambda: pol.sample(prompt_b, seed=next(counter)), device, repeats)
    n_tok = batch * new_tokens
    ctx = prompt_len + new_tokens / 2
    row = {"batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len, "K": K,
           "restricted_s": t_r, "restricted_tokens_per_s": n_tok / t_r,
           "restricted_mfu": forward_flops(shape, n_tok, ctx, K) / t_r / peak if peak else None,
           "cuda_graph": bool(pol.last_sample_info.get("cuda_graph")),
           "cuda_graph_note": pol.last_sample_info.get("reason"),
           "restricted_mean_logp": float(lp.mean())}
    # the same sampler with the CUDA graph off, to show what the graph buys
    t_e, _ = _timed(lambda: pol.sample(prompt_b, seed=next(counter), cuda_graph=False), device, max(1, repeats - 1))
    row.update({"restricted_eager_s": t_e, "restricted_eager_tokens_per_s": n_tok / t_e})
    if skip_generate:
        return row
    ids = torch.tensor([prompt] * batch, device=device)
    attn = torch.ones_like(ids)
    pad = lm.config.eos_token_id if lm.config.eos_token_id is not None else 0
    lm.config._attn_implementation = "sdpa" if device.type == "cuda" else lm.config._attn_implementation

    def generate():
        with torch.no_grad():
            return lm.generate(ids, attention_mask=attn, do_sample=True, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, top_k=0, top_p=1.0, pad_token_id=pad)

    t_g, out = _timed(generate, device, repeats)
    assert out.shape[1] == prompt_len + new_tokens
    row.update({"generate_s": t_g, "generate_tokens_per_s": n_tok / t_g,
                "generate_mfu": forward_flops(shape, n_tok, ctx, shape["vocab"]) / t_g / peak if peak else None,
                "speedup_vs_generate": t_g / t_r})
    row["meets_target"] = row["speedup_vs_generate"] >= TARGET
    return row


def env_info(device) -> dict:
    import transformers
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "cuda": torch.version.cuda, "hostname": platform.node()}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["card_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    else:
        info["card"] = platform.processor() or "cpu"
        info["threads"] = torch.get_num_threads()
    return info


def _fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def format_table(result: dict) -> str:
    lines = [f"card: {result['env'].get('card')}  torch {result['env']['torch']}  transformers "
             f"{result['env']['transformers']}  {result['env']['date']}", "",
             "exact J + grad J (all parameters)",
             "| model | K | H | responses | tokens shared / naive | prefix s (packed / levels) | naive s (full head / "
             "restricted) | speedup | MFU prefix / naive | grad cos |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["exact"]:
        lines.append(f"| {r['model']} | {r['K']} | {r['H']} | {r['responses']:,} | {r['shared_tokens']:,} / "
                     f"{r['naive_tokens']:,} | {_fmt(r['prefix_packed_s'], '.4f')} / "
                     f"{_fmt(r['prefix_levels_s'], '.4f')} | "
                     f"{_fmt(r.get('naive_full_head_s'), '.4f')} / {_fmt(r.get('naive_restricted_s'), '.4f')} | "
                     f"**{_fmt(r.get('speedup_vs_naive'), '.1f')}x** | {_fmt(r.get('prefix_mfu'), '.2%')} / "
                     f"{_fmt(r.get('naive_full_head_mfu'), '.2%')} | "
                     f"{_fmt(r.get('naive_full_head_grad_cos'), '.5f')} |")
    lines += ["", f"sampling (batch, new tokens; restricted K)",
              "| model | batch | new | restricted tok/s (graph / eager) | generate tok/s | speedup | CUDA graph |",
              "|---|---|---|---|---|---|---|"]
    for r in result["sampling"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | "
                     f"{_fmt(r['restricted_tokens_per_s'], ',.0f')} / "
                     f"{_fmt(r['restricted_eager_tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r.get('generate_tokens_per_s'), ',.0f')} | "
                     f"**{_fmt(r.get('speedup_vs_generate'), '.1f')}x** | "
                     f"{'yes' if r['cuda_graph'] else 'no (' + str(r['cuda_graph_note']) + ')'} |")
    lines.append("")
    lines.append(f"targets (>= {TARGET:g}x): " + ", ".join(
        f"{k}={'met' if v else 'NOT met'}" for k, v in result["targets"].items()))
    lines.append(f"wall time {result['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/gpu.json", help="JSON output (the table is printed)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 on the CPU (smoke test)")
    p.add_argument("--models", default="124m,1.5b", help="comma list of 124m, 1.5b")
    p.add_argument("--model", action="append", default=None, metavar="SPEC",
                   help="instead of --models: any model tpg.policies.hf.load_causal_lm takes (a shorthand with "
                        "overrides, config:PATH, a checkpoint directory); repeatable")
    p.add_argument("--problems", default="8x4,16x3", help="comma list of KxH")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sample-k", type=int, default=16, help="allowed tokens of the sampling benchmark")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-chunk-tokens", type=int, default=16384, help="positions per naive forward chunk")
    p.add_argument("--device", default=None, help="default cuda when available (cpu with --tiny)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 with --tiny")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for the MFU (default: by card name)")
    p.add_argument("--time-budget-s", type=float, default=270.0, help="skip what is left past this wall time")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tpg.policies.hf import load_causal_lm

    t_start = time.perf_counter()
    if args.tiny:
        torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
        device = torch.device(args.device or "cpu")
        dtype = args.dtype or "float32"
        models = {"tiny": TINY_MODEL}
        problems = [(4, 3), (3, 3)]
        args.prompt_len, args.batch, args.new_tokens, args.sample_k = 8, 8, 8, 4
        args.repeats = 1
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        models = ({m: m for m in args.model} if args.model
                  else {m: MODELS[m] for m in args.models.split(",") if m})
        problems = [tuple(int(x) for x in s.split("x")) for s in args.problems.split(",") if s]
    peak, peak_src = peak_flops(device, args.peak_tflops)
    result = {"command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "env": env_info(device), "dtype": dtype, "peak_flops": peak, "peak_source": peak_src,
              "exact": [], "sampling": [], "skipped": [], "errors": []}

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.time_budget_s

    for mname, spec in models.items():
        if over_budget():
            result["skipped"].append(f"{mname}: time budget")
            continue
        t0 = time.perf_counter()
        lm = load_causal_lm(spec, dtype=dtype, device=device, seed=0)
        lm.eval()
        shape = model_shape(lm)
        print(f"[{mname}] {shape['params'] / 1e6:.1f}M parameters, built in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        for K, H in problems:
            if over_budget():
                result["skipped"].append(f"{mname} exact K={K} H={H}: time budget")
                continue
            try:
                row = bench_exact(lm, device, K, H, args.prompt_len, args.repeats, args.naive_chunk_tokens, peak, shape)
                row.update({"model": mname, **{k: shape[k] for k in ("params", "block_params")}})
                result["exact"].append(row)
                print(f"[{mname}] exact K={K} H={H}: prefix {row['prefix_s']:.4f} s, naive "
                      f"{row.get('naive_full_head_s', float('nan')):.4f} s", file=sys.stderr, flush=True)
            except Exception as exc:  # record and go on: one failure must not lose the other figures
                result["errors"].append(f"{mname} exact K={K} H={H}: {type(exc).__name__}: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if over_budget():
            result["skipped"].append(f"{mname} sampling: time budget")
        else:
            try:
                row = bench_sampling(lm, device, args.batch, args.new_tokens, args.prompt_len, args.sample_k,
                                     args.repeats, peak, shape)
                row["model"] = mname
                result["sampling"].append(row)
                print(f"[{mname}] sampling: restricted {row['restricted_tokens_per_s']:,.0f} tok/s, generate "
                      f"{row.get('generate_tokens_per_s', float('nan')):,.0f} tok/s", file=sys.stderr, flush=True)
            except Exception as exc:
                result["errors"].append(f"{mname} sampling: {type(exc).__name__}: {exc}")
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["targets"] = {
        "exact_vs_naive": bool(result["exact"]) and all(r.get("meets_target") for r in result["exact"]),
        "sampling_vs_generate": bool(result["sampling"]) and all(r.get("meets_target") for r in result["sampling"])}
    result["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    if result["errors"]:
        print("errors:\n  " + "\n  ".join(result["errors"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
