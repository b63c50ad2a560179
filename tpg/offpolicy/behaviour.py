"""Behaviour policies: what the responses were actually sampled from, exactly, on the stored tree.

``pi`` is the *training* policy (the case's policy, whose ``grad J(pi)`` is the target); ``mu`` is the
*behaviour* policy the responses are sampled from (the inference engine's sampler, a stale copy of
``pi``, ...). Every behaviour here is a per-state distribution ``mu(. | s)`` computed on the stored
tree as a table of log-probabilities ``[N_nt, V]`` (``-inf`` outside its support), so
``P_mu(W | x) = prod_t mu(w_t | s_t)`` is exact and the sample space under ``mu`` can be enumerated.

A spec is a chain of stages ``STAGE[+STAGE...]`` applied left to right to the logits ``z(s, .)`` of the
policy (each stage maps logits to logits; ``mu = softmax`` of the last), e.g.
``temperature:0.7+top_p:0.9`` (what vLLM samples with ``temperature=0.7, top_p=0.9``). Stages:

* ``pi`` — the identity (``mu = pi``).
* ``temperature:T`` — ``z / T`` (``T > 0``), i.e. ``mu(w|s) ∝ pi(w|s)^(1/T)``.
* ``top_k:k`` — keep the tokens with fewer than ``k`` tokens strictly more likely,
  ``S_k(s) = {w : #{v : p(v|s) > p(w|s)} < k}``, renormalised. Ties at the boundary are all kept (as
  Hugging Face's and vLLM's threshold ``p >= p_(k)``), so ``|S_k| >= k`` when ties straddle rank ``k``.
* ``top_p:p`` — nucleus sampling: keep ``w`` iff the mass of the tokens strictly more likely than ``w``
  is below ``p``, ``S_p(s) = {w : sum_{v : p(v|s) > p(w|s)} p(v|s) < p}``: the smallest most-likely set
  whose mass reaches ``p``, extended by the tokens tied with its least likely member. Tied tokens are
  kept or dropped together, independently of token ids; engines that sort with a tie-break by id
  (Hugging Face, vLLM) may keep only part of a tie block, so the two differ only at exact ties
  (uniform rows). ``p = 1`` keeps every token. ``0 < p <= 1``.
* ``min_p:m`` — keep ``w`` iff ``p(w|s) >= m max_v p(v|s)`` (vLLM's ``min_p``), ``0 <= m <= 1``.
* ``logit_noise:sigma[,seed]`` — ``z + sigma eps`` with ``eps ~ N(0, 1)`` i.i.d. per (state, token),
  one seeded draw (default seed 0): a fixed perturbation standing for the numerical mismatch between
  the trainer's and the engine's forward passes.
* ``precision:DTYPE`` — the logits rounded to ``bf16``, ``fp16`` or ``fp32`` (round to nearest even)
  and back; the softmax is taken in float64. On the first stage these are the policy's own logits
  (``Policy.node_logits``), as an engine computing its logits in that precision would.
* ``stale:k[,lr=eta]`` — the policy ``k`` exact gradient-ascent steps *behind* ``pi``: ``mu = pi_{theta_{-k}}``
  with ``theta_{j+1} = theta_j + eta grad J(theta_j)`` and ``theta_0 = theta`` (the policy's parameters),
  so that ``k`` plain gradient-ascent steps of size ``eta`` (default 0.5) from ``mu`` land exactly on
  ``pi`` and the verification target stays ``grad J(pi)``. Each backward step solves
  ``theta_{j-1} + eta grad J(theta_{j-1}) = theta_j`` (damped fixed-point iteration, :func:`stale_policy`;
  where the step cannot be inverted a ``ValueError`` asks for a smaller ``eta``; with a large ``eta`` the
  step map may have several preimages, and ``mu`` is the one reached from the explicit guess
  ``theta_j - eta grad J(theta_j)``); the residual of the ``k`` forward steps is reported
  (``info['stale_residual']``). Each iteration is one exact gradient, so transformer policies want a small
  ``eta`` (e.g. 0.05).
  A policy recorded by ``tpg train`` is given with ``file:`` instead.
* ``file:PATH`` — any recorded policy on the same tree: a ``tpg-case/1`` JSON file (its tabular
  policy; its rewards are ignored) or a ``tpg train`` checkpoint (``.ckpt``/``.pt``, its ``policy``
  state loaded into a copy of ``pi``'s architecture).
* ``mix:w,SPEC1,SPEC2`` — the per-state mixture ``mu(.|s) = w mu_1(.|s) + (1 - w) mu_2(.|s)`` of two
  chains applied to the same input (``0 <= w <= 1``); nested specs with commas go in parentheses:
  ``mix:0.9,pi,(logit_noise:0.5,1)``.

``stale`` and ``file`` replace the policy rather than transform it, so they may only start a chain.

The mismatch each behaviour creates (:func:`mismatch_report`) is computed exactly, with ``d_mu(s)``
the probability that a response sampled from ``mu`` visits the non-terminal state ``s`` (prompt
weight included) and ``E_mu[T] = sum_s d_mu(s)`` the expected length:

* ``kl_seq = E_mu[log P_mu(W)/P_pi(W)] = sum_s d_mu(s) KL(mu(.|s) || pi(.|s))``,
  ``kl_token = kl_seq / E_mu[T]``; ``kl_pi_mu_seq = KL(P_pi || P_mu)`` (``inf`` when ``mu`` truncates);
* ``mean_abs_log_ratio = E_mu[sum_t |log pi(w_t|s_t) - log mu(w_t|s_t)|] / E_mu[T]``; ``max_abs_log_ratio``,
  ``max_token_ratio`` and ``min_token_ratio`` of ``pi(w|s)/mu(w|s)`` over the pairs ``mu`` can sample
  (``d_mu(s) > 0``, ``mu(w|s) > 0``); ``max_seq_ratio`` of ``P_pi(W)/P_mu(W)`` over ``mu``'s responses;
* ``pi_mass_outside_token = E_mu[sum_t pi(w : mu(w|s_t) = 0 | s_t)] / E_mu[T]`` and
  ``pi_mass_outside_seq = P_pi(P_mu(W) = 0)``: the mass ``mu`` never samples (top-k, top-p, min-p);
* ``seq_ratio_second_moment = E_mu[(P_pi(W)/P_mu(W))^2] = sum_{P_mu(W) > 0} P_pi(W)^2 / P_mu(W)``
  (``1 + chi^2(P_pi || P_mu)`` with full support: the variance factor of sequence-level importance
  sampling) and ``ess_fraction = E_mu[rho]^2 / E_mu[rho^2]`` (Kong's effective sample size per sample,
  ``<= 1``); ``mean_length_mu = E_mu[T]``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import unwrap_checkpoint
from ..exact.engine import solve
from ..policies.base import Policy
from ._spec import canonical, fmt_value
from .specs import PRECISION_NAMES, STAGE_DECLS, StageNode, mix_spec, parse_behaviour

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
assert tuple(PRECISIONS) == PRECISION_NAMES
#: Iterations allowed per backward step of ``stale``.
STALE_MAX_ITER = 500
#: Convergence of a backward step: ``max |Delta theta| <= STALE_TOL * max(1, max |theta|)``.
STALE_TOL = 1e-13


class BehaviourPolicy(Policy):
    """A tabular policy over the stored tree given by its log-probabilities ``[N_nt, V]`` (``-inf`` allowed:
    tokens outside the support are never sampled). Used to sample from and solve under ``mu``."""

    needs_tree = True

    def __init__(self, tree, logp_nv: torch.Tensor):
        super().__init__(tree.vocab_size)
        shape = (tree.num_nonterminal, tree.vocab_size)
        if tuple(logp_nv.shape) != shape:
            raise ValueError(f"behaviour log-probabilities must have shape [N_nt, V] = {list(shape)}, "
                             f"got {list(logp_nv.shape)}")
        self.register_buffer("table", logp_nv.detach().to(torch.float64).clone())

    def node_logits(self, tree) -> torch.Tensor:
        if tuple(self.table.shape) != (tree.num_nonterminal, tree.vocab_size):
            raise ValueError("the behaviour policy was built on another tree")
        return self.table

    def log_prob_rows(self):
        return self.table

    def row_index(self, position, prev_b, nt_b):
        return nt_b


# ------------------------------------------------------------------------------ stages
@dataclass
class _Env:
    """What a stage may read: the problem (source stages) and where it sits (error messages)."""

    mdp: object
    policy: object
    info: dict = field(default_factory=dict)


class Stage:
    """One stage of a behaviour chain: logits ``[N_nt, V]`` in, logits out (``-inf`` = outside the support).

    A subclass sets ``name``; its ``positional`` arguments, ``OPTIONS``, ``help`` line and ``source``
    (it replaces its input, so it may only start a chain) come from its torch-free declaration,
    :data:`tpg.offpolicy.specs.STAGE_DECLS` (unless the class defines them itself)."""

    name = ""
    positional: tuple[str, ...] = ()
    OPTIONS: dict = {}
    source = False
    help = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        decl = STAGE_DECLS.get(cls.__dict__.get("name", ""))
        if decl is not None:
            for attr, value in (("positional", decl.positional), ("OPTIONS", decl.options), ("help", decl.help),
                                ("source", decl.source)):
                if attr not in cls.__dict__:
                    setattr(cls, attr, value)

    def __init__(self, values: dict):
        self.values = values

    @property
    def spec(self) -> str:
        return canonical(self.name, self.values, self.positional, self.OPTIONS)

    def apply(self, z_nv: torch.Tensor, env: _Env) -> torch.Tensor:
        raise NotImplementedError


def _probs(z_nv: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z_nv, dim=-1)


def _sorted_block_start(p_nv: torch.Tensor, values_nv: torch.Tensor) -> torch.Tensor:
    """For every token, the entry of ``values`` (aligned with the descending sort of ``p``) at the first
    position of its tie block, i.e. a quantity that is equal for tied tokens; in sorted order."""
    p_s, _ = torch.sort(p_nv, dim=-1, descending=True, stable=True)
    new = torch.ones_like(p_s, dtype=torch.bool)
    new[:, 1:] = p_s[:, 1:] != p_s[:, :-1]
    marked = torch.where(new, values_nv, torch.full_like(values_nv, -math.inf))
    return torch.cummax(marked, dim=-1).values


def _keep_in_original_order(p_nv: torch.Tensor, keep_sorted: torch.Tensor) -> torch.Tensor:
    _, order = torch.sort(p_nv, dim=-1, descending=True, stable=True)
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep


def _mask(z_nv: torch.Tensor, keep_nv: torch.Tensor) -> torch.Tensor:
    return torch.where(keep_nv, z_nv, torch.full_like(z_nv, -math.inf))


class Identity(Stage):
    name = "pi"

    def apply(self, z_nv, env):
        return z_nv


class Temperature(Stage):
    name = "temperature"

    def apply(self, z_nv, env):
        return z_nv / self.values["T"]


class TopK(Stage):
    name = "top_k"

    def apply(self, z_nv, env):
        p = _probs(z_nv)
        V = p.shape[1]
        rank = torch.arange(V, dtype=torch.float64).expand_as(p)
        first_rank = _sorted_block_start(p, rank)  # tokens strictly more likely = the block's first rank
        keep = _keep_in_original_order(p, first_rank < self.values["k"])
        return _mask(z_nv, keep & (p > 0))


class TopP(Stage):
    name = "top_p"

    def apply(self, z_nv, env):
        if self.values["p"] >= 1.0:
            return z_nv
        p = _probs(z_nv)
        p_s, _ = torch.sort(p, dim=-1, descending=True, stable=True)
        before = torch.cumsum(p_s, dim=-1) - p_s  # mass of the tokens sorted before this one
        strictly_more = _sorted_block_start(p, before)
        keep = _keep_in_original_order(p, strictly_more < self.values["p"])
        return _mask(z_nv, keep & (p > 0))


class MinP(Stage):
    name = "min_p"

    def apply(self, z_nv, env):
        p = _probs(z_nv)
        keep = p >= self.values["m"] * p.max(dim=-1, keepdim=True).values
        return _mask(z_nv, keep & (p > 0))


class LogitNoise(Stage):
    name = "logit_noise"

    def apply(self, z_nv, env):
        gen = torch.Generator().manual_seed(int(self.values["seed"]))
        eps = torch.randn(z_nv.shape, generator=gen, dtype=torch.float64)
        return z_nv + self.values["sigma"] * eps


class Precision(Stage):
    name = "precision"

    def apply(self, z_nv, env):
        return z_nv.to(PRECISIONS[self.values["dtype"]]).to(torch.float64)


def _flat_params(policy) -> list[torch.Tensor]:
    return [p for p in policy.parameters() if p.requires_grad]


def _grad_vector(mdp, policy) -> torch.Tensor:
    return solve(mdp, policy).flat_grad().to(torch.float64)


def _set_vector(params: list[torch.Tensor], vec: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in params:
            n = p.numel()
            p.copy_(vec[i:i + n].view_as(p).to(p.dtype))
            i += n


def _get_vector(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def stale_policy(mdp, policy, steps: int, lr: float):
    """``(mu_policy, info)``: a copy of ``policy`` moved ``steps`` exact gradient-ascent steps of size ``lr``
    *back*, i.e. ``k`` forward steps ``theta <- theta + lr grad J(theta)`` from it return ``policy``'s
    parameters (see the module docstring); ``info`` has the iterations of each step and the forward
    residual ``max |theta_k - theta|``.

    Each backward step solves ``r(x) = x + lr grad J(x) - theta_j = 0`` from the explicit guess
    ``x = theta_j - lr grad J(theta_j)`` by damped Richardson iteration ``x <- x - alpha r(x)``, halving
    ``alpha`` whenever ``max |r|`` does not decrease (``alpha = 1`` is the plain fixed-point iteration
    ``x <- theta_j - lr grad J(x)``). It converges where the step is locally invertible
    (``1 + lr lambda > 0`` for every eigenvalue ``lambda`` of the Hessian of ``J``); elsewhere the
    backward step is not defined and a ``ValueError`` asks for a smaller ``lr``."""
    mu = copy.deepcopy(policy)
    params = _flat_params(mu)
    if not params:
        raise ValueError("behaviour stale: the policy has no trainable parameters to step")
    theta = _get_vector(params)
    scale = max(1.0, float(theta.abs().max()))
    iters = []
    target = theta.clone()

    def residual(x):
        _set_vector(params, x)
        return x + lr * _grad_vector(mdp, mu) - target

    for step in range(steps):
        _set_vector(params, target)
        x = target - lr * _grad_vector(mdp, mu)  # the explicit step: a good starting point
        r = residual(x)
        err = float(r.abs().max())
        alpha, it = 1.0, 0
        while err > STALE_TOL * scale and it < STALE_MAX_ITER and alpha >= 1e-4:
            it += 1
            x_try = x - alpha * r
            r_try = residual(x_try)
            err_try = float(r_try.abs().max())
            if math.isfinite(err_try) and err_try < err:
                x, r, err = x_try, r_try, err_try
                alpha = min(1.0, 1.5 * alpha)
            else:
                alpha /= 2
        if not err <= STALE_TOL * scale:
            raise ValueError(f"behaviour stale: the backward gradient step {step + 1} of size lr={fmt_value(lr)} did "
                             f"not converge (residual {err:.3g} after {it} iterations): the step is too large to be "
                             f"inverted on this problem (1 + lr * curvature <= 0 somewhere); use a smaller lr")
        iters.append(it)
        _set_vector(params, x)
        target = x.clone()
    # the forward check: k ascent steps from mu must return to pi
    check = copy.deepcopy(mu)
    cparams = _flat_params(check)
    y = _get_vector(cparams)
    for _ in range(steps):
        y = y + lr * _grad_vector(mdp, check)
        _set_vector(cparams, y)
    residual_k = float((y - theta).abs().max()) if steps else 0.0
    return mu, {"stale_steps": steps, "stale_lr": lr, "stale_iterations": iters, "stale_residual": residual_k,
                "stale_param_distance": float((_get_vector(params) - theta).norm())}


class Stale(Stage):
    name = "stale"

    def apply(self, z_nv, env):
        mu, info = stale_policy(env.mdp, env.policy, int(self.values["k"]), float(self.values["lr"]))
        env.info.update(info)
        with torch.no_grad():
            return mu.node_logits(env.mdp.tree).detach().to(torch.float64)


def _file_logits(path: str, mdp, policy) -> torch.Tensor:
    """The logits ``[N_nt, V]`` of the policy recorded in ``path`` (a case file or a ``tpg train`` checkpoint)."""
    tree = mdp.tree
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"behaviour file: no such file {path!r}")
    if p.suffix.lower() == ".json":
        from ..cases import case_from_dict

        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"behaviour file: cannot read {path!r} as JSON: {exc}") from None
        try:
            other, pol = case_from_dict(data)
        except ValueError as exc:
            raise ValueError(f"behaviour file: {path!r}: {exc}") from None
        got = (other.vocab_size, other.horizon, other.eos_token, other.num_prompts)
        want = (mdp.vocab_size, mdp.horizon, mdp.eos_token, mdp.num_prompts)
        if got != want:
            raise ValueError(f"behaviour file: {path!r} has (vocab_size, horizon, eos_token, prompts) = {got}, "
                             f"the problem has {want}: a behaviour must live on the same tree")
        with torch.no_grad():
            return pol.node_logits(tree).detach().to(torch.float64)
    try:
        state = torch.load(p, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"behaviour file: cannot read {path!r} as a case file (.json) or a torch checkpoint: "
                         f"{exc}") from None
    # what `tpg train` writes: the state inside a checksummed envelope, verified here
    state = unwrap_checkpoint(state, f"behaviour file: {path!r}")
    if isinstance(state, dict) and isinstance(state.get("policy"), dict):
        state = state["policy"]
    if not isinstance(state, dict):
        raise ValueError(f"behaviour file: {path!r} holds no policy state dict")
    mu = copy.deepcopy(policy)
    try:
        mu.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"behaviour file: the policy state in {path!r} does not fit the problem's policy: "
                         f"{str(exc).splitlines()[0]}") from None
    with torch.no_grad():
        return mu.node_logits(tree).detach().to(torch.float64)


class File(Stage):
    name = "file"

    def apply(self, z_nv, env):
        return _file_logits(self.values["path"], env.mdp, env.policy)


class Chain(Stage):
    """Stages applied left to right."""

    name = "chain"

    def __init__(self, stages: list[Stage]):
        super().__init__({})
        self.stages = stages

    @property
    def source(self) -> bool:
        return self.stages[0].source

    @property
    def spec(self) -> str:
        return "+".join(s.spec for s in self.stages)

    def apply(self, z_nv, env):
        for s in self.stages:
            z_nv = s.apply(z_nv, env)
        return z_nv


class Mix(Stage):
    name = "mix"

    def __init__(self, values: dict, first: Stage, second: Stage):
        super().__init__(values)
        self.first, self.second = first, second

    @property
    def source(self) -> bool:
        return self.first.source or self.second.source

    @property
    def spec(self) -> str:
        return mix_spec(self.values["w"], self.first.spec, self.second.spec)

    def apply(self, z_nv, env):
        w = float(self.values["w"])
        l1 = torch.log_softmax(self.first.apply(z_nv, env), dim=-1)
        l2 = torch.log_softmax(self.second.apply(z_nv, env), dim=-1)
        lw = math.log(w) if w > 0 else -math.inf
        lw2 = math.log1p(-w) if w < 1 else -math.inf
        return torch.logaddexp(l1 + lw, l2 + lw2)


STAGES: dict[str, type[Stage]] = {c.name: c for c in (Identity, Temperature, TopK, TopP, MinP, LogitNoise,
                                                      Precision, Stale, File, Mix)}
assert tuple(STAGES) == tuple(STAGE_DECLS)


def parse_chain(text: str, where: str | None = None) -> Stage:
    """The stage (or chain of stages) a behaviour spec names; ``ValueError`` naming the bad part (the
    parse is :func:`tpg.offpolicy.specs.parse_behaviour`'s, which the command line runs before torch loads)."""
    return _build(parse_behaviour(text, where))


def _build(node: StageNode) -> Stage:
    if node.name == "chain":
        return Chain([_build(p) for p in node.parts])
    if node.name == "mix":
        return Mix(node.values, _build(node.parts[0]), _build(node.parts[1]))
    return STAGES[node.name](node.values)


# ------------------------------------------------------------------------------ resolution
@dataclass
class Behaviour:
    """A behaviour policy resolved on one problem.

    Attributes:
        spec: the canonical spec (or a description for a policy object / table).
        logp: ``log mu(w | s)`` ``[N_nt, V]`` float64 (``-inf`` outside the support).
        policy: a :class:`BehaviourPolicy` to sample from.
        sol: the exact solution under ``mu`` (reach probabilities, values; no gradient).
        mismatch: :func:`mismatch_report` against ``pi``.
        info: what the stages report (``stale``: iterations and residual).
    """

    spec: str
    logp: torch.Tensor
    policy: BehaviourPolicy
    sol: object
    mismatch: dict
    info: dict = field(default_factory=dict)


def behaviour_logits(spec, mdp, policy) -> tuple[torch.Tensor, str, dict]:
    """``(logits [N_nt, V], canonical spec, info)`` of a behaviour given as a spec string, a policy on the
    same tree (anything with ``node_logits``), or a table of log-probabilities ``[N_nt, V]``."""
    tree = mdp.tree
    if isinstance(spec, torch.Tensor):
        z = spec.detach().to(torch.float64)
        if tuple(z.shape) != (tree.num_nonterminal, tree.vocab_size):
            raise ValueError(f"a behaviour table must have shape [N_nt, V] = "
                             f"{[tree.num_nonterminal, tree.vocab_size]}, got {list(z.shape)}")
        return z, "table", {}
    if hasattr(spec, "node_logits"):
        with torch.no_grad():
            z = spec.node_logits(tree).detach().to(torch.float64)
        return z, f"policy:{type(spec).__name__}", {}
    stage = parse_chain(spec) if isinstance(spec, str) else spec
    if not isinstance(stage, Stage):
        raise ValueError(f"a behaviour must be a spec string, a policy or a [N_nt, V] table; got {type(spec).__name__}")
    with torch.no_grad():
        z = policy.node_logits(tree).detach().to(torch.float64)
    env = _Env(mdp, policy)
    out = stage.apply(z, env)
    return out, stage.spec, env.info


def behaviour_log_probs(spec, mdp, policy) -> torch.Tensor:
    """``log mu(w | s)`` ``[N_nt, V]`` of a behaviour (see :func:`behaviour_logits`); ``ValueError`` when a
    row is empty or not finite where it should be."""
    z, name, _ = behaviour_logits(spec, mdp, policy)
    return _checked_log_softmax(z, name)


def _checked_log_softmax(z_nv: torch.Tensor, name: str) -> torch.Tensor:
    if bool(torch.isnan(z_nv).any()) or bool((z_nv == math.inf).any()):
        raise ValueError(f"behaviour {name}: its logits contain NaN or +inf")
    if bool((z_nv == -math.inf).all(dim=-1).any()):
        raise ValueError(f"behaviour {name}: a state has no token left in its support")
    return torch.log_softmax(z_nv, dim=-1)


def mismatch_report(mdp, logp_pi_nv: torch.Tensor, logp_mu_nv: torch.Tensor, sol_pi=None, sol_mu=None) -> dict:
    """The exact mismatch between ``mu`` and ``pi`` (see the module docstring), as a dict of floats
    (``inf`` where the quantity is infinite)."""
    tree = mdp.tree
    if sol_mu is None:
        sol_mu = solve(mdp, BehaviourPolicy(tree, logp_mu_nv), with_grad=False)
    if sol_pi is None:
        sol_pi = solve(mdp, BehaviourPolicy(tree, logp_pi_nv), with_grad=False)
    lpi, lmu = logp_pi_nv.to(torch.float64), logp_mu_nv.to(torch.float64)
    pi, mu = lpi.exp(), lmu.exp()
    d_mu = sol_mu.reach[tree.nt_node_k]
    d_pi = sol_pi.reach[tree.nt_node_k]
    zero = torch.zeros((), dtype=torch.float64)
    in_mu = mu > 0
    diff = torch.where(in_mu, lmu - lpi, zero)
    length = float(d_mu.sum())
    kl_seq = float((d_mu * (mu * diff).sum(1)).sum())
    abs_lr = float((d_mu * (mu * diff.abs()).sum(1)).sum())
    outside = float((d_mu * torch.where(in_mu, zero, pi).sum(1)).sum())
    seen = (d_mu > 0).unsqueeze(1) & in_mu
    ratio = torch.where(seen, (lpi - lmu).exp(), zero)
    logr = torch.where(seen, (lpi - lmu).abs(), zero)
    if bool(((~in_mu) & (pi > 0) & (d_pi.unsqueeze(1) > 0)).any()):
        kl_pi_mu = math.inf
    else:
        kl_pi_mu = float((d_pi * (pi * torch.where(in_mu, lpi - lmu, zero)).sum(1)).sum())
    P_pi, P_mu = sol_pi.response_prob, sol_mu.response_prob
    live = P_mu > 0
    seq_ratio = torch.where(live, P_pi / torch.where(live, P_mu, torch.ones_like(P_mu)), zero)
    second = float((torch.where(live, P_pi * seq_ratio, zero)).sum())
    first = float(P_pi[live].sum())  # E_mu[rho] = 1 - pi's mass outside mu's support
    return {
        "kl_token": kl_seq / length if length > 0 else 0.0,
        "kl_seq": kl_seq,
        "kl_pi_mu_seq": kl_pi_mu,
        "mean_abs_log_ratio": abs_lr / length if length > 0 else 0.0,
        "max_abs_log_ratio": float(logr.max()),
        "max_token_ratio": float(ratio.max()),
        "min_token_ratio": float(torch.where(seen, ratio, torch.full_like(ratio, math.inf)).min()),
        "max_seq_ratio": float(seq_ratio.max()),
        "pi_mass_outside_token": outside / length if length > 0 else 0.0,
        "pi_mass_outside_seq": float(P_pi[~live].sum()),
        "seq_ratio_second_moment": second,
        "ess_fraction": first ** 2 / second if second > 0 else 0.0,
        "mean_length_mu": length,
    }


def resolve_behaviour(spec, mdp, policy, sol_pi=None) -> Behaviour:
    """The :class:`Behaviour` of ``spec`` (a spec string, a policy on the same tree, a ``[N_nt, V]``
    log-probability table, or an already resolved :class:`Behaviour`) on ``(mdp, policy)``: ``log mu``,
    a sampler, the exact solution under ``mu`` and the mismatch report against ``pi``."""
    if isinstance(spec, Behaviour):
        return spec
    tree = mdp.tree
    z, name, info = behaviour_logits(spec, mdp, policy)
    logp_mu = _checked_log_softmax(z, name)
    if sol_pi is None:
        sol_pi = solve(mdp, policy, with_grad=False)
    mu_policy = BehaviourPolicy(tree, logp_mu)
    sol_mu = solve(mdp, mu_policy, with_grad=False)
    mism = mismatch_report(mdp, sol_pi.logp, logp_mu, sol_pi=sol_pi, sol_mu=sol_mu)
    return Behaviour(spec=name, logp=logp_mu, policy=mu_policy, sol=sol_mu, mismatch=mism, info=info)


def describe_behaviours() -> str:
    """One line per behaviour stage: its spec form and what it samples from."""
    lines = []
    for name, cls in STAGES.items():
        args = ",".join(cls.positional)
        kw = [k for k in cls.OPTIONS if k not in cls.positional]
        form = name + (":" + args if args else "") + "".join(f"[,{k}=...]" for k in kw)
        if name == "mix":
            form = "mix:w,SPEC1,SPEC2"
        lines.append(f"  {form:28s} {cls.help}")
    return "\n".join(lines)


__all__ = ["Behaviour", "BehaviourPolicy", "Stage", "STAGES", "parse_chain", "behaviour_logits",
           "behaviour_log_probs", "resolve_behaviour", "mismatch_report", "stale_policy", "describe_behaviours",
           "PRECISIONS"]
