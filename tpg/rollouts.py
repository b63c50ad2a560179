"""The rollout batch type and the vectorised, seeded samplers.

:func:`sample` draws ``N`` prompts from ``rho`` and ``G`` responses for each (a group);
:func:`sample_continuations` completes ``K`` responses from each of a set of given
prefixes (the Monte Carlo continuations TRePO and VinePPO need). Both use one code path:
a row-parallel loop over positions in which the first ``prefix_len`` tokens of a row are
forced and the rest are sampled from random bits drawn up front with a ``torch.Generator``,
so a seed fixes the batch exactly. Policies with a finite table of next-token distributions
are sampled by Walker's alias method (O(1) per token, :func:`alias_tables`); others by
inverse CDF of their ``step_log_probs``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import _guards
from ._guards import check_fits
from ._threads import intra_op_threads as _intra_op_threads
from .mdp.mdp import TokenMDP, checked_prefixes
from .mdp.rewards import CompactRewards

PAD_TOKEN = 0


@dataclass
class Rollouts:
    """A batch of ``B`` complete responses (time axis padded to the horizon ``H``).

    Attributes:
        prompt: prompt id of each response, ``[B]``.
        group: group id, ``[B]``: responses sampled for the same prompt draw (or continued from
            the same prefix) share it.
        tokens: response tokens ``[B, H]``, ``PAD_TOKEN`` after the end.
        mask: ``[B, H]`` bool, True on the response's tokens.
        logp: ``log pi(w_t | s_t)`` under the sampling policy, ``[B, H]`` float64 (0 on padding).
        token_rewards: true token rewards ``r(s_t, w_t)``, ``[B, H]`` float64 (0 on padding).
        rm: response-level reward ``RM(W) = sum_t gamma^(t-1) r_t``, ``[B]`` float64.
        length: number of tokens ``T``, ``[B]``.
        prefix_len: number of leading tokens that were given rather than sampled, ``[B]``.
        nodes: node id of the state ``s_t`` before each token, ``[B, H]`` (-1 on padding), or
            ``None`` when the tree is not stored.
        leaf: node id of the complete response, ``[B]``, or ``None``.
        gamma, vocab_size, horizon: of the MDP that produced the batch.
    """

    prompt: torch.Tensor
    group: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    token_rewards: torch.Tensor
    rm: torch.Tensor
    length: torch.Tensor
    prefix_len: torch.Tensor
    nodes: torch.Tensor | None
    leaf: torch.Tensor | None
    gamma: float
    vocab_size: int
    horizon: int

    @property
    def batch_size(self) -> int:
        return int(self.prompt.numel())

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch (forced prefix tokens excluded: they cost no sampling)."""
        return int(self.mask.sum() - self.prefix_len.clamp(max=self.horizon).sum())

    def index(self, rows: torch.Tensor) -> "Rollouts":
        """The sub-batch of the given rows."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return Rollouts(**kw)


def cat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """The rows of ``parts`` (batches of one MDP, each group a contiguous run of rows) in order, as one
    batch; group ids keep each part's groups apart and are renumbered ``0, 1, ...`` in row order."""
    if not parts:
        raise ValueError("cat_rollouts needs at least one batch")
    first = parts[0]
    kw = {}
    for f in fields(first):
        vals = [getattr(r, f.name) for r in parts]
        if isinstance(vals[0], torch.Tensor):
            kw[f.name] = torch.cat(vals)
        elif vals[0] is None:
            kw[f.name] = None
        else:
            if any(v != vals[0] for v in vals[1:]):
                raise ValueError(f"cat_rollouts: the batches differ in {f.name}")
            kw[f.name] = vals[0]
    offset, groups = 0, []
    for r in parts:
        groups.append(r.group + offset)
        offset += int(r.group.max()) + 1 if r.batch_size else 0
    _, kw["group"] = torch.unique_consecutive(torch.cat(groups), return_inverse=True)
    return Rollouts(**kw)


# ---------------------------------------------------------------------------- size guards
#: Bytes every sampled (response, position) cell holds at least: an int64 token, a float64
#: log-probability and a float64 token reward (the batch also holds a mask, node ids and per-row
#: fields, and the Monte Carlo test keeps a float64 coefficient, an int64 state index and an int64
#: token per cell: again 24 bytes). A lower bound, so the guard never refuses a batch that fits.
MIN_BYTES_PER_CELL = 24


def sampled_batch_bytes(rows, horizon) -> float:
    """A lower bound on the bytes of ``rows`` sampled responses padded to ``horizon`` positions::

        bytes >= rows * horizon * MIN_BYTES_PER_CELL

    in floating point (O(1), no overflow for absurd sizes)."""
    return float(rows) * float(horizon) * MIN_BYTES_PER_CELL


def check_batches_fit(horizon: int | None, group_size: int, num_groups: int = 1, *, group_flag: str = "--group-size",
                      groups_flag: str | None = None, budget: int | None = None) -> None:
    """Refuse, in O(1) and before any allocation, ``num_groups`` groups of ``group_size`` sampled
    responses whose tensors cannot fit in this machine's memory (:func:`sampled_batch_bytes` against
    :func:`tpg._guards.memory_budget_bytes`).

    ``horizon=None`` (not known yet) counts one position per response. The one-line
    ``ValueError`` names ``group_flag`` when one group alone does not fit, else ``groups_flag``
    (the number of groups: ``--prompts``, ``--samples``); ``groups_flag=None`` checks one group only."""
    cells = 1 if horizon is None else horizon
    budget = _guards.memory_budget_bytes() if budget is None else budget
    rows = float(group_size) * (max(1.0, float(num_groups)) if groups_flag is not None else 1.0)
    if sampled_batch_bytes(rows, cells) <= budget:  # the usual case (sample() calls this): no message to format
        return
    shape = "" if horizon is None else f" x {horizon:,} positions"
    check_fits(sampled_batch_bytes(group_size, cells), f"{group_flag} {group_size}",
               f"one group of {group_size:,} responses{shape}", f"lower {group_flag}", budget)
    if groups_flag is not None:
        rows = float(group_size) * float(num_groups)
        check_fits(sampled_batch_bytes(rows, cells), f"{groups_flag} {num_groups}",
                   f"{num_groups:,} groups of {group_size:,} responses{shape}",
                   f"lower {groups_flag} or {group_flag}", budget)


def _check_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        return generator
    if seed is None:
        seed = 0
    return torch.Generator().manual_seed(int(seed))


def sample(mdp: TokenMDP, policy, num_prompts: int | None = None, group_size: int = 1,
           generator: torch.Generator | None = None, seed: int | None = None,
           prompts: torch.Tensor | None = None) -> Rollouts:
    """Sample ``group_size`` responses for each of ``num_prompts`` prompts drawn from ``rho``.

    Rows ``i * G .. i * G + G - 1`` form group ``i``. Pass ``prompts`` (``[N]`` ids) to fix the
    prompts instead of drawing them (``num_prompts``, if given, must then equal their number;
    without either, one prompt is drawn). ``generator`` (or ``seed``, default 0) fixes every draw.
    """
    if prompts is not None:
        n_given = int(torch.as_tensor(prompts).numel())
        if num_prompts is not None and num_prompts != n_given:
            raise ValueError(f"num_prompts ({num_prompts}) must equal the number of prompts given ({n_given})")
        num_prompts = n_given
    elif num_prompts is None:
        num_prompts = 1
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    check_batches_fit(mdp.horizon, group_size, num_prompts, group_flag="group_size", groups_flag="num_prompts")
    gen = _check_generator(generator, seed)
    policy_threads = torch.get_num_threads()
    with _intra_op_threads(1):
        if prompts is None:
            prompts = torch.multinomial(mdp.prompt_weights, num_prompts, replacement=True, generator=gen)
        else:
            prompts = torch.as_tensor(prompts, dtype=torch.long).flatten()
            if bool(((prompts < 0) | (prompts >= mdp.num_prompts)).any()):
                raise ValueError(f"prompts must be ids in [0, {mdp.num_prompts - 1}], got {prompts.tolist()}")
        prompt_b = prompts.repeat_interleave(group_size)
        group_b = torch.arange(num_prompts).repeat_interleave(group_size)
        return _rollout(mdp, policy, prompt_b, group_b, None, torch.zeros_like(prompt_b), gen, policy_threads)


def sample_continuations(mdp: TokenMDP, policy, prompt_b: torch.Tensor, prefix_bt: torch.Tensor,
                         prefix_len_b: torch.Tensor, num_continuations: int,
                         generator: torch.Generator | None = None, seed: int | None = None) -> Rollouts:
    """``K = num_continuations`` completed responses from each given prefix.

    Args:
        prompt_b: prompt of each prefix, ``[B]``.
        prefix_bt: prefix tokens, ``[B, L]`` with ``L <= H`` (entries past ``prefix_len`` ignored).
        prefix_len_b: length of each prefix, ``[B]``, in ``[0, H]``.
        num_continuations: ``K >= 1``.

    Returns rollouts of ``B * K`` full responses (prefix included); rows ``i * K .. i * K + K - 1``
    continue prefix ``i`` and carry ``group = i``. A prefix that is already complete (it ends
    with EOS or has ``H`` tokens) yields ``K`` copies of itself.
    """
    if not isinstance(num_continuations, int) or num_continuations < 1:
        raise ValueError(f"num_continuations must be an integer >= 1, got {num_continuations!r}")
    gen = _check_generator(generator, seed)
    policy_threads = torch.get_num_threads()
    with _intra_op_threads(1):
        prompt_b, prefix_bt, prefix_len_b = checked_prefixes(mdp, prompt_b, prefix_bt, prefix_len_b)
        B, H = prompt_b.numel(), mdp.horizon
        full = torch.zeros(B, H, dtype=torch.long)
        full[:, : prefix_bt.shape[1]] = prefix_bt
        if mdp.eos_token is not None:
            early = (torch.arange(H).expand(B, H) < (prefix_len_b - 1).unsqueeze(1)) & (full == mdp.eos_token)
            if bool(early.any()):
                row = int(torch.nonzero(early)[0, 0])
                raise ValueError(f"prefix {row} contains the EOS token {mdp.eos_token} before its last position: "
                                 f"a response ends at EOS")
        K = num_continuations
        return _rollout(mdp, policy, prompt_b.repeat_interleave(K), torch.arange(B).repeat_interleave(K),
                        full.repeat_interleave(K, dim=0), prefix_len_b.repeat_interleave(K), gen, policy_threads)


def alias_tables(logp_rv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker's alias tables ``(prob [R, V], alias [R, V])`` of every row of ``log pi [R, V]``.

    Drawing a column ``j`` uniformly and keeping it with probability ``prob[r, j]`` (else taking
    ``alias[r, j]``) gives ``P(w) = (prob[r, w] + sum_{j: alias[r, j] = w} (1 - prob[r, j])) / V
    = pi_r(w)``. Built by Vose's pairing, vectorised over rows: ``V - 1`` rounds, each settling
    the smallest open column of every row (scaled mass ``V pi <= 1``) against its largest
    (``>= 1``), which gives up the missing mass. The last open column keeps ``prob = 1``.
    """
    R, V = logp_rv.shape
    p = logp_rv.to(torch.float64).exp()
    scaled = p * (V / p.sum(1, keepdim=True))
    prob = torch.ones(R, V, dtype=torch.float64)
    alias = torch.arange(V).repeat(R, 1)
    closed = torch.zeros(R, V, dtype=torch.bool)
    for _ in range(V - 1):
        small = scaled.masked_fill(closed, float("inf")).argmin(1, keepdim=True)
        large = scaled.masked_fill(closed, float("-inf")).argmax(1, keepdim=True)
        s = scaled.gather(1, small).clamp_(0.0, 1.0)
        prob.scatter_(1, small, s)
        alias.scatter_(1, small, large)
        scaled.scatter_add_(1, large, s - 1.0)
        closed.scatter_(1, small, True)
    return prob, alias


class _AliasSampler:
    """O(1) draws from every row of a log-probability table ``[R, V]`` (Walker's alias method).

    The row is padded to ``C = 2^m >= V`` columns (the padding has probability 0). A draw uses
    63 random bits ``k`` (uniform on ``[0, 2^63)``): its top ``m`` bits pick the column ``j``,
    and ``j`` is kept iff the rest, read as a fraction, is below ``prob[r, j]``; that is, iff
    ``k <= T[r, j] = j 2^s + round(prob[r, j] 2^s) - 1`` with ``s = 63 - m`` (one integer
    comparison); else the alias is taken. So ``P(w) = pi_r(w)`` up to the float64 rounding of
    the tables, and a token of probability 0 is never drawn.
    """

    def __init__(self, rows_rv: torch.Tensor):
        R, V = rows_rv.shape
        m = max(1, (V - 1).bit_length())
        C = 1 << m
        self.shift, self.columns = 63 - m, C
        self.rows = rows_rv.reshape(-1)
        padded = torch.full((R, C), float("-inf"), dtype=torch.float64)
        padded[:, :V] = rows_rv
        prob, alias = alias_tables(padded)
        col = torch.arange(C)
        scale = float(2 ** self.shift)
        self.last_kept = ((col << self.shift) + (prob * scale).round_().to(torch.long) - 1).reshape(-1)
        kept = torch.where(col < V, col, alias)  # a padding column is never kept; point it at a real token
        # entry 2 (r C + j) + (column not kept): the token drawn and its log-probability
        self.token = torch.stack([kept, alias], -1).reshape(-1)
        self.logp = torch.stack([padded.gather(1, kept), padded.gather(1, alias)], -1).reshape(-1)

    def draw(self, row_b: torch.Tensor, bits_b: torch.Tensor, tok_out: torch.Tensor, logp_out: torch.Tensor):
        """Token and its log-probability for each row index, written into the outputs ``[B]``."""
        cell = torch.add(bits_b >> self.shift, row_b, alpha=self.columns)
        entry = torch.empty_like(cell)
        torch.gt(bits_b, self.last_kept.index_select(0, cell), out=entry)  # long out: no bool-to-long copy
        entry.add_(cell, alpha=2)
        torch.index_select(self.token, 0, entry, out=tok_out)
        torch.index_select(self.logp, 0, entry, out=logp_out)


def _transpose_into(out_bh: torch.Tensor, x_hb: torch.Tensor) -> None:
    """Copy ``x [H, n]`` into the contiguous ``out [n, H]``. Copying through ``[n / c, c, H]``
    lets the copy run along ``c``-long rows, about twice as fast as a plain transpose."""
    H, n = x_hb.shape
    for c in (8, 4, 2):
        if n % c == 0:
            out_bh.view(n // c, c, H).copy_(x_hb.view(H, n // c, c).permute(1, 2, 0))
            return
    out_bh.copy_(x_hb.t())


def _compact_token_rewards(table: torch.Tensor, prompt_b: torch.Tensor, tokens_bt: torch.Tensor,
                           mask_bt: torch.Tensor | None, out_bt: torch.Tensor) -> None:
    """``table[t, prev, w]`` of every token into ``out_bt``, as :meth:`CompactRewards.rollout_rewards`
    computes it, by one flat lookup (``mask_bt`` None: every position is a token)."""
    H, W, V = table.shape
    B = tokens_bt.shape[0]
    flat = torch.empty(B, H, dtype=torch.long)  # (t W + prev) V + w
    torch.add(tokens_bt[:, 0], V + prompt_b, alpha=V, out=flat[:, 0])
    torch.add(tokens_bt[:, 1:], tokens_bt[:, :-1], alpha=V, out=flat[:, 1:])
    flat.add_(torch.arange(H) * (W * V))
    torch.index_select(table.reshape(-1), 0, flat.view(-1), out=out_bt.view(-1))
    if mask_bt is not None:
        out_bt.masked_fill_(~mask_bt, 0.0)


#: Rows sampled at a time from a table: the per-position vectors of a chunk (and its random
#: bits) stay in cache, and its outputs are transposed into place while still there.
_CHUNK_ROWS = 8192


def _rollout(mdp: TokenMDP, policy, prompt_b, group_b, forced_bt, prefix_len_b, gen, policy_threads) -> Rollouts:
    """The one sampling loop behind :func:`sample` and :func:`sample_continuations`.

    Called on one intra-op thread (:func:`_intra_op_threads`); ``step_log_probs`` gets
    ``policy_threads``. Rows are sampled in chunks of ``_CHUNK_ROWS`` (with a table; without
    one, the whole batch at once), drawing 63 random bits per (position, row) from ``gen`` for
    each chunk in turn, so a seed fixes the batch. With a finite table of rows
    (:meth:`~tpg.policies.base.Policy.log_prob_rows`) a token costs O(1)
    (:class:`_AliasSampler`) when the batch is large enough to pay for the alias tables;
    otherwise the row (or the policy's ``step_log_probs``) is inverted by CDF at
    ``u = floor(k / 2^10) / 2^53``. Forced prefix tokens replace the drawn ones (their draws
    are discarded). A chunk is filled position-major (``[H, n]``, each step a contiguous row)
    and transposed into the ``[B, H]`` outputs.
    """
    B, H, V, P = prompt_b.numel(), mdp.horizon, mdp.vocab_size, mdp.num_prompts
    eos = mdp.eos_token
    use_tree = bool(getattr(policy, "needs_tree", False) or mdp.rewards.needs_tree)
    tree = mdp.tree if use_tree else None
    rows = policy.log_prob_rows()
    sampler = None
    if rows is not None:
        rows = rows.to(torch.float64).contiguous()
        # alias tables cost about R C^2 to build (C = V rounded up to a power of 2): worth it
        # only when the batch draws at least that many tokens from the table
        C = 1 << max(1, (V - 1).bit_length())
        if rows.shape[0] * C * C <= B * H:
            sampler = _AliasSampler(rows)
    compact = type(mdp.rewards) is CompactRewards
    tokens = torch.empty(B, H, dtype=torch.long)
    logp = torch.empty(B, H, dtype=torch.float64)
    length = torch.empty(B, dtype=torch.long)
    rewards = torch.empty(B, H, dtype=torch.float64) if compact else None
    nodes = torch.empty(B, H, dtype=torch.long) if tree is not None else None
    child = torch.empty(B, H, dtype=torch.long) if tree is not None else None
    leaf = torch.empty(B, dtype=torch.long) if tree is not None else None
    chunk = max(1, min(_CHUNK_ROWS if rows is not None else B, B))
    buf = dict(tokens=torch.empty(H, chunk, dtype=torch.long), logp=torch.empty(H, chunk, dtype=torch.float64))
    if tree is not None:
        buf.update(nodes=torch.empty(H, chunk, dtype=torch.long), child=torch.empty(H, chunk, dtype=torch.long))
    for b0 in range(0, B, chunk):
        r = slice(b0, min(B, b0 + chunk))
        n = r.stop - r.start
        # random_() fills int64 with k uniform on [0, 2^63) (the low 63 bits of one 64-bit draw)
        bits_hb = torch.empty(H, n, dtype=torch.long).random_(generator=gen)
        part = {k: v[:, :n] for k, v in buf.items()}
        leaf_r = _sample_rows(mdp, policy, tree, rows, sampler, prompt_b[r], bits_hb,
                              None if forced_bt is None else forced_bt[r], prefix_len_b[r], part, length[r],
                              policy_threads)
        _transpose_into(tokens[r], part["tokens"])
        _transpose_into(logp[r], part["logp"])
        if tree is not None:
            _transpose_into(nodes[r], part["nodes"])
            _transpose_into(child[r], part["child"])
            leaf[r] = leaf_r
        if compact:
            mask_r = None if eos is None else torch.arange(H) < length[r].unsqueeze(1)
            _compact_token_rewards(mdp.rewards.table, prompt_b[r], tokens[r], mask_r, rewards[r])
    if eos is None:
        mask = torch.ones(B, H, dtype=torch.bool)
    else:
        mask = torch.arange(H) < length.unsqueeze(1)
    if not compact:
        rewards = mdp.rewards.rollout_rewards(mdp, prompt_b, tokens, mask, child)
    if mdp.gamma == 1.0:
        rm = rewards.sum(1)
    else:  # one matrix-vector product: far cheaper than a [B, H] product and a row sum
        rm = rewards @ (mdp.gamma ** torch.arange(H, dtype=torch.float64))
    return Rollouts(prompt=prompt_b, group=group_b, tokens=tokens, mask=mask, logp=logp, token_rewards=rewards,
                    rm=rm, length=length, prefix_len=prefix_len_b.clamp(max=H), nodes=nodes, leaf=leaf,
                    gamma=mdp.gamma, vocab_size=V, horizon=H)


def _sample_rows(mdp, policy, tree, rows, sampler, prompt_b, bits_hb, forced_bt, prefix_len_b, out, length_b,
                 policy_threads):
    """Sample ``B`` rows position by position into ``out`` (``tokens``, ``logp``, ``nodes``,
    ``child``, each ``[H, B]``) and ``length_b``; returns the leaf node ids (or ``None``).

    Tokens come from the alias ``sampler`` if given, else by inverse CDF from the table
    ``rows`` or, without a table, from the policy's ``step_log_probs``."""
    H, V, P, eos = mdp.horizon, mdp.vocab_size, mdp.num_prompts, mdp.eos_token
    B = prompt_b.numel()
    tokens_hb, logp_hb = out["tokens"], out["logp"]
    n_forced = int(prefix_len_b.max()) if forced_bt is not None and B > 0 else 0
    alive = torch.ones(B, dtype=torch.bool) if eos is not None else None
    length_b.fill_(0 if eos is not None else H)
    minus_one = torch.full((), -1, dtype=torch.long)
    prev = V + prompt_b
    node = prompt_b.clone() if tree is not None else None
    nt = node if tree is not None else None  # the roots' non-terminal indices are their node ids
    steps = H
    for t in range(H):
        tok, lp = tokens_hb[t], logp_hb[t]
        forced = t < prefix_len_b if t < n_forced else None
        if sampler is not None:
            row = policy.row_index(t, prev, nt)
            sampler.draw(row, bits_hb[t], tok, lp)
            if forced is not None:
                torch.where(forced, forced_bt[:, t], tok, out=tok)
                torch.index_select(sampler.rows, 0, torch.add(tok, row, alpha=V), out=lp)
        else:
            if rows is not None:
                lpv = rows.index_select(0, policy.row_index(t, prev, nt))
            else:
                tokens_so_far = tokens_hb[:t].t().contiguous()
                with _intra_op_threads(policy_threads):
                    lpv = policy.step_log_probs(t, prompt_b, tokens_so_far, prev, nt).to(torch.float64)
            cdf = torch.cumsum(lpv.exp(), dim=1)
            u = (bits_hb[t] >> 10).to(torch.float64).mul_(2.0 ** -53).unsqueeze(1) * cdf[:, -1:]
            tok.copy_((cdf < u).sum(1).clamp_(max=V - 1))
            if forced is not None:
                torch.where(forced, forced_bt[:, t], tok, out=tok)
            lp.copy_(lpv.gather(1, tok.unsqueeze(1)).squeeze(1))
        if eos is not None:
            tok.masked_fill_(~alive, PAD_TOKEN)
            lp.masked_fill_(~alive, 0.0)
            length_b += alive
        if tree is not None:
            child = torch.add(tok, nt, alpha=V).add_(P)
            if eos is not None:
                torch.where(alive, node, minus_one, out=out["nodes"][t])
                torch.where(alive, child, minus_one, out=out["child"][t])
                node = torch.where(alive, child, node)
            else:
                out["nodes"][t] = node
                out["child"][t] = child
                node = child
            if t + 1 < H:
                nt = tree.nt_index_n[node].clamp_(min=0)
        prev = tok
        if eos is not None:
            alive &= tok != eos
            if t + 1 < H and not bool(alive.any()):
                steps = t + 1
                break
    if steps < H:  # every response ended early: pad the remaining positions
        tokens_hb[steps:] = PAD_TOKEN
        logp_hb[steps:] = 0.0
        if tree is not None:
            out["nodes"][steps:] = -1
            out["child"][steps:] = -1
    return node
