"""A tiny causal transformer language model as a token-MDP policy (float64 by default).

The model reads the prompt's tokens ``x_1 .. x_Lp`` followed by the response so far and
predicts the next token from the last position::

    h^0_i = E[tok_i] + P[i]
    h^l   = h^(l-1) + Attn_l(LN(h^(l-1)))          (causal, multi-head)
    h^l   = h^l + MLP_l(LN(h^l))                   (pre-LN blocks)
    logits(s_t) = LN_f(h^L_{Lp + t - 1}) W_head    (state s_t = prompt + t-1 tokens)

Because attention is causal, the logits of a state depend only on its prefix, so the whole
response tree can be computed one level at a time: every non-terminal node is one new
token whose keys and values join its parent's key/value cache (:meth:`node_logits`). The
work is one token per tree node instead of one sequence per response (benchmarks/prefix_bench.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Policy

#: a key/value cache: one ``(keys, values)`` pair per layer, each ``[B, heads, L, d_head]``
KVCache = list


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, d_model: int, n_head: int, d_mlp: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_mlp)
        self.fc_out = nn.Linear(d_mlp, d_model)

    def forward(self, x_bld: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
        """New tokens ``x [B, L, d]`` after ``past`` cached positions; returns ``(x, (keys, values))``
        with the cache extended by the ``L`` new positions."""
        B, L, D = x_bld.shape
        H = self.n_head
        q, k, v = self.qkv(self.ln1(x_bld)).split(D, dim=2)
        q, k, v = (t.view(B, L, H, D // H).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if L == 1:
            # one new token per row (the tree levels, incremental sampling): a batched 1 x d_head
            # matmul is slow on CPU, a broadcast product and sum is not
            att = (q * k).sum(-1, keepdim=True).transpose(-1, -2) / math.sqrt(D // H)
            y = (att.softmax(dim=-1).transpose(-1, -2) * v).sum(2, keepdim=True)
        else:
            att = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
            # query i sits at absolute position n_past + i and sees keys 0 .. n_past + i
            n_past = k.shape[2] - L
            future = torch.ones(L, k.shape[2], dtype=torch.bool, device=x_bld.device).triu(n_past + 1)
            att = att.masked_fill(future, float("-inf"))
            y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, L, D)
        x_bld = x_bld + self.proj(y)
        x_bld = x_bld + self.fc_out(F.gelu(self.fc(self.ln2(x_bld))))
        return x_bld, (k, v)


class TinyTransformerPolicy(Policy):
    """Causal transformer policy over ``vocab_size`` tokens for prompts given as token sequences.

    Args:
        vocab_size: ``V``, the response vocabulary (EOS included).
        prompts: either the prompts' tokens ``[P, Lp]`` (ids in ``[0, input_vocab)``; they may
            share the response vocabulary), or a number of prompts ``P``, in which case prompt
            ``p`` is the single token ``V + p`` of an input vocabulary of ``V + P`` tokens.
        horizon: maximum response length ``H`` (the positional table covers ``Lp + H`` positions).
        n_layer, d_model, n_head: depth, width and heads (``d_model % n_head == 0``).
        d_mlp: hidden width of the MLPs (default ``4 d_model``).
        seed: seed of the initialisation (a private ``torch.Generator``; the global RNG is untouched).
        init_scale: multiplies every initial weight. Weights are ``N(0, 1/fan_in)`` (the output
            projections of each block also ``/ sqrt(2 n_layer)``), embeddings ``N(0, 1)``, biases 0,
            so attention matters and the initial logits spread about 1 (a definite, non-uniform
            policy at ``init_scale = 1``).
        input_vocab: size of the input embedding table (default: just enough for ``V`` and the prompts).
        dtype: parameter dtype (float64 by default, as the exact checks need).
        incremental_sampling: let :meth:`step_log_probs` keep a key/value cache between the
            sampler's successive calls (checked against the calls' arguments; see there).
    """

    needs_tree = False

    def __init__(self, vocab_size: int, prompts, horizon: int, n_layer: int = 2, d_model: int = 32,
                 n_head: int = 2, d_mlp: int | None = None, seed: int = 0, init_scale: float = 1.0,
                 input_vocab: int | None = None, dtype=torch.float64, incremental_sampling: bool = True):
        super().__init__(vocab_size)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
        for name, val in (("n_layer", n_layer), ("d_model", d_model), ("n_head", n_head)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        if isinstance(prompts, int) and not isinstance(prompts, bool):
            if prompts < 1:
                raise ValueError(f"the number of prompts must be >= 1, got {prompts}")
            prompt_tokens = (vocab_size + torch.arange(prompts)).unsqueeze(1)
        else:
            try:
                prompt_tokens = torch.as_tensor(prompts)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"prompts must be a number of prompts or a [P, Lp] array of token ids, "
                                 f"got {prompts!r}") from exc
            if prompt_tokens.dim() != 2 or prompt_tokens.numel() == 0 or prompt_tokens.is_floating_point():
                raise ValueError(f"prompt tokens must be a non-empty integer array [P, Lp], got shape "
                                 f"{list(prompt_tokens.shape)} dtype {prompt_tokens.dtype}")
            prompt_tokens = prompt_tokens.to(torch.long)
            if bool((prompt_tokens < 0).any()):
                raise ValueError("prompt tokens must be >= 0")
        needed = max(vocab_size, int(prompt_tokens.max()) + 1)
        input_vocab = needed if input_vocab is None else int(input_vocab)
        if input_vocab < needed:
            raise ValueError(f"input_vocab={input_vocab} is too small for vocab_size={vocab_size} and prompt "
                             f"tokens up to {int(prompt_tokens.max())} (need >= {needed})")
        self.horizon = horizon
        self.num_prompts, self.prompt_len = prompt_tokens.shape
        self.n_layer, self.d_model, self.n_head = n_layer, d_model, n_head
        self.input_vocab = input_vocab
        self.max_len = self.prompt_len + horizon
        self.incremental_sampling = bool(incremental_sampling)
        self.register_buffer("prompt_tokens", prompt_tokens.clone(), persistent=False)
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        # torch's default initialisers draw from the global RNG; every weight is redrawn below from
        # the seed, so restore the global state rather than consume it
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Parameter(torch.empty(input_vocab, d_model))
            self.pos_emb = nn.Parameter(torch.empty(self.max_len, d_model))
            self.blocks = nn.ModuleList(_Block(d_model, n_head, d_mlp) for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.to(dtype)
        self._init_weights(seed, init_scale)
        self._sampling_state: dict | None = None

    @classmethod
    def from_mdp(cls, mdp, **kwargs) -> "TinyTransformerPolicy":
        """A policy for ``mdp``: its ``prompt_tokens`` when it has them (the tasks of
        :mod:`tpg.mdp.tasks`), else one prompt-id token per prompt."""
        prompts = getattr(mdp, "prompt_tokens", None)
        return cls(mdp.vocab_size, mdp.num_prompts if prompts is None else prompts, mdp.horizon, **kwargs)

    def _init_weights(self, seed: int, scale: float) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        out_scale = 1.0 / math.sqrt(2 * self.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                elif name in ("tok_emb", "pos_emb"):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
                else:
                    std = scale / math.sqrt(p.shape[1])
                    if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                        std *= out_scale
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)

    # ------------------------------------------------------------------ the model
    def forward_tokens(self, tokens_bl: torch.Tensor, past: KVCache | None = None, start: int = 0):
        """Logits ``[B, L, V]`` at ``L`` new positions ``start .. start + L - 1`` and the extended cache.

        ``past`` holds the keys and values of the ``start`` earlier positions (``None`` when
        ``start == 0``); the logits at position ``i`` predict the token at ``i + 1``."""
        L = tokens_bl.shape[1]
        if start + L > self.max_len:
            raise ValueError(f"sequence of {start + L} positions exceeds the model's {self.max_len} "
                             f"(prompt length {self.prompt_len} + horizon {self.horizon})")
        x = self.tok_emb[tokens_bl] + self.pos_emb[start:start + L]
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            cache.append(kv)
        return self.head(self.ln_f(x)), cache

    def sequence_logits(self, prompt_b: torch.Tensor, tokens_bt: torch.Tensor) -> torch.Tensor:
        """One full forward, no cache: logits ``[B, T + 1, V]`` of the states after
        ``0 .. T`` response tokens of each row (prompt ``prompt_b``, response ``tokens_bt [B, T]``)."""
        seq = torch.cat([self.prompt_tokens[prompt_b], tokens_bt.to(torch.long)], dim=1)
        logits, _ = self.forward_tokens(seq)
        return logits[:, self.prompt_len - 1:]

    def token_log_probs(self, prompt_b: torch.Tensor, tokens_bt: torch.Tensor,
                        mask_bt: torch.Tensor | None = None) -> torch.Tensor:
        """``log pi(w_t | s_t)`` of each response token, ``[B, T]`` (differentiable; 0 where
        ``mask_bt`` is False). One forward pass over the batch."""
        T = tokens_bt.shape[1]
        logp = torch.log_softmax(self.sequence_logits(prompt_b, tokens_bt[:, :T - 1]), dim=-1)
        out = logp.gather(2, tokens_bt.to(torch.long).unsqueeze(2)).squeeze(2)
        if mask_bt is not None:
            out = torch.where(mask_bt, out, torch.zeros((), dtype=out.dtype))
        return out

    # ------------------------------------------------------------------ the exact engine's view
    def _check_tree(self, tree) -> None:
        if tree.num_prompts != self.num_prompts or tree.vocab_size != self.vocab_size or tree.horizon > self.horizon:
            raise ValueError(f"transformer policy (prompts={self.num_prompts}, vocab={self.vocab_size}, "
                             f"horizon={self.horizon}) does not fit the tree (prompts={tree.num_prompts}, "
                             f"vocab={tree.vocab_size}, horizon={tree.horizon})")

    def node_logits(self, tree) -> torch.Tensor:
        """Logits of every non-terminal node, ``[N_nt, V]``, each distinct prefix computed once.

        Level 0 runs the prompts (``P x Lp`` positions); level ``d >= 1`` runs one token per
        non-terminal node at depth ``d`` (the token that leads into it), attending to its
        parent's key/value cache gathered by parent index. Rows come out level by level, which
        is the tree's non-terminal order. Differentiable."""
        self._check_tree(tree)
        logits, cache = self.forward_tokens(self.prompt_tokens)
        out = [logits[:, -1]]
        for depth in range(1, tree.horizon):
            lvl = tree.level_nt(depth)
            if lvl.stop == lvl.start:
                break
            nodes = tree.nt_node_k[lvl]
            parent = tree.nt_index_n[tree.parent_n[nodes]] - tree.nt_level_start[depth - 1]
            cache = [(k[parent], v[parent]) for k, v in cache]
            logits, cache = self.forward_tokens(tree.token_n[nodes].unsqueeze(1), cache,
                                                start=self.prompt_len + depth - 1)
            out.append(logits[:, 0])
        return torch.cat(out, 0)

    # ------------------------------------------------------------------ the sampler's view
    def _param_version(self) -> tuple:
        # in-place updates (optimiser steps, load_state_dict) bump a tensor's version counter
        return tuple((id(p), p._version) for p in self.parameters())

    def step_log_probs(self, position, prompt_b, tokens_bt, prev_b, nt_b):
        """Next-token log-probabilities ``[B, V]`` (detached) of the states
        ``prompt + tokens_bt[:, :position]``.

        With ``incremental_sampling`` the key/value cache of the previous call is reused when
        that call was for ``position - 1`` with the same prompts, the same tokens and unchanged
        parameters (the sampler's loop calls positions 0, 1, 2, ... in turn); only the newest
        token is then run. Any other call is a full forward, which also rebuilds the cache, so
        the result never depends on the cache (up to float rounding)."""
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long)
        tokens_bt = torch.as_tensor(tokens_bt, dtype=torch.long)[:, :position]
        with torch.no_grad():
            state = self._sampling_state if self.incremental_sampling else None
            version = self._param_version()
            if (state is not None and position >= 1 and state["position"] == position - 1
                    and state["version"] == version and torch.equal(state["prompt"], prompt_b)
                    and torch.equal(state["tokens"], tokens_bt[:, :position - 1])):
                logits, cache = self.forward_tokens(tokens_bt[:, position - 1:], state["cache"],
                                                    start=self.prompt_len + position - 1)
            elif position == 0:
                # the distinct prompts once, then gathered per row
                logits, cache = self.forward_tokens(self.prompt_tokens)
                logits = logits[prompt_b]
                cache = [(k[prompt_b], v[prompt_b]) for k, v in cache]
            else:
                seq = torch.cat([self.prompt_tokens[prompt_b], tokens_bt], dim=1)
                logits, cache = self.forward_tokens(seq)
            if self.incremental_sampling:
                self._sampling_state = dict(position=position, version=version, prompt=prompt_b.clone(),
                                            tokens=tokens_bt.clone(), cache=cache)
            return torch.log_softmax(logits[:, -1], dim=-1)

    def clear_sampling_cache(self) -> None:
        """Drop the key/value cache kept between sampler calls (it is also replaced at each new rollout)."""
        self._sampling_state = None

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size}, prompts={self.num_prompts}x{self.prompt_len}, horizon={self.horizon}, "
                f"n_layer={self.n_layer}, d_model={self.d_model}, n_head={self.n_head}")
