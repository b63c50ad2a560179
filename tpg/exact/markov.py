"""Exact objective, values and gradient when everything depends on (position, previous token).

For a :class:`~tpg.policies.SharedSoftmax` policy (logits ``theta[t, prev]``) and
:class:`~tpg.mdp.rewards.CompactRewards` (a table ``r[t, prev, w]``), the next token and its reward
depend on the state ``s`` only through ``(t, prev)``: ``t`` = tokens so far (0-based position of the
next token) and ``prev`` = the previous token, or ``V + p`` before the first token of prompt ``p``.
The response process is then a Markov chain on the ``H (V + P)`` states ``(t, prev)``, and the
exact ``J`` and ``grad J`` need ``O(H (V + P) V)`` work instead of a tree of ``V^H`` nodes.

Notation (``R = V + P`` rows per position, ``e`` the EOS token, ``gamma`` the discount, arrays
``[H, R]`` over states and ``[H, R, V]`` over (state, token)):

* ``pi(w | t, prev) = softmax(theta[t, prev])_w``;
* a token ends the response when it is ``e`` or when ``t = H - 1`` ("terminal" transitions);
* reach ``m(t, prev)``: the probability, prompt weights included, that the response is still
  running before token ``t`` with previous token ``prev``, i.e. ``sum_s mu(s)`` over the tree
  nodes ``s`` of that state. Forward:

      m(0, V + p) = rho(p),     m(t + 1, w) = [w != e] sum_prev m(t, prev) pi(w | t, prev);

* token-level value and action value (Markov: they depend on ``s`` only through ``(t, prev)``).
  Backward, with ``V(H, .) = 0``:

      Q(t, prev, w) = r(t, prev, w) + gamma [w != e] V(t + 1, w),
      V(t, prev)    = sum_w pi(w | t, prev) Q(t, prev, w);

* ``J = sum_p rho(p) V(0, V + p)``;
* Lemma 1 with the analytic softmax score, summed over the tree nodes of each state (they share
  ``Q`` and ``V``, and their reaches add up to ``m``):

      dJ / dtheta[t, prev, w] = gamma^t m(t, prev) pi(w | t, prev) (Q(t, prev, w) - V(t, prev));

  with 1-based positions this is the ``gamma^(t-1)`` of docs/THEORY.md's Lemma 1.

The response-level value ``V'(s) = c(s) + gamma^t V(s)`` (with ``c(s) = sum_{k<t} gamma^k r_k`` the
reward already earned) is *not* a function of ``(t, prev)``: ``c`` depends on the whole prefix. What
:func:`solve_markov` reports is its conditional expectation given the state,

    E[c | t, prev] = C(t, prev) / m(t, prev),   E[V' | t, prev] = E[c | t, prev] + gamma^t V(t, prev),

with the reach-weighted past reward ``C(t, prev) = sum_s mu(s) c(s)`` pushed forward by

    C(0, .) = 0,   C(t + 1, w) = [w != e] sum_prev pi(w | t, prev) (C(t, prev) + gamma^t m(t, prev) r(t, prev, w)).

``E[V' | t, prev]`` equals ``V'`` of every prefix of that state only when the rewards earned so far
do not vary across them (e.g. terminal-only rewards before the end). For one given prefix the exact
``V'`` is ``c(prefix) + gamma^t V(t, prev)``, with ``c`` summed along it
(:func:`prefix_response_values`).

Also exact here, all by the same two passes: the length distribution ``P(T = t + 1)`` and
``E[T] = sum_{t, prev} m(t, prev)``, the sequence-level ``KL(pi || pi_ref)`` of two shared policies
and its gradient (:func:`markov_kl`), the sequence entropy and its gradient (:func:`markov_entropy`),
and a differentiable forward-only ``J`` for autograd checks (:func:`markov_objective`).
Everything is float64; each pass is a loop over the ``H`` positions of one ``[R, V] x [V]`` product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._threads import intra_op_threads as _intra_op_threads
from ..mdp.mdp import checked_prefixes
from ..mdp.rewards import CompactRewards
from ..policies.tabular import SharedSoftmax

ENGINES = ("auto", "tree", "markov")


# ---------------------------------------------------------------------------- applicability
def markov_unsupported_reason(mdp, policy) -> str | None:
    """Why the Markov engine cannot solve ``(mdp, policy)``, or ``None`` when it can.

    It needs a :class:`~tpg.policies.SharedSoftmax` policy whose vocabulary and prompts match the
    MDP and whose horizon is at least the MDP's, and rewards stored as a
    :class:`~tpg.mdp.rewards.CompactRewards` table (exactly that class: tree rewards and the
    zero-reward twin depend on the whole prefix, not on ``(t, prev)``)."""
    if not isinstance(policy, SharedSoftmax):
        return (f"the Markov engine needs a SharedSoftmax policy (logits that depend only on (position, "
                f"previous token)); got {type(policy).__name__}")
    if type(mdp.rewards) is not CompactRewards:
        kind = type(mdp.rewards).__name__
        why = (" (the zero-reward twin puts RM(W) on the last token, which depends on the whole response; "
               "its J and grad J equal those of its base MDP)") if kind == "TwinRewards" else ""
        return (f"the Markov engine needs compact rewards (a table over (position, previous token, token), "
                f"--mdp ...,compact=true); got {kind}{why}")
    if policy.vocab_size != mdp.vocab_size or policy.num_prompts != mdp.num_prompts or policy.horizon < mdp.horizon:
        return (f"the shared policy's shape (vocab {policy.vocab_size}, prompts {policy.num_prompts}, horizon "
                f"{policy.horizon}) does not fit the MDP (vocab {mdp.vocab_size}, prompts {mdp.num_prompts}, "
                f"horizon {mdp.horizon}; the policy's horizon must be >= the MDP's)")
    return None


def check_markov(mdp, policy) -> None:
    """``ValueError`` (with :func:`markov_unsupported_reason`) unless the Markov engine applies."""
    reason = markov_unsupported_reason(mdp, policy)
    if reason is not None:
        raise ValueError(reason)


def choose_engine(mdp, policy, engine: str = "auto") -> str:
    """``"tree"`` or ``"markov"``: the engine that ``engine`` (``auto``, ``tree`` or ``markov``) asks for.

    ``auto`` takes the tree engine when the stored tree fits the MDP's size guard (its solution is
    per prefix, the finer one) and otherwise the Markov engine when it applies; when neither does it
    raises the size guard's ``ValueError`` with the reason the Markov engine does not apply.
    ``markov`` raises ``ValueError`` when the Markov engine does not apply."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "markov":
        check_markov(mdp, policy)
        return "markov"
    if engine == "tree" or mdp.tree_fits():
        return "tree"
    reason = markov_unsupported_reason(mdp, policy)
    if reason is None:
        return "markov"
    try:
        mdp.tree  # noqa: B018 - raises the size guard's message
    except ValueError as exc:
        raise ValueError(f"{exc}; the Markov engine does not apply either: {reason}") from None
    return "tree"


# ---------------------------------------------------------------------------- tables
def state_rows(vocab_size: int, num_prompts: int) -> int:
    """``R = V + P``, the rows of a state table at one position."""
    return vocab_size + num_prompts


def reachable_states(horizon: int, vocab_size: int, num_prompts: int, eos_token: int | None) -> torch.Tensor:
    """``[H, R]`` bool: the states a response can be in (``prev >= V`` at ``t = 0``; ``prev < V``,
    ``prev != e`` at ``t >= 1``), whatever the policy."""
    R = vocab_size + num_prompts
    out = torch.zeros(horizon, R, dtype=torch.bool)
    out[0, vocab_size:] = True
    out[1:, :vocab_size] = True
    if eos_token is not None:
        out[1:, eos_token] = False
    return out


def terminal_tokens(horizon: int, vocab_size: int, eos_token: int | None) -> torch.Tensor:
    """``[H, V]`` bool: whether token ``w`` at position ``t`` ends the response (``w = e`` or ``t = H - 1``)."""
    out = torch.zeros(horizon, vocab_size, dtype=torch.bool)
    out[horizon - 1] = True
    if eos_token is not None:
        out[:, eos_token] = True
    return out


def shared_log_probs(policy, horizon: int) -> torch.Tensor:
    """``log pi(w | t, prev)`` of a shared policy for ``t < horizon``, ``[H, R, V]`` float64 (detached)."""
    with torch.no_grad():
        return torch.log_softmax(policy.logits.detach()[:horizon].to(torch.float64), dim=-1)


def _check_table(name: str, table: torch.Tensor, shape: tuple) -> torch.Tensor:
    table = torch.as_tensor(table, dtype=torch.float64)
    if tuple(table.shape) != shape:
        raise ValueError(f"{name} must have shape [H, V + P, V] = {list(shape)}, got {list(table.shape)}")
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"{name} must be finite")
    return table.contiguous()


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    return float(gamma)


# ---------------------------------------------------------------------------- the two passes
def backward_values(pi: torch.Tensor, r: torch.Tensor | None, gamma: float, eos_token: int | None,
                    expected_r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level ``V(t, prev)`` ``[H, R]`` and the continuation value of each next token
    ``N(t, w) = [w non-terminal at t] V(t + 1, w)`` ``[H, V]``, for policy ``pi`` and rewards ``r``
    (both ``[H, R, V]``):

        V(t, prev) = sum_w pi(w | t, prev) (r(t, prev, w) + gamma N(t, w)),   N(H - 1, .) = 0.

    ``Q = r + gamma N[:, None, :]``. The states ``(t >= 1, prev = e)`` do not exist (a response ends
    at EOS); their ``V`` is set to 0, the value after the end, which makes ``V(t + 1, :V)`` itself
    the vector ``N(t)``. One ``[R, V] x [V]`` product per position. ``expected_r`` ``[H, R]``, if
    given, is ``E_pi[r] = sum_w pi r`` already computed (``r`` is then not read)."""
    H, R, V = pi.shape
    if expected_r is None:
        expected_r = torch.einsum("trv,trv->tr", pi, r)  # E_pi[r] without a [H, R, V] temporary
    value = torch.empty(H, R, dtype=torch.float64)
    value[H - 1] = expected_r[H - 1]
    for t in range(H - 1, -1, -1):
        if t < H - 1:
            torch.addmv(expected_r[t], pi[t], value[t + 1, :V], alpha=gamma, out=value[t])
        if eos_token is not None and t >= 1:
            value[t, eos_token] = 0.0
    nxt = torch.zeros(H, V, dtype=torch.float64)
    nxt[:-1] = value[1:, :V]
    return value, nxt


def forward_reach(pi: torch.Tensor, rho: torch.Tensor, eos_token: int | None,
                  r: torch.Tensor | None = None, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reach ``m(t, prev)`` ``[H, R]`` and, if the rewards ``r`` ``[H, R, V]`` are given, the
    reach-weighted past reward ``C(t, prev)`` ``[H, R]`` (see the module docstring):

        m(t + 1, w) = [w != e] sum_prev m(t, prev) pi(w | t, prev),
        C(t + 1, w) = [w != e] sum_prev pi(w | t, prev) (C(t, prev) + gamma^t m(t, prev) r(t, prev, w)).

    ``m`` and ``C`` are pushed together, one ``[V, R] x [R, 2]`` product per position."""
    H, R, V = pi.shape
    cols = 1 if r is None else 2
    state = torch.zeros(H, R, cols, dtype=torch.float64)  # [..., 0] = m, [..., 1] = C
    state[0, V:, 0] = rho
    scratch = torch.empty(R, V, dtype=torch.float64)
    for t in range(H - 1):
        torch.mm(pi[t].t(), state[t], out=state[t + 1, :V])
        if r is not None:
            torch.mul(pi[t], r[t], out=scratch)
            state[t + 1, :V, 1].addmv_(scratch.t(), state[t, :, 0], alpha=gamma ** t)
        if eos_token is not None:
            state[t + 1, eos_token] = 0.0
    reach = state[..., 0].contiguous()
    return reach, (None if r is None else state[..., 1].contiguous())


def zra_value_tables(pi: torch.Tensor, r: torch.Tensor, eos_token: int | None, gamma: float,
                     critic_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Markov factors of the discounted ZRA return's value (the target of PPO's critic).

    With ``RM(W) = sum_k gamma^k r_k`` (the MDP's ``gamma``, 0-based ``k``), ``T`` the length and
    ``g`` the critic's discount, the critic's target at the state before token ``t`` is

        E[g^(T-1-t) RM(W) | s] = c(s) D(t, prev) + gamma^t F(t, prev),

    ``c(s) = sum_{k<t} gamma^k r_k`` (the reward already earned, a function of the prefix) and

        D(t, prev) = E[g^(T-1-t) | t, prev],
        F(t, prev) = E[g^(T-1-t) sum_{k>=t} gamma^(k-t) r_k | t, prev],

    which depend on the state only through ``(t, prev)``. Backward, with ``z = 1`` for a terminal
    transition (``w = e`` or ``t = H - 1``) and ``N_D(t, w) = [w non-terminal] D(t + 1, w)``:

        D(t, prev) = sum_w pi (z + g N_D(t, w)),
        F(t, prev) = sum_w pi (r (z + g N_D(t, w)) + g gamma [w non-terminal] F(t + 1, w)).

    With ``g = gamma = 1``: ``D = 1`` and ``F = V``, so the target is ``V'(s) = c + V``.
    Returns ``(D, F)``, each ``[H, R]``."""
    H, R, V = pi.shape
    z = terminal_tokens(H, V, eos_token).to(torch.float64)
    D, nxt_D = backward_values(pi, None, critic_gamma, eos_token, expected_r=torch.einsum("trv,tv->tr", pi, z))
    factor = z.add_(nxt_D, alpha=critic_gamma)  # z + g N_D: 1 at terminal tokens, g D(t + 1, w) elsewhere
    F, _ = backward_values(pi, None, critic_gamma * gamma, eos_token,
                           expected_r=torch.einsum("trv,trv,tv->tr", pi, r, factor))
    return D, F


# ---------------------------------------------------------------------------- solution
@dataclass
class MarkovSolution:
    """Everything the Markov engine knows about one (MDP, shared policy) pair.

    State arrays are ``[H, R]`` over (position ``t``, previous token ``prev``), ``R = V + P``
    (``prev = V + p`` before the first token of prompt ``p``); (state, token) arrays are
    ``[H, R, V]``. Rows that no response can be in (``reachable`` False) carry the values of the
    recursions (finite, with reach 0).

    Attributes:
        J: ``E_x E_W RM(W)``.
        logp: ``log pi(w | t, prev)``, ``[H, R, V]``.
        reach: ``m(t, prev)``, the probability (prompt weights included) of being alive at that state.
        reachable: ``[H, R]`` bool, the states a response can be in.
        value: token-level ``V(t, prev)`` (expected discounted future reward; 0 at the states
            ``(t >= 1, prev = e)``, which do not exist: a response ends at EOS).
        next_value: ``N(t, w) = [w non-terminal at t] V(t + 1, w)``, ``[H, V]``.
        rewards: the reward table ``r(t, prev, w)`` solved for (the MDP's, or the override).
        q, advantage: ``Q = r + gamma N`` and ``Q - V`` (properties, computed on each access).
        grad_logits: ``dJ / dtheta[t, prev, w] = gamma^t m pi (Q - V)`` (the shared logits' gradient).
        grads: ``dJ / d param`` for each parameter of the policy that requires grad (``None`` if not
            requested); for a plain :class:`SharedSoftmax`, ``grad_logits`` itself (the same tensor)
            when its horizon is the MDP's, else ``grad_logits`` padded with zeros to its horizon.
        past_mean: ``E[c | t, prev]``, the expected reward already earned (0 where the reach is 0);
            a property, computed by one more forward pass on first access.
        value_resp: ``E[V' | t, prev] = past_mean + gamma^t V`` (property; the conditional expectation of the
            response-level value; see the module docstring).
        length_probs: ``P(T = t + 1)`` for ``t = 0 .. H - 1``, ``[H]``.
        expected_length: ``E[T]``.
        gamma, eos_token, vocab_size, num_prompts: of the problem.
    """

    J: float
    logp: torch.Tensor
    reach: torch.Tensor
    reachable: torch.Tensor
    value: torch.Tensor
    next_value: torch.Tensor
    rewards: torch.Tensor
    grad_logits: torch.Tensor
    grads: list[torch.Tensor] | None
    length_probs: torch.Tensor
    expected_length: float
    gamma: float
    eos_token: int | None
    vocab_size: int
    num_prompts: int
    prompt_weights: torch.Tensor
    _past_mean: torch.Tensor | None = field(default=None, repr=False)

    @property
    def past_mean(self) -> torch.Tensor:
        """``E[c | t, prev] = C(t, prev) / m(t, prev)``, ``[H, R]`` (0 where ``m = 0``); see the module docstring."""
        if self._past_mean is None:
            with torch.no_grad(), _intra_op_threads(1):
                reach, past = forward_reach(self.logp.exp(), self.prompt_weights, self.eos_token, self.rewards,
                                            self.gamma)
                self._past_mean = torch.where(reach > 0, past / torch.where(reach > 0, reach, 1.0), 0.0)
        return self._past_mean

    @property
    def value_resp(self) -> torch.Tensor:
        """``E[V' | t, prev] = E[c | t, prev] + gamma^t V(t, prev)``, ``[H, R]``."""
        disc = self.gamma ** torch.arange(self.horizon, dtype=torch.float64)
        return self.past_mean + disc.unsqueeze(1) * self.value

    @property
    def horizon(self) -> int:
        return int(self.reach.shape[0])

    @property
    def q(self) -> torch.Tensor:
        """``Q(t, prev, w) = r(t, prev, w) + gamma [w non-terminal] V(t + 1, w)``, ``[H, R, V]``
        (a new tensor at each access)."""
        return torch.add(self.rewards, self.next_value.unsqueeze(1), alpha=self.gamma)

    @property
    def advantage(self) -> torch.Tensor:
        """``Q - V``, ``[H, R, V]`` (a new tensor at each access)."""
        return self.q.sub_(self.value.unsqueeze(2))

    def flat_grad(self) -> torch.Tensor:
        """All parameter gradients concatenated into one vector."""
        if self.grads is None:
            raise ValueError("gradient was not requested (solve_markov(..., with_grad=True))")
        return torch.cat([g.reshape(-1) for g in self.grads]) if self.grads else torch.zeros(0, dtype=torch.float64)

    def prompt_values(self) -> torch.Tensor:
        """``V'(s_1) = V(0, V + p) = E[RM | x = p]`` of each prompt, ``[P]``."""
        return self.value[0, self.vocab_size:].clone()


def _chain_rule(policy, grad_table: torch.Tensor, with_grad: bool) -> list[torch.Tensor] | None:
    """``dJ/d param`` from ``dJ/dtheta[:H]`` through the policy's logit table (the identity for a
    plain :class:`SharedSoftmax`, whose table is its one parameter)."""
    if not with_grad:
        return None
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        return []
    H = grad_table.shape[0]
    if len(params) == 1 and params[0] is policy.logits:
        if policy.logits.shape[0] == H and policy.logits.dtype == grad_table.dtype:
            return [grad_table]  # the same tensor as grad_logits: no copy of a [H, R, V] table
        full = torch.zeros(policy.logits.shape, dtype=policy.logits.dtype)
        full[:H] = grad_table.to(full.dtype)
        return [full]
    with torch.enable_grad():
        table = policy.logits[:H]
        got = torch.autograd.grad(table, params, grad_outputs=grad_table.to(table.dtype), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]


#: positions per block of the gradient pass (a [block, R, V] temporary stays in cache)
_BLOCK = 16


def _scale_by_advantage(pi: torch.Tensor, r: torch.Tensor, nxt: torch.Tensor, value: torch.Tensor,
                        weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """``pi * (Q - V) * weight`` written into ``pi`` (returned), a block of positions at a time."""
    H = pi.shape[0]
    for t0 in range(0, H, _BLOCK):
        b = slice(t0, min(H, t0 + _BLOCK))
        adv = torch.add(r[b], nxt[b].unsqueeze(1), alpha=gamma)
        adv.sub_(value[b].unsqueeze(2)).mul_(weight[b].unsqueeze(2))
        pi[b].mul_(adv)
    return pi


def solve_markov(mdp, policy, with_grad: bool = True, rewards: torch.Tensor | None = None,
                 gamma: float | None = None) -> MarkovSolution:
    """Exact ``J``, values, ``Q``, advantages, ``grad J``, reach and length distribution of a shared
    policy on compact rewards by the Markov dynamic programme (see the module docstring).

    ``rewards`` (a ``[H, V + P, V]`` table) and ``gamma`` override the MDP's (used for the KL and the
    entropy). ``ValueError`` when the policy is not a :class:`SharedSoftmax` of the MDP's shape or the
    rewards are not a :class:`CompactRewards` table (:func:`markov_unsupported_reason`). Cost
    ``O(H (V + P) V)``; no tree is built. ``Q``, ``Q - V``, ``E[c | t, prev]`` and ``E[V' | t, prev]``
    are computed on access (:class:`MarkovSolution`), so ``J`` and ``grad J`` pay for neither."""
    check_markov(mdp, policy)
    H, V, P, eos = mdp.horizon, mdp.vocab_size, mdp.num_prompts, mdp.eos_token
    R = V + P
    gamma = float(mdp.gamma) if gamma is None else _check_gamma(gamma)
    # the MDP's table was checked when the MDP was built; an override is checked here
    r = mdp.rewards.table.contiguous() if rewards is None else _check_table("rewards", rewards, (H, R, V))
    logp = shared_log_probs(policy, H)
    # Two [H, R, V] buffers in all (a fresh one costs more in page faults than the pass that fills
    # it): logp, and pi, which becomes the gradient in place; Q and Q - V are made on demand.
    with torch.no_grad(), _intra_op_threads(1):
        pi = logp.exp()
        value, nxt = backward_values(pi, r, gamma, eos)
        reach, _ = forward_reach(pi, mdp.prompt_weights, eos)
        disc = gamma ** torch.arange(H, dtype=torch.float64)
        weight = reach * disc.unsqueeze(1)  # gamma^t m(t, prev)
        grad_logits = _scale_by_advantage(pi, r, nxt, value, weight, gamma)
        del pi
        J = float((mdp.prompt_weights * value[0, V:]).sum())
        alive = reach.sum(1)  # P(T > t)
        length_probs = torch.empty(H, dtype=torch.float64)
        length_probs[:-1] = alive[:-1] - alive[1:]
        length_probs[-1] = alive[-1]
    grads = _chain_rule(policy, grad_logits, with_grad)
    return MarkovSolution(J=J, logp=logp, reach=reach, reachable=reachable_states(H, V, P, eos), value=value,
                          next_value=nxt, rewards=r, grad_logits=grad_logits, grads=grads,
                          length_probs=length_probs, expected_length=float(alive.sum()),
                          gamma=gamma, eos_token=eos, vocab_size=V, num_prompts=P,
                          prompt_weights=mdp.prompt_weights)


def markov_objective(mdp, policy, rewards: torch.Tensor | None = None, gamma: float | None = None) -> torch.Tensor:
    """``J`` as a differentiable scalar of the policy's parameters, by the forward pass only:

        J = sum_t gamma^t sum_prev m(t, prev) sum_w pi(w | t, prev) r(t, prev, w),

    with ``m`` pushed forward by differentiable products. Autograd through it is a check of
    :func:`solve_markov`'s analytic-score gradient that shares no code with it."""
    check_markov(mdp, policy)
    H, V, P, eos = mdp.horizon, mdp.vocab_size, mdp.num_prompts, mdp.eos_token
    gamma = float(mdp.gamma) if gamma is None else _check_gamma(gamma)
    r = _check_table("rewards", mdp.rewards.table if rewards is None else rewards, (H, V + P, V))
    # unbind, not pi[t]: the backward of H separate index ops would build H full-size gradients
    pi_t = torch.softmax(policy.logits[:H].to(torch.float64), dim=-1).unbind(0)
    r_t = r.unbind(0)
    keep = torch.ones(V, dtype=torch.float64)
    if eos is not None:
        keep[eos] = 0.0
    m = torch.cat([torch.zeros(V, dtype=torch.float64), mdp.prompt_weights])
    terms = []
    for t in range(H):
        terms.append(gamma ** t * torch.dot(m, (pi_t[t] * r_t[t]).sum(1)))
        if t + 1 < H:
            m = torch.cat([(m @ pi_t[t]) * keep, torch.zeros(P, dtype=torch.float64)])
    J = torch.stack(terms).sum()
    return J


# ---------------------------------------------------------------------------- KL, entropy
def _check_ref(mdp, policy, ref_policy) -> None:
    reason = markov_unsupported_reason(mdp, ref_policy)
    if reason is not None:
        raise ValueError(f"reference policy: {reason}")


def markov_kl(mdp, policy, ref_policy, with_grad: bool = True) -> tuple[float, list[torch.Tensor] | None]:
    """Sequence-level ``KL(pi || pi_ref) = E_x E_{W~pi} sum_t [log pi(w_t|s_t) - log pi_ref(w_t|s_t)]``
    of two shared policies, and its gradient in ``policy``'s parameters.

    The KL is the undiscounted objective of the reward ``log pi - log pi_ref``, a table over
    ``(t, prev, w)``; since ``E_pi[grad log pi(w | s)] = 0`` its gradient is the policy gradient of
    that reward held fixed (as in :func:`tpg.exact.exact_kl`). Returns ``(kl, grads)``."""
    check_markov(mdp, policy)
    _check_ref(mdp, policy, ref_policy)
    H = mdp.horizon
    r = shared_log_probs(policy, H) - shared_log_probs(ref_policy, H)
    sol = solve_markov(mdp, policy, with_grad=with_grad, rewards=r, gamma=1.0)
    return sol.J, sol.grads


def markov_entropy(mdp, policy, with_grad: bool = True) -> tuple[float, list[torch.Tensor] | None]:
    """Sequence entropy ``H(pi) = E_x E_{W~pi} sum_t -log pi(w_t | s_t)`` and its gradient.

    The undiscounted objective of the reward ``-log pi``; its gradient is the policy gradient of
    that reward held fixed plus ``E[-grad log pi] = 0``. Returns ``(entropy, grads)``."""
    check_markov(mdp, policy)
    sol = solve_markov(mdp, policy, with_grad=with_grad, rewards=-shared_log_probs(policy, mdp.horizon), gamma=1.0)
    return sol.J, sol.grads


# ---------------------------------------------------------------------------- per prefix
def prefix_states(mdp, prompt_b: torch.Tensor, prefix_bt: torch.Tensor,
                  prefix_len_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each prefix (its first ``prefix_len`` tokens): the state after it ``(t, prev)`` and
    whether it is complete (ends with EOS or has ``H`` tokens), as ``(t_b, prev_b, done_b)``.

    ``ValueError`` for a prompt, token or length out of range, or an EOS before the prefix's end."""
    H, V, eos = mdp.horizon, mdp.vocab_size, mdp.eos_token
    prompt_b, prefix_bt, prefix_len_b = checked_prefixes(mdp, prompt_b, prefix_bt, prefix_len_b)
    B, L = prefix_bt.shape
    before_last = torch.arange(L).expand(B, L) < (prefix_len_b - 1).unsqueeze(1)
    if eos is not None and bool((before_last & (prefix_bt == eos)).any()):
        raise ValueError("a continuation prefix runs past the end of its response (EOS before its last token)")
    last = prefix_bt.gather(1, (prefix_len_b - 1).clamp(min=0).unsqueeze(1)).squeeze(1) if L else prompt_b * 0
    prev_b = torch.where(prefix_len_b > 0, last, V + prompt_b)
    done_b = prefix_len_b >= H
    if eos is not None:
        done_b = done_b | ((prefix_len_b > 0) & (last == eos))
    return prefix_len_b, prev_b, done_b


def path_token_rewards(mdp, prompt_b: torch.Tensor, tokens_bt: torch.Tensor, mask_bt: torch.Tensor,
                       table: torch.Tensor | None = None) -> torch.Tensor:
    """``r(t, prev_t, w_t)`` of every token of a batch from a ``[H, R, V]`` table (the MDP's compact
    rewards by default), ``[B, L]``, 0 where ``mask_bt`` is False (``L <= H`` columns)."""
    table = mdp.rewards.table if table is None else table
    B, L = tokens_bt.shape
    if L == 0:
        return torch.zeros(B, 0, dtype=torch.float64)
    prev = torch.empty_like(tokens_bt)
    prev[:, 0] = mdp.vocab_size + prompt_b
    prev[:, 1:] = tokens_bt[:, :-1]
    pos = torch.arange(L).expand(B, L)
    r = table[pos, prev, tokens_bt.clamp(0, mdp.vocab_size - 1)]
    return torch.where(mask_bt, r, torch.zeros((), dtype=torch.float64))


def prefix_response_values(mdp, sol: MarkovSolution, prompt_b, prefix_bt, prefix_len_b) -> torch.Tensor:
    """Exact ``V'(prefix) = E[RM(W) | prefix] = c(prefix) + gamma^L V(L, prev_L)`` of each given
    prefix (``c`` summed along it, ``L`` its length), ``[B]``; ``RM(prefix)`` for a complete one."""
    t_b, prev_b, done_b = prefix_states(mdp, prompt_b, prefix_bt, prefix_len_b)
    prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
    prefix_bt = torch.as_tensor(prefix_bt, dtype=torch.long)
    L = prefix_bt.shape[1]
    mask = torch.arange(L).expand(prefix_bt.shape[0], L) < t_b.unsqueeze(1)
    r = path_token_rewards(mdp, prompt_b, prefix_bt, mask)
    c = r @ (sol.gamma ** torch.arange(L, dtype=torch.float64)) if L else torch.zeros(t_b.numel(), dtype=torch.float64)
    future = sol.value[t_b.clamp(max=sol.horizon - 1), prev_b] * sol.gamma ** t_b.to(torch.float64)
    return torch.where(done_b, c, c + future)


__all__ = ["ENGINES", "MarkovSolution", "backward_values", "check_markov", "choose_engine", "forward_reach",
           "markov_entropy", "markov_kl", "markov_objective", "markov_unsupported_reason", "path_token_rewards",
           "prefix_response_values", "prefix_states", "reachable_states", "shared_log_probs", "solve_markov",
           "state_rows", "terminal_tokens", "zra_value_tables"]
