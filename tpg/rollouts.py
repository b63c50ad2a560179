"""The rollout batch type and the vectorised, seeded samplers.

:func:`sample` draws ``N`` prompts from ``rho`` and ``G`` responses for each (a group);
:func:`sample_continuations` completes ``K`` responses from each of a set of given
prefixes (the Monte Carlo continuations TRePO and VinePPO need). Both use one code path:
a row-parallel loop over positions in which the first ``prefix_len`` tokens of a row are
forced and the rest are sampled by inverse CDF from uniforms drawn up front with a
``torch.Generator``, so a seed fixes the batch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .mdp.mdp import TokenMDP

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


def _check_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        return generator
    if seed is None:
        seed = 0
    return torch.Generator().manual_seed(int(seed))


def sample(mdp: TokenMDP, policy, num_prompts: int = 1, group_size: int = 1,
           generator: torch.Generator | None = None, seed: int | None = None,
           prompts: torch.Tensor | None = None) -> Rollouts:
    """Sample ``group_size`` responses for each of ``num_prompts`` prompts drawn from ``rho``.

    Rows ``i * G .. i * G + G - 1`` form group ``i``. Pass ``prompts`` (``[N]`` ids) to fix the
    prompts instead of drawing them. ``generator`` (or ``seed``, default 0) fixes every draw.
    """
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    gen = _check_generator(generator, seed)
    if prompts is None:
        prompts = torch.multinomial(mdp.prompt_weights, num_prompts, replacement=True, generator=gen)
    else:
        prompts = torch.as_tensor(prompts, dtype=torch.long).flatten()
        if prompts.numel() != num_prompts:
            num_prompts = int(prompts.numel())
        if bool(((prompts < 0) | (prompts >= mdp.num_prompts)).any()):
            raise ValueError(f"prompts must be ids in [0, {mdp.num_prompts - 1}], got {prompts.tolist()}")
    prompt_b = prompts.repeat_interleave(group_size)
    group_b = torch.arange(num_prompts).repeat_interleave(group_size)
    return _rollout(mdp, policy, prompt_b, group_b, None, torch.zeros_like(prompt_b), gen)


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
    prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
    prefix_bt = torch.as_tensor(prefix_bt, dtype=torch.long)
    prefix_len_b = torch.as_tensor(prefix_len_b, dtype=torch.long).flatten()
    B = prompt_b.numel()
    H, V = mdp.horizon, mdp.vocab_size
    if prefix_bt.dim() != 2 or prefix_bt.shape[0] != B or prefix_bt.shape[1] > H:
        raise ValueError(f"prefix tokens must have shape [B, L] with B={B} and L <= horizon={H}, "
                         f"got {list(prefix_bt.shape)}")
    if prefix_len_b.numel() != B or bool(((prefix_len_b < 0) | (prefix_len_b > prefix_bt.shape[1])).any()):
        raise ValueError(f"prefix lengths must be B={B} integers in [0, {prefix_bt.shape[1]}], "
                         f"got {prefix_len_b.tolist()[:10]}")
    if bool(((prompt_b < 0) | (prompt_b >= mdp.num_prompts)).any()):
        raise ValueError(f"prompt ids must be in [0, {mdp.num_prompts - 1}]")
    full = torch.zeros(B, H, dtype=torch.long)
    full[:, : prefix_bt.shape[1]] = prefix_bt
    pos = torch.arange(H).expand(B, H)
    given = pos < prefix_len_b.unsqueeze(1)
    if bool(((full < 0) | (full >= V))[given].any()):
        raise ValueError(f"prefix tokens must be in [0, {V - 1}]")
    if mdp.eos_token is not None:
        early = given & (pos < (prefix_len_b - 1).unsqueeze(1)) & (full == mdp.eos_token)
        if bool(early.any()):
            row = int(torch.nonzero(early)[0, 0])
            raise ValueError(f"prefix {row} contains the EOS token {mdp.eos_token} before its last position: "
                             f"a response ends at EOS")
    K = num_continuations
    return _rollout(mdp, policy, prompt_b.repeat_interleave(K), torch.arange(B).repeat_interleave(K),
                    full.repeat_interleave(K, dim=0), prefix_len_b.repeat_interleave(K), gen)


def _rollout(mdp: TokenMDP, policy, prompt_b, group_b, forced_bt, prefix_len_b, gen) -> Rollouts:
    B, H, V, P = prompt_b.numel(), mdp.horizon, mdp.vocab_size, mdp.num_prompts
    eos = mdp.eos_token
    use_tree = bool(getattr(policy, "needs_tree", False) or mdp.rewards.needs_tree)
    tree = mdp.tree if use_tree else None
    rows = policy.log_prob_rows()
    if rows is not None:
        rows = rows.to(torch.float64)
        cdf_rows = torch.cumsum(rows.exp(), dim=1)
    u_bt = torch.rand(B, H, generator=gen, dtype=torch.float64)
    alive = torch.ones(B, dtype=torch.bool)
    prev = V + prompt_b
    node = prompt_b.clone() if tree is not None else None
    tok_cols, lp_cols, mask_cols, node_cols = [], [], [], []
    zero_f = torch.zeros((), dtype=torch.float64)
    for t in range(H):
        nt = tree.nt_index_n[node].clamp(min=0) if tree is not None else None
        if rows is not None:
            r = policy.row_index(t, prev, nt)
            cdf = cdf_rows[r]
            u = u_bt[:, t:t + 1] * cdf[:, -1:]
            tok = (cdf < u).sum(1)
            if forced_bt is not None:
                tok = torch.where(t < prefix_len_b, forced_bt[:, t], tok)
            lp = rows[r, tok]
        else:
            tokens_so_far = torch.stack(tok_cols, 1) if tok_cols else torch.zeros(B, 0, dtype=torch.long)
            lpv = policy.step_log_probs(t, prompt_b, tokens_so_far, prev, nt).to(torch.float64)
            cdf = torch.cumsum(lpv.exp(), dim=1)
            u = u_bt[:, t:t + 1] * cdf[:, -1:]
            tok = (cdf < u).sum(1)
            if forced_bt is not None:
                tok = torch.where(t < prefix_len_b, forced_bt[:, t], tok)
            lp = lpv.gather(1, tok.unsqueeze(1)).squeeze(1)
        tok = torch.where(alive, tok, PAD_TOKEN)
        tok_cols.append(tok)
        lp_cols.append(torch.where(alive, lp, zero_f))
        mask_cols.append(alive)
        if tree is not None:
            node_cols.append(torch.where(alive, node, -1))
            node = torch.where(alive, P + nt * V + tok, node)
        prev = tok
        if eos is not None:
            alive = alive & (tok != eos)
        if t + 1 < H and not bool(alive.any()):
            pad = H - t - 1
            tok_cols += [torch.full((B,), PAD_TOKEN, dtype=torch.long)] * pad
            lp_cols += [torch.zeros(B, dtype=torch.float64)] * pad
            mask_cols += [torch.zeros(B, dtype=torch.bool)] * pad
            if tree is not None:
                node_cols += [torch.full((B,), -1, dtype=torch.long)] * pad
            break
    tokens = torch.stack(tok_cols, 1)
    mask = torch.stack(mask_cols, 1)
    logp = torch.stack(lp_cols, 1)
    nodes = torch.stack(node_cols, 1) if tree is not None else None
    child = None
    if tree is not None:
        child = torch.where(mask, P + tree.nt_index_n[nodes.clamp(min=0)] * V + tokens, -1)
    rewards = mdp.rewards.rollout_rewards(mdp, prompt_b, tokens, mask, child)
    disc = mdp.gamma ** torch.arange(H, dtype=torch.float64)
    rm = (rewards * disc).sum(1)
    return Rollouts(prompt=prompt_b, group=group_b, tokens=tokens, mask=mask, logp=logp, token_rewards=rewards,
                    rm=rm, length=mask.sum(1), prefix_len=prefix_len_b.clamp(max=H),
                    nodes=nodes, leaf=node if tree is not None else None, gamma=mdp.gamma, vocab_size=V, horizon=H)
