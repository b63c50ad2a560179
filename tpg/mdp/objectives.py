"""Objectives other than the token rewards: a response-level target reward ``R_target``.

A trainer that shapes its reward (a length penalty, DAPO's overlong punishment, clipping, a reward
function of its own) follows the gradient of

    J_target(theta) = E_{x ~ rho} E_{W ~ pi_theta(.|x)} R_target(x, W),

not of ``J = E[RM(W)]``. To check an estimator against that objective, :func:`with_target_reward`
replaces the MDP's token rewards by ``R_target`` on each response's last token, zero elsewhere,

    r_target(s_t, w_t) = 1[t = T] R_target(x, W) / gamma^(T - 1),

(divided by ``gamma^(T - 1)`` so that the discounted sum is ``R_target``, as the zero-reward twin does).
On the derived MDP the exact engine's ``J`` and ``grad J`` are ``J_target`` and ``grad J_target`` (the
tree DP with a terminal reward), and every batch an estimator sees carries ``R_target`` as its ``RM``
(and on the last token of its ``token_level_rewards``), as the user's trainer would feed it. The
token-level oracle and a critic see the terminal reward too: a response-level objective has no
token decomposition. The exact solution of the derived MDP comes from the stored tree (the Markov
engine takes compact token rewards only, and ``R_target`` depends on the whole response).

``R_target(x, W) = f(RM(W), T, W, x)``, with ``RM`` the MDP's own (discounted) response reward and
``T`` the response's length in tokens (EOS included). The built-in forms (``tpg verify
--target-reward``; :data:`~tpg.mdp.specs.TARGET_REWARDS`):

* ``rm``: ``R = RM`` (the default; the MDP is returned unchanged);
* ``length_penalty:alpha``: ``R = RM - alpha T``, so ``grad J_target = grad J - alpha grad E[T]``;
* ``scaled:c``: ``R = c RM``;
* ``clip:lo,hi``: ``R = min(max(RM, lo), hi)``;
* ``overlong:L,cache``: DAPO's soft overlong punishment, ``R = RM + p(T)`` with ``p = 0`` for
  ``T <= L - cache``, ``(L - cache - T) / cache`` up to ``T = L``, ``-1`` past it;
* a Python callable (or ``FILE.py:FUNCTION``, loaded by the verifier) called with the keywords it
  names among ``rm [B]`` (float64), ``length [B]`` (long), ``tokens [B, H]`` (long, 0 past the end),
  ``mask [B, H]`` (bool) and ``prompt [B]`` (long), returning ``B`` finite rewards. It must be a
  function of each response alone: it is called on arbitrary sets of responses (all of the tree's at
  once, then each sampled batch), and a function whose rows depend on each other is refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .mdp import TokenMDP
from .rewards import Rewards, discounted_prefix_sums
from .specs import TARGET_REWARDS, parse_target_reward

#: The keywords a target-reward callable may take.
TARGET_KEYWORDS = ("rm", "length", "tokens", "mask", "prompt")


@dataclass(frozen=True)
class TargetReward:
    """A response-level reward ``R_target`` (see the module docstring).

    Attributes:
        name: how records name it (``length_penalty:0.1``, ``module.qualname`` of a callable).
        fn: ``fn(**{k: v for k in keywords}) -> [B]``.
        keywords: the keywords of :data:`TARGET_KEYWORDS` ``fn`` takes.
        spec: the ``--target-reward`` spec that rebuilds it, or ``None`` (a callable without a file).
    """

    name: str
    fn: Callable
    keywords: tuple[str, ...]
    spec: str | None = None

    @property
    def is_identity(self) -> bool:
        """Whether this is ``R = RM`` (no change of objective)."""
        return self.name == "rm"

    def __call__(self, rm_b: torch.Tensor, length_b: torch.Tensor, tokens_bt: torch.Tensor, mask_bt: torch.Tensor,
                 prompt_b: torch.Tensor) -> torch.Tensor:
        """``R_target`` of ``B`` responses, ``[B]`` float64; ``ValueError`` naming the target for a
        wrong shape, a non-finite value or an exception of its own."""
        B = rm_b.shape[0]
        if tokens_bt.shape != mask_bt.shape or tokens_bt.shape[0] != B or length_b.shape != (B,) \
                or prompt_b.shape != (B,):
            raise AssertionError("target reward: inconsistent shapes")  # a bug of the caller, not the user's
        tokens_bt = torch.where(mask_bt, tokens_bt, torch.zeros((), dtype=tokens_bt.dtype))
        args = {"rm": rm_b.to(torch.float64), "length": length_b.to(torch.long), "tokens": tokens_bt.to(torch.long),
                "mask": mask_bt, "prompt": prompt_b.to(torch.long)}
        try:
            out = self.fn(**{k: args[k].clone() for k in self.keywords})
        except Exception as exc:  # the user's code: say whose
            raise ValueError(f"target reward {self.name} raised {type(exc).__name__}: {exc}") from exc
        try:
            r = torch.as_tensor(out, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"target reward {self.name} returned {type(out).__name__}, expected {B} numbers") \
                from exc
        if r.shape != (B,):
            raise ValueError(f"target reward {self.name} returned shape {list(r.shape)}, expected [{B}] (one "
                             f"reward per response)")
        if not bool(torch.isfinite(r).all()):
            i = int(torch.nonzero(~torch.isfinite(r))[0])
            raise ValueError(f"target reward {self.name} returned a non-finite value {float(r[i])} for response {i}")
        return r


def _builtin(kind: str, args: tuple) -> Callable:
    if kind == "rm":
        return lambda rm: rm
    if kind == "length_penalty":
        (alpha,) = args
        return lambda rm, length: rm - alpha * length.to(torch.float64)
    if kind == "scaled":
        (c,) = args
        return lambda rm: c * rm
    if kind == "clip":
        lo, hi = args
        return lambda rm: rm.clamp(lo, hi)
    L, cache = args

    def overlong(rm, length):
        t = length.to(torch.float64)
        soft = (L - cache - t) / cache
        p = torch.where(t <= L - cache, torch.zeros_like(t), torch.where(t <= L, soft, -torch.ones_like(t)))
        return rm + p

    return overlong


def _keywords_of(fn, name: str) -> tuple[str, ...]:
    """The keywords of :data:`TARGET_KEYWORDS` that ``fn`` takes (all of them with ``**kwargs``);
    ``ValueError`` for a required parameter outside them, or none of them."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise ValueError(f"target reward {name}: cannot read its signature ({exc})") from None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return TARGET_KEYWORDS
    required = [p.name for p in params.values() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    unknown = [k for k in required if k not in TARGET_KEYWORDS]
    positional_only = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_ONLY
                       and p.name in TARGET_KEYWORDS]
    if unknown or positional_only:
        bad = unknown or positional_only
        raise ValueError(f"target reward {name}: it is called by keyword with some of {', '.join(TARGET_KEYWORDS)}; "
                         f"its parameter{'s' if len(bad) > 1 else ''} {', '.join(bad)} "
                         f"{'are' if len(bad) > 1 else 'is'} not one of them (or positional-only)")
    keys = tuple(k for k in TARGET_KEYWORDS if k in params)
    if not keys:
        raise ValueError(f"target reward {name}: it takes none of the keywords {', '.join(TARGET_KEYWORDS)}")
    return keys


def callable_name(fn) -> str:
    """``module.qualname`` of a callable (the class's for a callable object)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', None) or '?'}.{getattr(target, '__qualname__', type(fn).__name__)}"


def target_reward(target, name: str | None = None, spec: str | None = None) -> TargetReward:
    """A :class:`TargetReward` from a built-in spec (``rm``, ``length_penalty:alpha``, ``scaled:c``,
    ``clip:lo,hi``, ``overlong:L,cache``), a Python callable (see the module docstring), a
    :class:`TargetReward` (returned as it is) or ``None`` (``rm``). ``name`` and ``spec`` label a callable
    (default name: ``module.qualname``). ``FILE.py:FUNCTION`` is loaded by the verifier
    (:func:`tpg.verify.harness.resolve_target_reward`), not here."""
    if target is None:
        target = "rm"
    if isinstance(target, TargetReward):
        return target
    if isinstance(target, str):
        kind, args = parse_target_reward(target)
        if kind == "file":
            raise ValueError(f"target reward {target!r}: load FILE.py:FUNCTION with "
                             f"tpg.verify.harness.resolve_target_reward (or pass the function)")
        text = kind if kind == "rm" else f"{kind}:{','.join(format(a, 'g') for a in args)}"
        fn = _builtin(kind, args)
        return TargetReward(text, fn, _keywords_of(fn, text), spec=text)
    if callable(target) and not isinstance(target, type):
        label = name or callable_name(target)
        return TargetReward(label, target, _keywords_of(target, label), spec=spec)
    raise ValueError(f"a target reward is a spec ({', '.join(TARGET_REWARDS)}, FILE.py:FUNCTION) or a callable, "
                     f"got {target!r}")


class ResponseRewards(Rewards):
    """The token rewards of a target reward: ``R_target(x, W) / gamma^(T-1)`` on each response's last
    token, 0 elsewhere, with ``R_target`` computed from ``base``'s ``RM`` (see the module docstring)."""

    def __init__(self, base: Rewards, target: TargetReward):
        self.base = base
        self.target = target
        self.needs_tree = base.needs_tree

    def validate(self, mdp) -> None:
        self.base.validate(mdp)

    def edge_rewards(self, mdp, tree):
        rm_n = discounted_prefix_sums(tree, self.base.edge_rewards(mdp, tree), mdp.gamma)
        leaves = tree.leaf_ids
        _, tok_lt, length_l = tree.leaf_paths()
        mask_lt = torch.arange(tree.horizon).unsqueeze(0) < length_l.unsqueeze(1)
        args = (rm_n[leaves], length_l, tok_lt, mask_lt, tree.prompt_n[leaves])
        r_l = self.target(*args)
        _check_row_wise(self.target, r_l, args)
        out = torch.zeros(tree.num_nodes, dtype=torch.float64)
        out[leaves] = r_l / mdp.gamma ** (length_l - 1).to(torch.float64)
        return out

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        base = self.base.rollout_rewards(mdp, prompt_b, tokens_bt, mask_bt, child_bt)
        H = tokens_bt.shape[1]
        rm_b = (base * mdp.gamma ** torch.arange(H, dtype=torch.float64)).sum(1)
        length_b = mask_bt.sum(1)
        out = torch.zeros_like(base)
        rows = torch.nonzero(length_b > 0).flatten()
        if rows.numel():
            r = self.target(rm_b[rows], length_b[rows], tokens_bt[rows], mask_bt[rows], prompt_b[rows])
            last = length_b[rows] - 1
            out[rows, last] = r / mdp.gamma ** last.to(torch.float64)
        return out


def _check_row_wise(target: TargetReward, r_l: torch.Tensor, args: tuple) -> None:
    """``ValueError`` unless ``target`` gives each response the same reward when called on the two
    halves of the responses apart: a reward whose rows depend on each other (a batch normalisation)
    is not a response-level reward, and its exact objective would not be what the batches see."""
    n = r_l.shape[0]
    if n < 2:
        return
    half = n // 2
    parts = [target(*(a[:half] for a in args)), target(*(a[half:] for a in args))]
    gap = float((torch.cat(parts) - r_l).abs().max())
    if gap > 1e-12 * max(1.0, float(r_l.abs().max())):
        raise ValueError(f"target reward {target.name} is not a function of each response alone: called on the "
                         f"responses in two halves it gives rewards up to {gap:.3g} apart from one call on all of "
                         f"them (a batch statistic such as a mean or a normalisation?)")


def with_target_reward(mdp: TokenMDP, target) -> TokenMDP:
    """``mdp`` with its rewards replaced by :class:`ResponseRewards` of ``target`` (anything
    :func:`target_reward` takes); ``mdp`` itself for ``rm``. The name gains ``/target=NAME``; a task
    or LM MDP keeps its prompts (its ``_derive``)."""
    t = target_reward(target)
    if t.is_identity:
        return mdp
    base = mdp.rewards
    rewards = ResponseRewards(base, t)
    name = f"{mdp.name}/target={t.name}"
    derive = getattr(mdp, "_derive", None)
    if derive is not None:
        out = derive(rewards, mdp.gamma, name)
    else:
        out = TokenMDP(mdp.vocab_size, mdp.horizon, mdp.prompt_weights.clone(), rewards, mdp.eos_token, mdp.gamma,
                       mdp.max_nodes, name=name, tree=mdp._tree)
    if out.tree_fits():
        out.edge_rewards()  # evaluate R_target on every response now: its errors speak before any verdict
    return out


def describe_target(t: TargetReward) -> str:
    """A one-line description: the formula of a built-in, the name of a callable."""
    kind = t.name.partition(":")[0]
    if t.spec is not None and kind in TARGET_REWARDS:
        return f"{t.name}: {TARGET_REWARDS[kind][1]}"
    return f"{t.name}: a user-defined R(x, W)"


__all__ = ["TargetReward", "ResponseRewards", "target_reward", "with_target_reward", "describe_target",
           "TARGET_KEYWORDS", "callable_name"]
