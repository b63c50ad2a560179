"""Verification on a real language model: ``tpg verify --lm PATH_OR_CONFIG --allowed-tokens ... --horizon H``.

The problem is an :class:`~tpg.policies.hf.HFRestrictedPolicy` and an
:class:`~tpg.mdp.lm_tasks.LMTaskMDP` over its allowed tokens (:func:`tpg.exact.hf.make_lm_problem`);
the verdicts come from :func:`tpg.verify.harness.verify`, unchanged, in one of two parameter spaces:

* ``full``: every trainable parameter of the LM. The harness maps node-logit gradients to
  parameters through the dense Jacobian ``J = d logits / d theta`` (``N_nt K x D``): exact mode
  for tiny models and trees.
* ``sketch``: a random projection of the full space. With ``R`` a ``D x k`` Gaussian matrix
  (``k`` a few hundred, regenerated from a seed on the model's device), the sketched policy
  :class:`SketchedPolicy` has logits ``l(z) = log pi_theta_0 + A z`` with ``A = J R / sqrt(k)``, ``J``
  the Jacobian of the node log-probabilities (``k`` forward-mode JVPs of the prefix-shared tree
  forward, vectorised with ``torch.func``), so its gradient at ``z = 0`` is ``S grad_theta`` with
  ``S = R^T / sqrt(k)``: every per-sample gradient
  ``g = sum_t c_t grad log pi_t`` is seen through its projections ``S g = sum_t c_t a[s_t, w_t]``
  (``a`` the centred rows of ``A``: one gather per token, no backward pass), and
  ``E[S g] = S grad J  <=>  E[g] = grad J`` with probability 1 over ``R`` (``S`` is injective on
  any fixed vector). The calibrated Monte Carlo test and the exact mode run unchanged on ``z``;
  ``|S x| = |x| (1 + O(1/sqrt(k)))`` keeps the reported scales and cosines close to the full-space ones.
  A Monte Carlo verdict there (``consistent``, ``consistent-scaled``, ``biased``) and its minimal
  detectable effects are those of the sketched gradient ``S g``: a ``consistent`` sketch says that a
  bias ``b`` with ``|S b| / |S grad J|`` above the record's ``mde_rel_bias`` would likely have been seen.

``param_space="auto"``: ``sketch`` in Monte Carlo mode; in exact mode ``full`` when the dense
Jacobian fits the harness's guard, else ``sketch``.

The command line: :func:`add_lm_args` (options) and :func:`problem_from_lm_args` (``(mdp, policy)``
for the harness). :func:`lm_sample` and :func:`lm_sample_continuations` return tpg rollouts from the
policy's batched device sampler.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..exact.hf import make_lm_problem
from ..policies.base import Policy
from ..policies.hf import forward_ad_attention
# the command line's part lives in the torch-free .lm_args (`tpg verify --help` needs no torch)
from .lm_args import DEFAULT_SKETCH_DIM, PARAM_SPACES, add_lm_args  # noqa: F401
from .score import MAX_JACOBIAN_ENTRIES

#: Tangent entries per vectorised JVP chunk (directions x trainable parameters).
JVP_CHUNK_ENTRIES = 50_000_000


# ------------------------------------------------------------------------------ the sketch
def _tangent(p: torch.Tensor, seed: int, j: int) -> torch.Tensor:
    """Direction ``j``'s block for parameter ``p``: ``N(0, 1)`` entries from a generator on ``p``'s device
    seeded by ``(seed, j)`` and the parameter's shape, so a direction never needs to be stored."""
    gen = torch.Generator(device=p.device).manual_seed((int(seed) * 1_000_003 + 7919 * j + 1) % (2 ** 63))
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype)


def sketch_logit_jacobian(policy, tree, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0,
                          chunk: int | None = None) -> torch.Tensor:
    """``A = J_logp R / sqrt(k)`` of the policy's node log-probabilities, ``[N_nt, V, k]`` float64 (CPU).

    ``R`` has ``N(0, 1)`` entries over every trainable parameter (direction ``j`` regenerated from
    ``(seed, j)``, see :func:`_tangent`). Each column is a forward-mode JVP of
    ``policy(tree) = log_softmax(node_logits(tree))`` (its rows are centred: ``sum_w pi(w|s) A[s, w] = 0``);
    ``chunk`` directions at a time are vectorised with ``torch.func.vmap`` (one direction at a time if
    the model does not vmap)."""
    from torch.func import functional_call, jvp, vmap

    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"sketch dimension must be an integer >= 1, got {dim!r}")
    params = {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the policy has no trainable parameters to sketch")
    D = sum(p.numel() for p in params.values())
    if chunk is None:
        chunk = max(1, min(dim, JVP_CHUNK_ENTRIES // D))

    def f(pdict):
        return functional_call(policy, pdict, (tree,))

    cols = []
    use_vmap = True
    with forward_ad_attention(policy), warnings.catch_warnings():
        # torch loads its forward-AD decompositions through torch.jit.script on first use
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        for lo in range(0, dim, chunk):
            hi = min(dim, lo + chunk)
            tangents = {n: torch.stack([_tangent(p, seed, j) for j in range(lo, hi)]) for n, p in params.items()}
            out = None
            if use_vmap and hi - lo > 1:
                try:
                    out = vmap(lambda t: jvp(f, (params,), (t,))[1])(tangents)
                except (RuntimeError, NotImplementedError, ValueError):
                    use_vmap = False
            if out is None:
                out = torch.stack([jvp(f, (params,), ({n: t[i] for n, t in tangents.items()},))[1]
                                   for i in range(hi - lo)])
            cols.append(out.detach().to(device="cpu", dtype=torch.float64))
    A = torch.cat(cols, 0) / dim ** 0.5  # [k, N_nt, V]
    return A.permute(1, 2, 0).contiguous()


class SketchedPolicy(Policy):
    """The policy seen along ``k`` random parameter directions: logits ``l(z) = log pi_0 + A z`` with
    ``A = J R / sqrt(k)`` (:func:`sketch_logit_jacobian`) and one parameter ``z [k]``, 0 at the start.

    At ``z = 0`` it is the wrapped policy (the same ``pi``, so the same sampling distribution and
    the same ``J``), and its gradient is the sketch ``S grad_theta J`` of the full gradient (see the
    module docstring). It samples from a table (the tree is stored), as a tabular policy does.

    Attributes: ``source`` (a description of the wrapped policy), ``dim``, ``seed``."""

    needs_tree = True

    def __init__(self, policy, tree, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, chunk: int | None = None):
        super().__init__(tree.vocab_size)
        with torch.no_grad():
            base = torch.log_softmax(policy.node_logits(tree).detach().to(device="cpu", dtype=torch.float64), -1)
        A = sketch_logit_jacobian(policy, tree, dim, seed, chunk)
        self.register_buffer("base", base)
        self.register_buffer("A", A)
        self.z = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.dim, self.seed = int(dim), int(seed)
        self.num_nonterminal = tree.num_nonterminal
        self.source = policy.describe() if hasattr(policy, "describe") else type(policy).__name__

    def node_logits(self, tree) -> torch.Tensor:
        if tree.num_nonterminal != self.num_nonterminal or tree.vocab_size != self.vocab_size:
            raise ValueError(f"sketched policy has {self.num_nonterminal} rows of {self.vocab_size} logits, the tree "
                             f"has {tree.num_nonterminal} non-terminal nodes with vocab {tree.vocab_size}")
        return self.base + (self.A.view(-1, self.dim) @ self.z).view_as(self.base)

    def log_prob_rows(self):
        with torch.no_grad():
            return torch.log_softmax(self.base + (self.A.view(-1, self.dim) @ self.z).view_as(self.base), dim=-1)

    def row_index(self, position, prev_b, nt_b):
        return nt_b

    def describe(self) -> str:
        return f"sketch k={self.dim} (seed {self.seed}) of {self.source}"


def resolve_param_space(param_space: str, mode: str, mdp, policy) -> str:
    """``full`` or ``sketch`` (``auto``: sketch in Monte Carlo mode, and in exact mode when the dense
    logit Jacobian would pass the harness's guard :data:`tpg.verify.score.MAX_JACOBIAN_ENTRIES`)."""
    if param_space not in PARAM_SPACES:
        raise ValueError(f"param_space must be one of {', '.join(PARAM_SPACES)}; got {param_space!r}")
    if param_space != "auto":
        return param_space
    if mode == "mc":
        return "sketch"
    logit_dim = mdp.tree.num_nonterminal * mdp.vocab_size
    num_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return "full" if logit_dim * num_params <= MAX_JACOBIAN_ENTRIES else "sketch"


def lm_verification_problem(mdp, policy, mode: str = "exact", param_space: str = "auto",
                            sketch_dim: int = DEFAULT_SKETCH_DIM, sketch_seed: int = 0):
    """``(mdp, policy to verify)``: the LM policy itself (``full``) or its :class:`SketchedPolicy`."""
    space = resolve_param_space(param_space, mode, mdp, policy)
    if space == "sketch":
        return mdp, SketchedPolicy(policy, mdp.tree, sketch_dim, sketch_seed)
    return mdp, policy


def verify_lm(mdp, policy, estimators, mode: str = "exact", param_space: str = "auto",
              sketch_dim: int = DEFAULT_SKETCH_DIM, sketch_seed: int = 0, **verify_kwargs) -> list[dict]:
    """:func:`tpg.verify.harness.verify` on an LM problem in the chosen parameter space; each record
    gets ``param_space`` (and ``sketch_dim``)."""
    from .harness import verify

    space = resolve_param_space(param_space, mode, mdp, policy)
    mdp, target = lm_verification_problem(mdp, policy, mode, space, sketch_dim, sketch_seed)
    records = verify(mdp, target, estimators, mode=mode, **verify_kwargs)
    for r in records:
        r["param_space"] = space
        if space == "sketch":
            r["sketch_dim"] = int(sketch_dim)
    return records


# ------------------------------------------------------------------------------ fast sampling as rollouts
def _as_rollouts(mdp, prompt_b, group_b, tokens_bt, logp_bt, length_b, prefix_len_b):
    from ..rollouts import Rollouts
    from .context import node_paths

    H = mdp.horizon
    mask = torch.arange(H) < length_b.unsqueeze(1)
    nodes = leaf = child = None
    if mdp._tree is not None or mdp.rewards.needs_tree:
        path = node_paths(mdp.tree, prompt_b, tokens_bt, mask)
        nodes = torch.where(mask, path[:, :H], torch.full_like(path[:, :H], -1))
        child = torch.where(mask, path[:, 1:], torch.full_like(path[:, 1:], -1))
        leaf = path[torch.arange(prompt_b.numel()), length_b]
    rewards = mdp.rewards.rollout_rewards(mdp, prompt_b, tokens_bt, mask, child)
    rm = rewards @ (mdp.gamma ** torch.arange(H, dtype=torch.float64))
    return Rollouts(prompt=prompt_b, group=group_b, tokens=tokens_bt, mask=mask, logp=logp_bt, token_rewards=rewards,
                    rm=rm, length=length_b, prefix_len=prefix_len_b.clamp(max=H), nodes=nodes, leaf=leaf,
                    gamma=mdp.gamma, vocab_size=mdp.vocab_size, horizon=H)


def lm_sample(mdp, policy, num_prompts: int = 1, group_size: int = 1, generator: torch.Generator | None = None,
              seed: int | None = None, prompts: torch.Tensor | None = None):
    """:func:`tpg.rollouts.sample` through the LM policy's batched device sampler
    (:meth:`~tpg.policies.hf.HFRestrictedPolicy.sample`: static key/value cache, CUDA graph): rows
    ``i * G .. i * G + G - 1`` are group ``i``. Same distribution, different random stream."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
    if prompts is None:
        prompts = torch.multinomial(mdp.prompt_weights, int(num_prompts), replacement=True, generator=gen)
    prompts = torch.as_tensor(prompts, dtype=torch.long).flatten()
    G = int(group_size)
    tokens, logp, length = policy.sample(prompts, horizon=mdp.horizon, generator=gen, num_samples=G)
    prompt_b = prompts.repeat_interleave(G)
    return _as_rollouts(mdp, prompt_b, torch.arange(prompts.numel()).repeat_interleave(G), tokens, logp, length,
                        torch.zeros_like(prompt_b))


def lm_sample_continuations(mdp, policy, prompt_b, prefix_bt, prefix_len_b, num_continuations: int,
                            generator: torch.Generator | None = None, seed: int | None = None):
    """:func:`tpg.rollouts.sample_continuations` through the LM policy's batched device sampler: each
    prefix is decoded once, then its ``K`` continuations branch from its cache; rows
    ``i * K .. i * K + K - 1`` continue prefix ``i`` (``group = i``)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
    prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
    prefix_len_b = torch.as_tensor(prefix_len_b, dtype=torch.long).flatten()
    K = int(num_continuations)
    tokens, logp, length = policy.sample(prompt_b, horizon=mdp.horizon, generator=gen, prefix_bt=prefix_bt,
                                         prefix_len_b=prefix_len_b, num_samples=K)
    return _as_rollouts(mdp, prompt_b.repeat_interleave(K), torch.arange(prompt_b.numel()).repeat_interleave(K),
                        tokens, logp, length, prefix_len_b.repeat_interleave(K))


# ------------------------------------------------------------------------------ command line
def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace("-", ",").replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what} must be integers separated by commas, got {text!r}") from None


def lm_problem_from_args(args):
    """``(LMTaskMDP, HFRestrictedPolicy)`` from the options of :func:`add_lm_args`."""
    if not getattr(args, "lm", None):
        raise ValueError("--lm is required for a real-LM problem")
    if not args.allowed_tokens:
        raise ValueError("--lm needs --allowed-tokens (e.g. 3,5,7)")
    allowed = [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in args.allowed_tokens.split(",")]
    prompts = []
    for text in getattr(args, "prompt", None) or []:
        prompts.append(text)
    for ids in getattr(args, "prompt_ids", None) or []:
        prompts.append(_ints(ids, "--prompt-ids"))
    if not prompts:
        prompts = [[1, 2, 3, 4]]
    weights = None
    if getattr(args, "prompt_weights", None):
        try:
            weights = [float(w) for w in args.prompt_weights.split(",")]
        except ValueError:
            raise ValueError(f"--prompt-weights must be numbers separated by commas, got {args.prompt_weights!r}") \
                from None
    eos = args.eos_token
    if eos is not None and str(eos).strip().lstrip("-").isdigit():
        eos = int(eos)
    target = _ints(args.reward_target, "--reward-target") if getattr(args, "reward_target", None) else None
    kw = {}
    if getattr(args, "max_nodes", None):
        kw["max_nodes"] = args.max_nodes
    return make_lm_problem(args.lm, allowed, prompts, args.horizon, eos_token=eos, prompt_weights=weights,
                           reward=args.reward, reward_seed=args.reward_seed, reward_scale=args.reward_scale,
                           target=target, score=args.reward_score, reward_model=args.reward_lm, twin=args.twin,
                           gamma=args.lm_gamma, trainable=args.trainable, dtype=args.lm_dtype, device=args.lm_device,
                           seed=args.lm_seed, tokenizer=args.tokenizer, tree_mode=args.tree_mode,
                           max_batch=args.lm_max_batch, **kw)


def problem_from_lm_args(args):
    """``(mdp, policy)`` for :func:`tpg.verify.harness.verify` from the options of :func:`add_lm_args`:
    the LM policy, or its :class:`SketchedPolicy` (``--param-space``, resolved with ``--mode``)."""
    mdp, policy = lm_problem_from_args(args)
    return lm_verification_problem(mdp, policy, getattr(args, "mode", "exact"), args.param_space, args.sketch_dim,
                                   getattr(args, "seed", 0) or 0)


__all__ = ["SketchedPolicy", "sketch_logit_jacobian", "resolve_param_space", "lm_verification_problem", "verify_lm",
           "lm_sample", "lm_sample_continuations", "add_lm_args", "lm_problem_from_args", "problem_from_lm_args",
           "PARAM_SPACES", "DEFAULT_SKETCH_DIM"]
