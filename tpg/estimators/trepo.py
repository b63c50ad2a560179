"""TRePO (the paper's Trajectory-based Policy Optimisation; VinePPO's sampling scheme): per-step
advantages from Monte Carlo continuations, no critic (Theorem 2).

Notation. A response ``W = w_1 .. w_T``; the state before token ``t`` is the prefix of length
``t - 1``, so states are indexed by prefix length ``j = 0 .. T`` (``j = 0`` the prompt, ``j = T``
the complete response). ``V^(j)`` estimates ``V'(s_{j+1}) = E[RM(W) | first j tokens]`` as the
mean ``RM`` of ``K`` continuations of the prefix (``ctx.continuation_values``), except
``V^(T) = RM(W)`` itself. Theorem 2: ``grad J = E sum_t (V'(s_{t+1}) - V'(s_t)) grad log pi``.

Anchors are prefix lengths where ``V^`` is estimated; ``0`` and ``T`` always are.

* ``anchors=all``: every ``j``.
* ``anchors=every:k``: multiples of ``k``.
* ``anchors=random:m``: ``m`` distinct positions drawn uniformly from ``1 .. H-1`` (the horizon,
  independently of the response; positions ``>= T`` are dropped). Drawing them within
  ``1 .. T-1`` would make the segment start ``a`` of a token depend on the response's future
  length (through EOS), a baseline that is not a function of the state: biased.
* ``anchors=segments:d``: after every occurrence of the delimiter token ``d`` (VinePPO's
  reasoning steps); the segment end is then a stopping time, which keeps the martingale argument.

Fills (how tokens get advantages from the anchors):

* ``fill=segment``: token ``t`` in the segment ``a < t <= b`` between consecutive anchors gets
  ``V^(b) - V^(a)``. Unbiased: given the state ``s_t``, ``V^(a)`` is a baseline and
  ``E[V^(b) | s_{t+1}] = V'(s_{t+1})`` (optional stopping; ``V'`` is a martingale). With
  ``anchors=all`` it is the per-step advantage ``V^(t) - V^(t-1)``.
* ``fill=interpolate``, as the paper describes TRePO: per-step MC advantages
  ``D_t = V^(t) - V^(t-1)`` at the anchor steps (the step leaving each anchor, and the last step
  ``T``), linear interpolation between neighbouring anchor steps ``p < t < q``:
  ``A_t = D_p + (t - p) / (q - p) (D_q - D_p)``. **Biased**: an interpolated token gets its
  neighbours' credit, not its own.
* ``fill=ipw``: ``m`` steps drawn uniformly from the response's ``1 .. T``; a chosen step gets
  ``D_t / P(t chosen) = D_t T / min(m, T)``, the others 0. Unbiased (given the response, each
  step's expected advantage is ``D_t``). Needs ``anchors=random:m`` (or ``all``, where every step
  is chosen with probability 1); fixed anchor sets give non-anchor steps probability 0.

With ``kl=k1_reward`` every token also carries ``- beta sum_{k >= t} Delta_k`` (the sampled
reward-to-go of the penalty, unbiased for ``- beta grad KL_seq``).

Exact mode (``ctx.exact``): ``continuation_values`` returns ``V'`` exactly; every fill is linear
in ``V^``, so the output is the expectation over the continuations. It is also the expectation
over the anchor randomness: ``ipw`` gives every step ``D_t`` (its expected weight is 1);
``random:m`` with ``segment``/``interpolate`` averages the fill over all ``C(H-1, m)`` anchor
subsets (each equally likely), and refuses (``ValueError``) beyond :data:`MAX_EXACT_SUBSETS`.

Cost: ``tokens_spent`` is the context's count (``ctx.tokens_sampled``) of continuation tokens
(``K`` times the continuation lengths beyond the prefixes); ``info['prefixes']`` counts the
prefixes valued. In exact mode with fixed anchors only the prefixes a draw needs are valued, so
an exact context that counts expected tokens gives the expected cost; with random anchors every
prefix is valued to average over the draws, and ``tokens_spent`` is 0 (``info`` says why).
"""

from __future__ import annotations

import itertools
import math

import torch

from .estimator import Estimator, tokens_between, tokens_counter
from .functional import discounted_returns
from .options import ESTIMATOR_OPTIONS, FILLS, parse_anchors  # noqa: F401  (re-exported)

MAX_EXACT_SUBSETS = 5000


def anchor_states(kind: str, arg: int | None, tokens_bt: torch.Tensor, mask_bt: torch.Tensor,
                  length_b: torch.Tensor, interior_bj: torch.Tensor | None = None) -> torch.Tensor:
    """Anchor prefix lengths ``[B, H+1]`` (bool): 0 and ``T`` always, plus the anchors of ``kind``.

    For ``random`` pass the drawn interior positions ``interior_bj [B, H+1]`` (``j`` in ``1 .. H-1``)."""
    B, H = tokens_bt.shape
    j = torch.arange(H + 1).unsqueeze(0)
    T = length_b.unsqueeze(1)
    anchors = (j == 0) | (j == T)
    inside = (j > 0) & (j < T)
    if kind == "all":
        return anchors | inside
    if kind == "every":
        return anchors | (inside & (j % arg == 0))
    if kind == "segments":
        after = torch.zeros(B, H + 1, dtype=torch.bool)
        after[:, 1:] = (tokens_bt == arg) & mask_bt
        return anchors | (inside & after)
    if kind == "random":
        return anchors | (inside & interior_bj)
    raise ValueError(f"unknown anchor kind {kind!r}")


def segment_fill(values_bj: torch.Tensor, anchors_bj: torch.Tensor, length_b: torch.Tensor) -> torch.Tensor:
    """``A_t = V^(b) - V^(a)`` for ``a < t <= b`` consecutive anchors, ``[B, H]`` (0 past ``T``)."""
    B, H1 = values_bj.shape
    H = H1 - 1
    j = torch.arange(H1).expand(B, H1)
    last = torch.where(anchors_bj, j, torch.full_like(j, -1)).cummax(1).values
    nxt = torch.where(anchors_bj, j, torch.full_like(j, H1)).flip(1).cummin(1).values.flip(1)
    a = last[:, :H].clamp(min=0)
    b = nxt[:, 1:].clamp(max=H)
    adv = values_bj.gather(1, b) - values_bj.gather(1, a)
    return adv * (torch.arange(1, H + 1).unsqueeze(0) <= length_b.unsqueeze(1))


def interpolate_fill(values_bj: torch.Tensor, anchors_bj: torch.Tensor, length_b: torch.Tensor) -> torch.Tensor:
    """Per-step ``D_t = V^(t) - V^(t-1)`` at the anchor steps (leaving an anchor, and ``T``), linear
    interpolation in ``t`` between neighbouring anchor steps, ``[B, H]`` (0 past ``T``)."""
    B, H1 = values_bj.shape
    H = H1 - 1
    t = torch.arange(1, H + 1).unsqueeze(0)
    T = length_b.unsqueeze(1)
    steps = (anchors_bj[:, :H] | (t == T)) & (t <= T)
    D = values_bj[:, 1:] - values_bj[:, :-1]
    col = torch.arange(H).expand(B, H)
    p = torch.where(steps, col, torch.full_like(col, -1)).cummax(1).values
    q = torch.where(steps, col, torch.full_like(col, H)).flip(1).cummin(1).values.flip(1)
    pc, qc = p.clamp(min=0), q.clamp(max=H - 1)
    Dp, Dq = D.gather(1, pc), D.gather(1, qc)
    span = (qc - pc).to(D.dtype)
    frac = torch.where(span > 0, (col - pc).to(D.dtype) / span.clamp(min=1), torch.zeros_like(span))
    adv = Dp + frac * (Dq - Dp)
    return adv * (t <= T)


class TRePO(Estimator):
    """TRePO: Monte Carlo per-step advantages from continuations (Theorem 2), no critic.

    Advantage (``fill=segment``, the default): ``A_t = V^(s_b) - V^(s_a)`` for token ``t`` with
    ``s_a <= s_t < s_b``, consecutive anchor states, ``V^`` = mean ``RM`` of ``K`` continuations of the prefix,
    ``V^(s_{T+1}) = RM(W)``, ``V^(s_1)`` the prompt's value from ``K`` continuations too.
    ``fill=interpolate``: MC advantages at the anchor steps, linear interpolation between.
    ``fill=ipw``: MC advantages at ``m`` random steps divided by their inclusion probability.
    Expected gradient: ``grad J`` for ``segment`` (any anchors) and ``ipw``; biased for
    ``interpolate`` (except ``anchors=all``). See the module docstring for the anchors, the
    exact-mode expectation over the anchor randomness, and the cost accounting.
    """

    name = "trepo"
    OPTIONS = ESTIMATOR_OPTIONS["trepo"]

    def _check_options(self) -> None:
        kind, _ = self.options["anchors"]
        if self.options["fill"] == "ipw" and kind not in ("all", "random"):
            raise ValueError(f"{self.name}: fill=ipw needs anchors=random:M (or all): with fixed anchors "
                             f"'{kind}' the other steps have inclusion probability 0")

    def compute(self, batch, ctx, penalty_bt):
        hook = self._need_ctx(ctx, "continuation_values")
        B, H = batch.mask.shape
        dt = batch.rm.dtype
        kind, arg = self.options["anchors"]
        fill = self.options["fill"]
        K = self.options["K"]
        exact = bool(getattr(ctx, "exact", False))
        T = batch.length
        j = torch.arange(H + 1).unsqueeze(0)
        before_T = j < T.unsqueeze(1)
        if kind == "segments" and not 0 <= arg < batch.vocab_size:
            raise ValueError(f"{self.name}: anchors=segments:{arg}: the delimiter must be a token in "
                             f"[0, {batch.vocab_size - 1}]")
        info: dict = {}
        before = tokens_counter(ctx)
        if exact and kind == "random":
            # expectation over the anchor draws: V' at every prefix, the fill averaged over the draws
            values = self._values(batch, hook, before_T, K)
            if fill == "ipw":
                adv = (values[:, 1:] - values[:, :-1]) * batch.mask
            else:
                adv = self._expected_over_subsets(values, batch, arg, fill)
            info["prefixes"] = int(before_T.sum())
            info["continuations"] = info["prefixes"] * K
            tokens_between(ctx, before, info)
            spent = 0
            info["tokens_spent_note"] = ("exact mode with random anchors: every prefix was valued to average "
                                         "over the draws; the expected cost of one draw is not computed")
            info.pop("tokens_expected", None)
        else:
            gen = self._need_ctx(ctx, "random_generator")() if kind == "random" else None
            if fill == "ipw":
                chosen_bt, scale_b = self._ipw_steps(batch, arg if kind == "random" else H, gen)
                need = torch.zeros(B, H + 1, dtype=torch.bool)
                need[:, :H] |= chosen_bt
                need[:, 1:] |= chosen_bt
                need &= before_T
                values = self._values(batch, hook, need, K)
                adv = (values[:, 1:] - values[:, :-1]) * chosen_bt * scale_b.unsqueeze(1)
            else:
                interior = self._draw_interior(B, H, arg, gen) if kind == "random" else None
                anchors = anchor_states(kind, arg, batch.tokens, batch.mask, T, interior)
                need = anchors.clone()
                if fill == "interpolate":
                    t = torch.arange(1, H + 1).unsqueeze(0)
                    steps = (anchors[:, :H] | (t == T.unsqueeze(1))) & (t <= T.unsqueeze(1))
                    need[:, :H] |= steps
                    need[:, 1:] |= steps
                need &= before_T
                values = self._values(batch, hook, need, K)
                adv = self._fill(fill, values, anchors, T)
            info["prefixes"] = int(need.sum())
            info["continuations"] = info["prefixes"] * K
            spent = tokens_between(ctx, before, info)
        if penalty_bt is not None:
            adv = adv - discounted_returns(penalty_bt, batch.mask, 1.0)
        return adv.to(dt), spent, info

    # -- pieces --------------------------------------------------------------------------------

    @staticmethod
    def _fill(fill: str, values, anchors, T):
        return segment_fill(values, anchors, T) if fill == "segment" else interpolate_fill(values, anchors, T)

    def _values(self, batch, hook, need_bj: torch.Tensor, K: int) -> torch.Tensor:
        """``V^ [B, H+1]``: continuation values at the needed prefix lengths (< T), ``RM`` at ``T``,
        0 elsewhere. One call to the hook for all prefixes."""
        B, H = batch.mask.shape
        dt = batch.rm.dtype
        values = torch.zeros(B, H + 1, dtype=dt)
        rows, lens = torch.nonzero(need_bj, as_tuple=True)
        if rows.numel():
            v = torch.as_tensor(hook(batch.prompt[rows], batch.tokens[rows], lens, K))
            if v.shape != (rows.numel(),):
                raise ValueError(f"{self.name}: ctx.continuation_values must return shape [N] = [{rows.numel()}], "
                                 f"got {list(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{self.name}: ctx.continuation_values returned non-finite values")
            values[rows, lens] = v.to(dt)
        values[torch.arange(B), batch.length] = batch.rm.to(dt)
        return values

    @staticmethod
    def _draw_interior(B: int, H: int, m: int, gen) -> torch.Tensor:
        """``m`` distinct interior anchors per row, uniform over ``1 .. H-1``, as a ``[B, H+1]`` mask."""
        interior = torch.zeros(B, H + 1, dtype=torch.bool)
        n = H - 1
        if n <= 0:
            return interior
        if m >= n:
            interior[:, 1:H] = True
            return interior
        keys = torch.rand(B, n, generator=gen, dtype=torch.float64)
        picked = keys.argsort(1)[:, :m] + 1
        interior.scatter_(1, picked, True)
        return interior

    @staticmethod
    def _ipw_steps(batch, m: int, gen):
        """``min(m, T)`` distinct steps per row, uniform over ``1 .. T``, and the weight ``T / min(m, T)``."""
        B, H = batch.mask.shape
        T = batch.length
        if gen is None:  # anchors=all: every step, probability 1
            return batch.mask.clone(), torch.ones(B, dtype=batch.rm.dtype)
        keys = torch.rand(B, H, generator=gen, dtype=torch.float64)
        keys = torch.where(batch.mask, keys, torch.full_like(keys, 2.0))
        rank = keys.argsort(1).argsort(1)
        chosen = (rank < m) & batch.mask
        n = T.clamp(max=m).clamp(min=1).to(batch.rm.dtype)
        return chosen, T.to(batch.rm.dtype) / n

    def _expected_over_subsets(self, values, batch, m: int, fill: str) -> torch.Tensor:
        """The fill averaged over all ``C(H-1, m)`` equally likely interior anchor sets."""
        B, H = batch.mask.shape
        n = H - 1
        T = batch.length
        if n <= 0 or m >= n:
            anchors = anchor_states("all", None, batch.tokens, batch.mask, T)
            return self._fill(fill, values, anchors, T)
        count = math.comb(n, m)
        if count > MAX_EXACT_SUBSETS:
            raise ValueError(f"{self.name}: the exact expectation over random:{m} anchors averages C({n}, {m}) = "
                             f"{count} anchor sets, more than {MAX_EXACT_SUBSETS}; use a smaller or larger m, "
                             f"fixed anchors, or a Monte Carlo context")
        subsets = torch.zeros(count, H + 1, dtype=torch.bool)
        for s, combo in enumerate(itertools.combinations(range(1, H), m)):
            subsets[s, list(combo)] = True
        total = torch.zeros(B, H, dtype=values.dtype)
        chunk = max(1, 2_000_000 // max(1, B * (H + 1)))
        for start in range(0, count, chunk):
            sub = subsets[start:start + chunk]
            c = sub.shape[0]
            interior = sub.unsqueeze(1).expand(c, B, H + 1).reshape(c * B, H + 1)
            tok = batch.tokens.repeat(c, 1)
            msk = batch.mask.repeat(c, 1)
            Tc = T.repeat(c)
            anchors = anchor_states("random", m, tok, msk, Tc, interior)
            adv = self._fill(fill, values.repeat(c, 1), anchors, Tc)
            total += adv.view(c, B, H).sum(0)
        return total / count


__all__ = ["TRePO", "parse_anchors", "anchor_states", "segment_fill", "interpolate_fill", "FILLS"]
