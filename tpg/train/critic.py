"""PPO's learned critic, trained online from the sampled batches and held by the trainer.

The critic estimates ``V_hat(s_t) ~ E[sum_{k >= t} gamma^(k-t) r'_k | s_t]``, the discounted return
of verl's ``token_level_rewards`` ``r'`` (``RM`` on the last token) under the estimator's
``gamma``, at the states ``s_1 .. s_{H+1}`` of each response (``[B, H + 1]``, 0 from the complete
response ``s_{T+1}`` on). The PPO estimator reads it through the context hook
``critic_values(batch, "tabular", ...)``; the trainer then regresses it on the batch's
lambda-returns ``R_t = A_t + V_old(s_t)`` (GAE advantages plus the values they were computed
with), in the same epochs and minibatches as the policy, as PPO does.

Two models:

* :class:`TableCritic`: one value per non-terminal tree state (``N_nt`` parameters), updated by
  ``V(s) <- V(s) + lr * mean_{visits of s in the minibatch} (R_t - V(s))`` (a running-average
  step; ``lr = 1`` sets each visited state to its minibatch mean return). Its state is the table.
* :class:`TransformerCritic`: the policy's transformer architecture with its token head replaced
  by a scalar value head (zero-initialised, so ``V = 0`` at the start), trained by Adam on
  ``1/2 sum_tokens w (V(s_t) - R_t)^2`` with the policy's aggregation weights. Its state is the
  module's and Adam's. This is the critic an LLM trainer holds: a second model of the policy's size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..verify.context import node_paths


class TableCritic:
    """One value per non-terminal state of ``mdp``'s tree, updated by running-average steps."""

    kind = "table"

    def __init__(self, mdp, lr: float):
        if not 0 < lr <= 1:
            raise ValueError(f"TrainConfig.critic_lr: a table critic's step size must be in (0, 1], got {lr}")
        self.tree = mdp.tree
        self.lr = float(lr)
        self.table = torch.zeros(self.tree.num_nonterminal, dtype=torch.float64)

    def _nt(self, prompt_b, tokens_bt, mask_bt) -> torch.Tensor:
        """Non-terminal index of ``s_1 .. s_{H+1}``, ``[B, H + 1]``, -1 at terminal states and after the end."""
        nodes = node_paths(self.tree, prompt_b, tokens_bt, mask_bt)
        return torch.where(nodes >= 0, self.tree.nt_index_n[nodes.clamp(min=0)], torch.full_like(nodes, -1))

    def values(self, prompt_b, tokens_bt, mask_bt) -> torch.Tensor:
        nt = self._nt(prompt_b, tokens_bt, mask_bt)
        return torch.where(nt >= 0, self.table[nt.clamp(min=0)], torch.zeros((), dtype=torch.float64))

    def update(self, prompt_b, tokens_bt, mask_bt, returns_bt, weights_bt) -> float:
        """One step towards the minibatch's returns; the mean squared error before it."""
        H = tokens_bt.shape[1]
        nt = self._nt(prompt_b, tokens_bt, mask_bt)[:, :H]
        valid = mask_bt & (nt >= 0)
        k, g = nt[valid], returns_bt[valid].to(torch.float64)
        if k.numel() == 0:
            return 0.0
        err = g - self.table[k]
        n = self.table.numel()
        visits = torch.zeros(n, dtype=torch.float64).index_add_(0, k, torch.ones_like(g))
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, k, err)
        seen = visits > 0
        self.table[seen] += self.lr * total[seen] / visits[seen]
        return float((err ** 2).mean())

    def parameters(self) -> list[torch.Tensor]:
        return [self.table]

    def held_tensors(self) -> list[torch.Tensor]:
        return [self.table]

    def state_dict(self) -> dict:
        return {"table": self.table.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.table = state["table"].clone()


class _ValueModel(nn.Module):
    def __init__(self, trunk, d_model: int):
        super().__init__()
        trunk.head = nn.Identity()  # forward_tokens now returns the final hidden states
        self.trunk = trunk
        self.value_head = nn.Linear(d_model, 1, dtype=next(trunk.parameters()).dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


class TransformerCritic:
    """The policy's architecture with a scalar value head, trained by Adam (see the module docstring)."""

    kind = "transformer"

    def __init__(self, mdp, policy, lr: float, seed: int, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float = 0.0):
        from ..policies.transformer import TinyTransformerPolicy

        if not isinstance(policy, TinyTransformerPolicy):
            raise ValueError("TrainConfig.critic_model: a transformer critic needs a transformer policy (--task); "
                             "use critic_model=table")
        trunk = TinyTransformerPolicy(policy.vocab_size, policy.prompt_tokens.clone(), policy.horizon,
                                      n_layer=policy.n_layer, d_model=policy.d_model, n_head=policy.n_head,
                                      d_mlp=policy.blocks[0].fc.out_features, seed=seed,
                                      input_vocab=policy.input_vocab, dtype=next(policy.parameters()).dtype,
                                      incremental_sampling=False)
        self.model = _ValueModel(trunk, policy.d_model)
        self.prompt_len = policy.prompt_len
        self.max_grad_norm = float(max_grad_norm)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=betas, eps=eps, foreach=True)

    def _forward(self, prompt_b, tokens_bt) -> torch.Tensor:
        """``V`` of ``s_1 .. s_H`` (``[B, H]``): hidden states after the prompt and the first ``H - 1`` tokens."""
        trunk = self.model.trunk
        H = tokens_bt.shape[1]
        seq = torch.cat([trunk.prompt_tokens[prompt_b], tokens_bt[:, :H - 1].to(torch.long)], dim=1)
        hidden, _ = trunk.forward_tokens(seq)
        return self.model.value_head(hidden[:, self.prompt_len - 1:]).squeeze(-1)

    def values(self, prompt_b, tokens_bt, mask_bt) -> torch.Tensor:
        B, H = tokens_bt.shape
        with torch.no_grad():
            v = self._forward(prompt_b, tokens_bt).to(torch.float64)
        out = torch.zeros(B, H + 1, dtype=torch.float64)
        out[:, :H] = torch.where(mask_bt, v, torch.zeros((), dtype=torch.float64))
        return out

    def update(self, prompt_b, tokens_bt, mask_bt, returns_bt, weights_bt) -> float:
        v = self._forward(prompt_b, tokens_bt)
        err = torch.where(mask_bt, v - returns_bt.to(v.dtype), torch.zeros((), dtype=v.dtype))
        loss = 0.5 * (weights_bt.to(v.dtype) * err ** 2).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        m = mask_bt.sum().clamp(min=1)
        return float((err.detach() ** 2).sum() / m)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def held_tensors(self) -> list[torch.Tensor]:
        from .memory import optimizer_tensors
        return self.parameters() + optimizer_tensors(self.opt)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def make_critic(kind: str, mdp, policy, lr: float, seed: int, betas, eps: float, max_grad_norm: float):
    """The critic ``kind`` (``table`` or ``transformer``) for ``(mdp, policy)``."""
    if kind == "table":
        return TableCritic(mdp, lr)
    if kind == "transformer":
        return TransformerCritic(mdp, policy, lr, seed, betas, eps, max_grad_norm)
    raise ValueError(f"TrainConfig.critic_model: must be table or transformer, got {kind!r}")


__all__ = ["TableCritic", "TransformerCritic", "make_critic"]
