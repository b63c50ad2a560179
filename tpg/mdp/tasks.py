"""Tasks with known token-level rewards for prompt-conditioned policies (``--task NAME:key=value,...``).

Every task is a :class:`TaskMDP`: a :class:`~tpg.mdp.mdp.TokenMDP` whose prompts are token
sequences (``prompt_tokens [P, Lp]``, at most 4 tokens, drawn from the task's vocabulary of
at most 16 tokens). With ``eos=true`` the EOS token is the last id ``V - 1``; the other
tokens ``0 .. C-1`` (``C = V - 1``, or ``V`` without EOS) carry content, and digit ``k`` is
token ``k``.

Tasks:

* ``table``: a fixed random token-reward table ``r[t, prev, w] ~ N(0, 1)`` over (position,
  previous token or prompt, token) (:class:`~tpg.mdp.rewards.CompactRewards`);
* ``rm``: a frozen random "token reward model": a seeded tanh RNN reads the prompt and the
  response so far, and a small MLP scores each next token, ``r(s, w) = v . tanh(A h(s) + F[w] + c)``
  (:class:`RewardModelRewards`), standing for a learned reward model;
* rule tasks with one right answer ``y(x)`` per prompt (EOS appended when ``eos=true``):
  ``copy`` (``y = x``), ``reverse`` (``y = x`` reversed), ``target`` (a fixed string, whatever
  the prompt), ``count`` (the number of occurrences of ``token`` in ``x``, one digit) and ``sum``
  (the sum of the prompt's base-``base`` digits, written with a fixed number of base-``base``
  digits, most significant first). With ``score=token`` every token equal to the answer's
  token at its position earns 1 (``RM`` = number of correct tokens); with ``score=whole``
  only the token completing the whole answer earns 1. Either way the right answer alone has
  the maximum ``RM``.

``reward=dense`` keeps the rewards where they fall; ``reward=terminal`` is the zero-reward
twin (same ``RM`` for every response, all of it on the last token).
"""

from __future__ import annotations

import math

import torch

from .._guards import check_seed
from .families import compact_rewards
from .mdp import TokenMDP
from .rewards import Rewards, TwinRewards, _check_finite
# the spec grammar lives in the torch-free .specs (a mistyped --task is refused before torch loads)
from .specs import (_CHOICES, _DEFAULTS, DEFAULT_MAX_NODES, MAX_PROMPT_LEN, MAX_VOCAB, RULE_TASKS,  # noqa: F401
                    TASKS, _check_task, parse_task_spec, task_help, task_keys)
from .tree import TokenTree



class TaskMDP(TokenMDP):
    """A :class:`TokenMDP` whose prompts are token sequences.

    Extra attributes: ``prompt_tokens [P, Lp]`` (long), ``task`` (its name), ``options`` (the
    keyword arguments that made it), ``answers [P, Lt]`` (the right response of each prompt,
    rule tasks only, else ``None``). Its zero-reward twin and ``with_gamma`` copies keep them.
    """

    def __init__(self, vocab_size: int, horizon: int, prompt_weights, rewards: Rewards, prompt_tokens,
                 eos_token: int | None = None, gamma: float = 1.0, max_nodes: int = DEFAULT_MAX_NODES,
                 name: str = "task", tree: TokenTree | None = None, task: str = "", options: dict | None = None,
                 answers: torch.Tensor | None = None):
        prompt_tokens = torch.as_tensor(prompt_tokens, dtype=torch.long)
        if prompt_tokens.dim() != 2 or prompt_tokens.numel() == 0:
            raise ValueError(f"prompt_tokens must be a non-empty [P, Lp] array, got shape {list(prompt_tokens.shape)}")
        self.prompt_tokens = prompt_tokens
        self.task = task
        self.options = dict(options or {})
        self.answers = answers
        super().__init__(vocab_size, horizon, prompt_weights, rewards, eos_token, gamma, max_nodes, name, tree)
        if prompt_tokens.shape[0] != self.num_prompts:
            raise ValueError(f"prompt_tokens has {prompt_tokens.shape[0]} rows for {self.num_prompts} prompts")

    def _derive(self, rewards: Rewards, gamma: float, name: str) -> "TaskMDP":
        return TaskMDP(self.vocab_size, self.horizon, self.prompt_weights.clone(), rewards, self.prompt_tokens,
                       self.eos_token, gamma, self.max_nodes, name=name, tree=self._tree, task=self.task,
                       options=self.options, answers=self.answers)

    def zero_reward_twin(self) -> "TaskMDP":
        base = self.rewards.base if isinstance(self.rewards, TwinRewards) else self.rewards
        return self._derive(TwinRewards(base), self.gamma, f"{self.name}/zra-twin")

    def with_gamma(self, gamma: float) -> "TaskMDP":
        return self._derive(self.rewards, gamma, f"{self.name}/gamma={gamma:g}")

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_tokens.shape[1])

    @property
    def spec(self) -> str:
        """A ``NAME:key=value,...`` string that :func:`task_from_spec` turns back into this task."""
        return _format_spec(self.task, self.options)


def _format_spec(task: str, options: dict) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "-".join(str(int(t)) for t in v)
        return f"{v:g}" if isinstance(v, float) else str(v)
    return f"{task}:" + ",".join(f"{k}={fmt(v)}" for k, v in options.items())


# ---------------------------------------------------------------------------- rewards
class TargetRewards(Rewards):
    """Rewards of a rule task with answer ``targets[x]`` (``[P, Lt]``).

    ``whole=False``: ``r(s_t, w_t) = weight * 1[w_t = y_t(x)]`` for ``t <= Lt`` (0 past the answer).
    ``whole=True``: ``r = weight`` on token ``Lt`` when ``w_1 .. w_Lt = y(x)``, else 0."""

    def __init__(self, targets: torch.Tensor, whole: bool = False, weight: float = 1.0):
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.whole = bool(whole)
        self.weight = float(weight)

    def validate(self, mdp) -> None:
        P, Lt = self.targets.shape
        if P != mdp.num_prompts:
            raise ValueError(f"targets has {P} rows for {mdp.num_prompts} prompts")
        if Lt > mdp.horizon:
            raise ValueError(f"the answer has {Lt} tokens, more than the horizon {mdp.horizon}")
        if bool(((self.targets < 0) | (self.targets >= mdp.vocab_size)).any()):
            raise ValueError(f"target tokens must be in [0, {mdp.vocab_size - 1}]")
        if mdp.eos_token is not None and bool((self.targets[:, :-1] == mdp.eos_token).any()):
            raise ValueError("an answer contains EOS before its last token: it could never be produced")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight must be finite, got {self.weight}")

    def _padded(self, width: int) -> torch.Tensor:
        P, Lt = self.targets.shape
        out = torch.full((P, max(width, Lt)), -1, dtype=torch.long)
        out[:, :Lt] = self.targets
        return out[:, :width]

    def edge_rewards(self, mdp, tree):
        P, N = tree.num_prompts, tree.num_nodes
        Lt = self.targets.shape[1]
        target = self._padded(tree.horizon)
        hit = torch.zeros(N, dtype=torch.bool)
        hit[P:] = tree.token_n[P:] == target[tree.prompt_n[P:], tree.depth_n[P:] - 1]
        if not self.whole:
            return hit.to(torch.float64) * self.weight
        ok = torch.zeros(N, dtype=torch.bool)
        ok[:P] = True
        for depth in range(1, tree.horizon + 1):
            lvl = slice(tree.level_start[depth], tree.level_start[depth + 1])
            ok[lvl] = ok[tree.parent_n[lvl]] & hit[lvl]
        return (ok & (tree.depth_n == Lt)).to(torch.float64) * self.weight

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        B, H = tokens_bt.shape
        Lt = self.targets.shape[1]
        hit = (tokens_bt == self._padded(H)[prompt_b]) & mask_bt
        if not self.whole:
            return hit.to(torch.float64) * self.weight
        out = torch.zeros(B, H, dtype=torch.float64)
        out[:, Lt - 1] = hit[:, :Lt].all(1).to(torch.float64) * self.weight
        return out


class RewardModelRewards(Rewards):
    """A frozen random token reward model.

    A tanh RNN reads the prompt and then the response, ``h <- tanh(W h + E[tok] + b)`` from
    ``h = 0``; a token ``w`` after state ``s`` scores
    ``r(s, w) = scale * v . tanh(A h(s) + F[w] + c)``. So ``r`` depends on the whole prefix,
    as a learned reward model's would. All weights come from ``seed`` (float64).
    Evaluated on the tree one depth at a time (vectorised over the level) and on rollouts one
    position at a time; both give the same numbers.
    """

    def __init__(self, prompt_tokens: torch.Tensor, vocab_size: int, seed: int = 0, hidden: int = 16,
                 scale: float = 1.0):
        self.prompt_tokens = torch.as_tensor(prompt_tokens, dtype=torch.long)
        self.vocab_size = int(vocab_size)
        self.scale = float(scale)
        n_in = max(self.vocab_size, int(self.prompt_tokens.max()) + 1)
        gen = torch.Generator().manual_seed(int(seed))

        def randn(*shape, std=1.0):
            return torch.randn(shape, generator=gen, dtype=torch.float64) * std

        self.E = randn(n_in, hidden)
        self.W = randn(hidden, hidden, std=1.0 / math.sqrt(hidden))
        self.b = randn(hidden, std=0.1)
        self.A = randn(hidden, hidden, std=1.0 / math.sqrt(hidden))
        self.F = randn(self.vocab_size, hidden)
        self.c = randn(hidden, std=0.1)
        self.v = randn(hidden, std=1.0 / math.sqrt(hidden))

    def validate(self, mdp) -> None:
        if self.prompt_tokens.shape[0] != mdp.num_prompts:
            raise ValueError(f"reward model has {self.prompt_tokens.shape[0]} prompts, the MDP {mdp.num_prompts}")
        if self.vocab_size != mdp.vocab_size:
            raise ValueError(f"reward model vocab {self.vocab_size} != MDP vocab {mdp.vocab_size}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")

    def _prompt_state(self, prompt_b: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(prompt_b.numel(), self.W.shape[0], dtype=torch.float64)
        for i in range(self.prompt_tokens.shape[1]):
            h = torch.tanh(h @ self.W + self.E[self.prompt_tokens[prompt_b, i]] + self.b)
        return h

    def scores(self, h_bd: torch.Tensor) -> torch.Tensor:
        """``r(s, w)`` for every token ``w`` after each state ``h [n, d]``: ``[n, V]``."""
        z = torch.tanh((h_bd @ self.A).unsqueeze(1) + self.F.unsqueeze(0) + self.c)
        return self.scale * (z @ self.v)

    def edge_rewards(self, mdp, tree):
        V = tree.vocab_size
        out = torch.zeros(tree.num_nodes, dtype=torch.float64)
        h = self._prompt_state(torch.arange(tree.num_prompts))  # level 0, in non-terminal order
        for depth in range(tree.horizon):
            kids = tree.nt_children(depth)
            out[kids] = self.scores(h).reshape(-1)
            if depth + 1 < tree.horizon:
                h_kids = torch.tanh((h @ self.W).unsqueeze(1) + self.E[:V].unsqueeze(0) + self.b)
                h_kids = h_kids.reshape(-1, h.shape[1])
                h = h_kids[tree.nt_index_n[kids] >= 0]
        _check_finite("reward model rewards", out)
        return out

    def rollout_rewards(self, mdp, prompt_b, tokens_bt, mask_bt, child_bt):
        B, H = tokens_bt.shape
        out = torch.zeros(B, H, dtype=torch.float64)
        h = self._prompt_state(prompt_b)
        rows = torch.arange(B)
        for t in range(H):
            out[:, t] = self.scores(h)[rows, tokens_bt[:, t]]
            h = torch.tanh(h @ self.W + self.E[tokens_bt[:, t]] + self.b)
        return torch.where(mask_bt, out, torch.zeros((), dtype=torch.float64))


def _int_option(key, value, low, high=None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"task option {key} must be an integer {rng}, got {value!r}")
    return value


def _all_strings(alphabet: int, length: int) -> torch.Tensor:
    """Every string of ``length`` tokens over ``0 .. alphabet-1``, lexicographic, ``[alphabet^length, length]``."""
    idx = torch.arange(alphabet ** length)
    digits = [(idx // alphabet ** (length - 1 - i)) % alphabet for i in range(length)]
    return torch.stack(digits, 1)


def _draw_prompts(alphabet: int, length: int, prompts, gen: torch.Generator) -> torch.Tensor:
    total = alphabet ** length
    if prompts == "all":
        return _all_strings(alphabet, length)
    n = _int_option("prompts", prompts, 1)
    if n > total:
        raise ValueError(f"task option prompts={n} exceeds the {total} distinct prompts of length {length} over "
                         f"{alphabet} tokens (use prompts=all)")
    pick = torch.randperm(total, generator=gen)[:n].sort().values
    return _all_strings(alphabet, length)[pick]


def _to_base(values: torch.Tensor, base: int, width: int) -> torch.Tensor:
    return torch.stack([(values // base ** (width - 1 - i)) % base for i in range(width)], 1)


def make_task(name: str, vocab: int | None = None, length: int | None = None, prompts=None, eos: bool = False,
              horizon: int | None = None, gamma: float = 1.0, reward: str = "dense", seed: int = 0,
              max_nodes: int = DEFAULT_MAX_NODES, score: str = "token", target=None, answer_length: int = 3,
              token: int = 0, base: int | None = None, hidden: int = 16, scale: float = 1.0,
              **policy_keys) -> TaskMDP:
    """The task ``name`` (see the module docstring) as a :class:`TaskMDP`.

    Policy keys (``policy_seed``, ``n_layer``, ``d_model``, ``n_head``, ``init_scale``) are accepted and
    ignored, so the dict of :func:`parse_task_spec` can be passed whole. Unknown keys, and keys
    that do not apply to the task, raise ``ValueError``."""
    _check_task(name)
    check_seed(seed, "task option seed")
    given = {k: v for k, v in dict(vocab=vocab, length=length, prompts=prompts, horizon=horizon).items()
             if v is not None}
    extras = dict(score=(score, "token"), target=(target, None), answer_length=(answer_length, 3),
                  token=(token, 0), base=(base, None), hidden=(hidden, 16), scale=(scale, 1.0))
    allowed = task_keys(name)
    for key in list(policy_keys) + [k for k, (v, d) in extras.items() if v != d]:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} for task {name!r}; allowed keys: {', '.join(allowed)}")
    opts = {**_DEFAULTS[name], **given}
    V = _int_option("vocab", opts["vocab"], 2, MAX_VOCAB)
    Lp = _int_option("length", opts["length"], 1, MAX_PROMPT_LEN)
    if not isinstance(eos, bool):
        raise ValueError(f"task option eos must be true or false, got {eos!r}")
    if reward not in _CHOICES["reward"]:
        raise ValueError(f"task option reward must be 'dense' or 'terminal', got {reward!r}")
    if score not in _CHOICES["score"]:
        raise ValueError(f"task option score must be 'token' or 'whole', got {score!r}")
    eos_token = V - 1 if eos else None
    C = V - 1 if eos else V  # content tokens 0 .. C-1
    if C < 2:
        raise ValueError(f"vocab={V} leaves {C} content token(s) besides EOS; need at least 2")
    gen = torch.Generator().manual_seed(int(seed))
    answers = None
    if name in ("table", "rm"):
        prompt_tokens = _draw_prompts(C, Lp, opts["prompts"], gen)
        H = _int_option("horizon", opts["horizon"], 1)
    else:
        if name in ("copy", "reverse"):
            prompt_tokens = _draw_prompts(C, Lp, opts["prompts"], gen)
            answers = prompt_tokens if name == "copy" else prompt_tokens.flip(1)
        elif name == "target":
            prompt_tokens = _draw_prompts(C, Lp, opts["prompts"], gen)
            if target is None:
                y = torch.randint(0, C, (_int_option("answer_length", answer_length, 1),), generator=gen)
            else:
                y = torch.as_tensor(target, dtype=torch.long).flatten()
                if y.numel() < 1 or bool(((y < 0) | (y >= C)).any()):
                    raise ValueError(f"task option target must be non-empty token ids in [0, {C - 1}] (EOS "
                                     f"excluded), got {list(map(int, y))}")
            answers = y.unsqueeze(0).expand(prompt_tokens.shape[0], -1)
            opts["target"] = y.tolist()
        elif name == "count":
            tok = _int_option("token", token, 0, C - 1)
            if C < Lp + 1:
                raise ValueError(f"count task: answers 0..{Lp} need {Lp + 1} digit tokens, vocab={V} "
                                 f"(eos={eos}) has {C}; raise vocab or lower length")
            prompt_tokens = _draw_prompts(C, Lp, opts["prompts"], gen)
            answers = (prompt_tokens == tok).sum(1, keepdim=True)
            opts["token"] = tok
        else:  # sum
            b = C if base is None else _int_option("base", base, 2, C)
            prompt_tokens = _draw_prompts(b, Lp, opts["prompts"], gen)
            width = len(_to_base_digits(Lp * (b - 1), b))
            answers = _to_base(prompt_tokens.sum(1), b, width)
            opts["base"] = b
        answers = answers.contiguous()
        if eos:
            answers = torch.cat([answers, torch.full((answers.shape[0], 1), V - 1, dtype=torch.long)], 1)
        Lt = answers.shape[1]
        H = _int_option("horizon", opts.get("horizon", Lt), Lt)
    P = prompt_tokens.shape[0]
    rho = torch.full((P,), 1.0 / P, dtype=torch.float64)
    if name == "table":
        rewards: Rewards = compact_rewards("dense", P, V, H, eos_token, int(seed) + 1)
    elif name == "rm":
        opts.update(hidden=hidden, scale=scale)
        rewards = RewardModelRewards(prompt_tokens, V, seed=int(seed) + 1, hidden=_int_option("hidden", hidden, 1),
                                     scale=scale)
    else:
        rewards = TargetRewards(answers, whole=score == "whole")
    options = dict(vocab=V, length=Lp, prompts=opts["prompts"], eos=eos, horizon=H, gamma=gamma, reward=reward,
                   seed=seed)
    if name in RULE_TASKS:
        options["score"] = score
    options.update((k, opts[k]) for k in ("target", "token", "base", "hidden", "scale") if k in opts)
    if max_nodes != DEFAULT_MAX_NODES:
        options["max_nodes"] = max_nodes
    mdp = TaskMDP(V, H, rho, rewards, prompt_tokens, eos_token, gamma, max_nodes, name=_format_spec(name, options),
                  task=name, options=options, answers=answers)
    return mdp.zero_reward_twin() if reward == "terminal" else mdp


def _to_base_digits(value: int, base: int) -> list[int]:
    digits = []
    while True:
        digits.append(value % base)
        value //= base
        if value == 0:
            return digits[::-1]


def task_from_spec(spec: str) -> TaskMDP:
    """``make_task(**parse_task_spec(spec))``."""
    return make_task(**parse_task_spec(spec))
