"""The two contexts the verifier hands to estimators (the hooks of
:class:`~tpg.estimators.base.EstimatorContext`).

:class:`ExactContext` (``exact = True``) returns expectations, so that an estimator whose advantage
is *linear* in a hook's output has an exact expected gradient over the response sample space:

* ``continuation_values(prefix, K)`` = ``V'(prefix) = E[RM(W) | prefix]`` (the mean of ``K``
  continuations has this expectation for every ``K``);
* ``critic_values(kind="noisy", noise="fresh")`` = the exact critic (the noise has mean 0);
* ``random_generator()`` refuses (``ValueError``): an estimator that draws its own random numbers
  must take their expectation itself in exact mode, or be verified in Monte Carlo mode.

:class:`MonteCarloContext` (``exact = False``) samples: ``K`` continuations per prefix with
:func:`tpg.rollouts.sample_continuations`, fresh critic noise per call, and hands out its generator.

Both count the policy tokens sampled for estimators in ``tokens_sampled`` (expected counts in exact
mode): continuation tokens beyond the given prefix and greedy responses. Fitting a tabular critic is
counted separately in ``critic_tokens``.

Critics (``critic_values(batch, kind, gamma, options)``) estimate the discounted zero-reward-assumption
return ``E[gamma^(T-t) RM(W) | s_t]`` under the *estimator's* ``gamma``, i.e. the value of the MDP whose
only reward is ``RM(W)`` on each response's last token (what PPO's critic fits on verl's
``token_level_rewards``):

* ``exact``: the dynamic programme of :func:`tpg.exact.engine.solve` with that reward and ``gamma``;
* ``zero``: 0 everywhere;
* ``noisy``: exact plus ``N(0, sigma^2)`` noise, ``noise=fixed`` (one seeded draw per tree node,
  a fixed wrong critic; option ``critic_seed``) or ``noise=fresh`` (a new draw at every call);
* ``tabular``: a table fitted by regression on sampled returns: ``steps`` rounds of ``samples``
  responses each (default 20 and 64; seeded by ``critic_seed``), each round a per-state step
  ``V[s] <- V[s] + lr_s * mean_visits(G_t - V[s])`` with ``lr_s`` = (this round's visits) / (all visits
  so far), i.e. the least-squares fit of every return seen (the per-state running mean), or a
  constant ``lr`` option; unvisited states keep 0.

The value after the end (``t > T``) is 0 for every kind.
"""

from __future__ import annotations

import torch

from ..exact.engine import backward_values, solve
from ..rollouts import sample, sample_continuations

CRITIC_KINDS = ("exact", "zero", "noisy", "tabular")


def node_paths(tree, prompt_b: torch.Tensor, tokens_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """Node id of the state ``s_t`` for ``t = 1 .. H + 1`` (``s_{T+1}`` is the complete response),
    ``[B, H + 1]``, -1 after it."""
    B, H = tokens_bt.shape
    out = torch.full((B, H + 1), -1, dtype=torch.long)
    node = prompt_b.clone()
    out[:, 0] = node
    V, P = tree.vocab_size, tree.num_prompts
    for t in range(H):
        m = mask_bt[:, t]
        k = tree.nt_index_n[node.clamp(min=0)]
        node = torch.where(m & (node >= 0) & (k >= 0), P + k * V + tokens_bt[:, t], torch.full_like(node, -1))
        out[:, t + 1] = node
    return out


def prefix_nodes(tree, prompt_b: torch.Tensor, prefix_bt: torch.Tensor, prefix_len_b: torch.Tensor) -> torch.Tensor:
    """Node id of each ``(prompt, first prefix_len tokens)``, ``[B]``; ``ValueError`` past a terminal state."""
    prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
    prefix_bt = torch.as_tensor(prefix_bt, dtype=torch.long)
    prefix_len_b = torch.as_tensor(prefix_len_b, dtype=torch.long).flatten()
    node = prompt_b.clone()
    V, P = tree.vocab_size, tree.num_prompts
    for t in range(prefix_bt.shape[1] if prefix_bt.dim() == 2 else 0):
        step = t < prefix_len_b
        if not bool(step.any()):
            break
        k = tree.nt_index_n[node]
        if bool((step & (k < 0)).any()):
            raise ValueError("a continuation prefix runs past the end of its response (terminal state)")
        node = torch.where(step, P + k.clamp(min=0) * V + prefix_bt[:, t], node)
    return node


class _ContextBase:
    """What the tree contexts and the Markov contexts (:mod:`tpg.verify.markov_context`) share: the
    bookkeeping, the greedy response's cache and the tabular critic's fit, over the states a subclass
    indexes (``_num_states()`` of them; ``_rollout_states(ro)``: the state before each token, ``[B, H]``)."""

    exact: bool = True

    def __init__(self, mdp, policy, seed: int, ref_policy, sol):
        self.mdp = mdp
        self.policy = policy
        self.ref_policy = ref_policy
        self.seed = int(seed)
        self.sol = sol
        self.tokens_sampled = 0
        self.critic_tokens = 0
        self.hook_calls: dict[str, int] = {}
        self._critic_cache: dict = {}
        self._greedy = None
        self._remaining_len = None

    # -------------------------------------------------------------- bookkeeping
    def _called(self, name: str) -> None:
        self.hook_calls[name] = self.hook_calls.get(name, 0) + 1

    # -------------------------------------------------------------- hooks
    def greedy_rm(self, prompt_b: torch.Tensor) -> torch.Tensor:
        """``RM`` of the argmax-decoded response to each prompt, ``[B]`` (deterministic in both modes)."""
        self._called("greedy_rm")
        if self._greedy is None:
            self._greedy = self._greedy_responses()
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long)
        rm_p, len_p = self._greedy
        self.tokens_sampled += int(len_p[prompt_b].sum())
        return rm_p[prompt_b].clone()

    # -------------------------------------------------------------- critics
    def _tabular_critic(self, gamma: float, options: dict) -> torch.Tensor:
        """A table over the states fitted to sampled returns ``g^(T-t) RM`` (the module docstring's rule)."""
        steps = int(options.get("steps", 20))
        samples = int(options.get("samples", 64))
        lr = options.get("lr")
        lr = None if lr is None else float(lr)
        seed = int(options.get("critic_seed", self.seed))
        if steps < 0 or samples < 1 or (lr is not None and not 0 < lr <= 1):
            raise ValueError(f"tabular critic needs steps >= 0, samples >= 1 and lr in (0, 1]; "
                             f"got steps={steps}, samples={samples}, lr={lr}")
        key = ("tabular", float(gamma), steps, samples, lr, seed)
        if key in self._critic_cache:
            return self._critic_cache[key]
        S = self._num_states()
        table = torch.zeros(S, dtype=torch.float64)
        seen_total = torch.zeros(S, dtype=torch.float64)
        gen = torch.Generator().manual_seed(seed)
        t_idx = torch.arange(1, self.mdp.horizon + 1, dtype=torch.float64)
        for _ in range(steps):
            ro = sample(self.mdp, self.policy, num_prompts=samples, generator=gen)
            self.critic_tokens += ro.num_tokens
            states = self._rollout_states(ro)
            ret = ro.rm.unsqueeze(1) * float(gamma) ** (ro.length.unsqueeze(1).to(torch.float64) - t_idx)
            n, g = states[ro.mask], ret[ro.mask]
            visits = torch.zeros(S, dtype=torch.float64).index_add_(0, n, torch.ones_like(g))
            err = torch.zeros(S, dtype=torch.float64).index_add_(0, n, g - table[n])
            seen_total += visits
            hit = visits > 0
            # lr=None: step 1/(visits so far), the running mean, i.e. the least-squares fit of every
            # return seen; a constant lr tracks the recent steps only. Only states a token is drawn
            # from are visited, never a terminal one, so every other entry stays 0.
            step = visits[hit] / seen_total[hit] if lr is None else torch.full_like(visits[hit], lr)
            table[hit] += step * err[hit] / visits[hit]
        self._critic_cache[key] = table
        return table


class _ExactMode:
    """Exact mode's own hooks, mixed into the tree and the Markov exact contexts."""

    exact = True

    def _check_continuations(self, num_continuations: int) -> None:
        self._called("continuation_values")
        if int(num_continuations) < 1:
            raise ValueError(f"num_continuations must be >= 1, got {num_continuations!r}")

    def random_generator(self) -> torch.Generator:
        self._called("random_generator")
        raise ValueError("exact mode cannot take the expectation over an estimator's own random draws "
                         "(random anchors); use Monte Carlo mode (--mode mc)")


class _MonteCarloMode:
    """Monte Carlo mode's own hooks, mixed into the tree and the Markov Monte Carlo contexts: one
    generator drives continuations, fresh critic noise and the estimator's own draws."""

    exact = False

    def __init__(self, mdp, policy, generator: torch.Generator | None = None, seed: int = 0, ref_policy=None,
                 sol=None):
        super().__init__(mdp, policy, seed=seed, ref_policy=ref_policy, sol=sol)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, num_continuations: int) -> torch.Tensor:
        """Mean ``RM`` of ``K`` sampled continuations of each prefix, ``[B]``; counts their tokens."""
        self._called("continuation_values")
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
        K = int(num_continuations)
        if prompt_b.numel() == 0:
            return torch.zeros(0, dtype=torch.float64)
        ro = sample_continuations(self.mdp, self.policy, prompt_b, prefix_bt, prefix_len_b, K,
                                  generator=self.generator)
        self.tokens_sampled += ro.num_tokens
        return ro.rm.view(-1, K).mean(1)

    def random_generator(self) -> torch.Generator:
        self._called("random_generator")
        return self.generator


class _TreeContext(_ContextBase):
    """Hooks shared by both contexts: everything comes from the stored tree and the exact solution."""

    def __init__(self, mdp, policy, seed: int = 0, ref_policy=None, sol=None):
        super().__init__(mdp, policy, seed, ref_policy, sol if sol is not None else solve(mdp, policy, with_grad=False))
        self.tree = mdp.tree

    # -------------------------------------------------------------- states
    def _num_states(self) -> int:
        return self.tree.num_nodes

    def _rollout_states(self, ro) -> torch.Tensor:
        """The node of the state before each token of ``ro``, ``[B, H]`` (-1 on padding)."""
        return node_paths(self.tree, ro.prompt, ro.tokens, ro.mask)[:, :self.tree.horizon]

    def remaining_length(self) -> torch.Tensor:
        """Expected number of tokens still to come from each node, ``E[T - d | s]``, per node."""
        if self._remaining_len is None:
            ones = torch.ones(self.tree.num_nonterminal, self.tree.vocab_size, dtype=torch.float64)
            pi = self.sol.logp.exp()
            self._remaining_len, _ = backward_values(self.tree, pi, ones, 1.0)
        return self._remaining_len

    # -------------------------------------------------------------- hooks
    def _greedy_responses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(RM, length)`` of the argmax-decoded response to each prompt, ``[P]`` each."""
        tree, logp = self.tree, self.sol.logp
        node = torch.arange(tree.num_prompts)
        while True:
            k = tree.nt_index_n[node]
            live = k >= 0
            if not bool(live.any()):
                break
            tok = logp[k.clamp(min=0)].argmax(1)
            node = torch.where(live, tree.num_prompts + k.clamp(min=0) * tree.vocab_size + tok, node)
        return self.sol.past[node], tree.depth_n[node]

    def prompt_values(self, prompt_b: torch.Tensor) -> torch.Tensor:
        """Exact ``V'(s_1) = E[RM(W) | x]`` of each prompt, ``[B]``."""
        self._called("prompt_values")
        return self.sol.value[torch.as_tensor(prompt_b, dtype=torch.long)].clone()

    def _zra_value(self, gamma: float, options: dict | None = None) -> torch.Tensor:
        """``E[sum_{k >= t} gamma^(k-t) r'_k | s_t]`` per node for verl's ``token_level_rewards``
        ``r'`` (``RM`` on the last token), minus ``beta Delta`` per token with ``kl=k1_reward``."""
        options = options or {}
        kl = str(options.get("kl", "none"))
        beta = float(options.get("kl_beta", 0.0)) if kl == "k1_reward" else 0.0
        key = ("exact", float(gamma), beta)
        if key not in self._critic_cache:
            tree = self.tree
            edge = torch.zeros(tree.num_nodes, dtype=torch.float64)
            edge[tree.leaf_ids] = self.sol.response_rm
            r_kv = edge[tree.num_prompts:].view(-1, tree.vocab_size).clone()
            if beta != 0.0:
                if self.ref_policy is None:
                    raise ValueError("critic with kl=k1_reward needs a reference policy in the context")
                with torch.no_grad():
                    ref = self.ref_policy.node_log_probs(tree).to(torch.float64)
                r_kv -= beta * (self.sol.logp - ref)
            value, _ = backward_values(tree, self.sol.logp.exp(), r_kv, float(gamma))
            self._critic_cache[key] = value
        return self._critic_cache[key]

    def _critic_table(self, kind: str, gamma: float, options: dict) -> torch.Tensor | None:
        """Per-node critic values for the deterministic kinds (``None`` for fresh noise)."""
        if kind not in CRITIC_KINDS:
            raise ValueError(f"critic kind must be one of {', '.join(CRITIC_KINDS)}; got {kind!r}")
        terminal = self.tree.nt_index_n < 0
        if kind == "exact":
            return self._zra_value(gamma, options)
        if kind == "zero":
            return torch.zeros(self.tree.num_nodes, dtype=torch.float64)
        if kind == "noisy":
            sigma = float(options.get("sigma", 0.1))
            noise = str(options.get("noise", "fixed"))
            if noise not in ("fixed", "fresh"):
                raise ValueError(f"critic noise must be 'fixed' or 'fresh', got {noise!r}")
            if noise == "fresh":
                return None
            seed = int(options.get("critic_seed", self.seed))
            key = ("noisy", float(gamma), sigma, seed, str(options.get("kl", "none")), options.get("kl_beta"))
            if key not in self._critic_cache:
                gen = torch.Generator().manual_seed(seed)
                eps = torch.randn(self.tree.num_nodes, generator=gen, dtype=torch.float64) * sigma
                self._critic_cache[key] = torch.where(terminal, 0.0, self._zra_value(gamma, options) + eps)
            return self._critic_cache[key]
        return self._tabular_critic(gamma, options)

    def critic_values(self, batch, kind: str, gamma: float, options: dict) -> torch.Tensor:
        """``V_hat(s_t)`` for ``t = 1 .. H + 1``, ``[B, H + 1]`` (0 from the complete response on)."""
        self._called("critic_values")
        options = dict(options or {})
        table = self._critic_table(kind, gamma, options)
        nodes = node_paths(self.tree, batch.prompt, batch.tokens, batch.mask)
        live = (nodes >= 0) & (self.tree.nt_index_n[nodes.clamp(min=0)] >= 0)
        if table is not None:
            return torch.where(live, table[nodes.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        base = self._zra_value(gamma, options)[nodes.clamp(min=0)]
        if not self.exact:
            sigma = float(options.get("sigma", 0.1))
            base = base + sigma * torch.randn(base.shape, generator=self.generator, dtype=torch.float64)
        return torch.where(live, base, torch.zeros((), dtype=torch.float64))


class ExactContext(_ExactMode, _TreeContext):
    """Expectations instead of samples (the verifier's exact mode); see the module docstring.

    Args:
        mdp, policy: the problem (its tree must be stored).
        seed: default seed of the fixed critics (``noise=fixed``, ``tabular``).
        ref_policy: the reference policy of KL options (the critic of ``kl=k1_reward`` fits the
            penalised return).
        sol: the exact solution of ``(mdp, policy)`` when already computed.
    """

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, num_continuations: int) -> torch.Tensor:
        """``E[RM(W) | prefix] = V'(prefix)`` exactly, ``[B]``; counts ``K E[remaining tokens]``."""
        self._check_continuations(num_continuations)
        node = prefix_nodes(self.tree, prompt_b, prefix_bt, prefix_len_b)
        self.tokens_sampled += float(num_continuations) * float(self.remaining_length()[node].sum())
        return self.sol.value_resp[node].clone()


class MonteCarloContext(_MonteCarloMode, _TreeContext):
    """Samples (the verifier's Monte Carlo mode); see the module docstring.

    Args:
        mdp, policy: the problem.
        generator: drives continuations, fresh critic noise and the estimator's own draws.
        seed: default seed of the fixed critics (``noise=fixed``, ``tabular``).
        ref_policy, sol: as for :class:`ExactContext`.
    """
