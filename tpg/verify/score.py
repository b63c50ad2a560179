"""Per-batch gradient estimates from the analytic softmax score, without backward passes.

Every estimator's single-batch gradient is ``g = sum_{r,t} c[r,t] grad log pi(w_{r,t} | s_{r,t})``
with ``c = EstimatorOutput.score_coef()``. In node-logit space (one logit row per non-terminal
node ``s``, ``[N_nt, V]``) the softmax score is analytic,

    d log pi(w | s) / d logit_s = e_w - pi(. | s),

so ``g`` in logit space is a scatter-add of ``c (e_w - pi(.|s_t))`` into row ``nt(s_t)``, and the
parameter-space gradient is the linear map ``J^T g`` with ``J = d logits / d theta`` (the identity
for :class:`~tpg.policies.TabularSoftmax`). Verdicts are taken in parameter space, so they hold for
any policy (a shared-parameter policy can turn a logit-space bias into none, or the reverse).

The projection of ``g`` on a parameter direction ``u`` is ``<J^T g, u> = <g, J u>``; with
``a_u[s, w] = (J u)[s, w] - sum_v pi(v|s) (J u)[s, v]`` it is ``sum_{r,t} c[r,t] a_u[nt, w]``: one gather
per token, so thousands of Monte Carlo batches cost one pass over their tokens.

Nothing here needs the rows to be tree nodes: every function takes a row index per token (``nt_bt``)
and ``pi`` per row. For a :class:`~tpg.policies.SharedSoftmax` policy the rows can be its own logit
rows, the Markov states ``(t, prev)`` (flat ``t (V + P) + prev``, :func:`tpg.verify.markov_context.batch_states`),
with :class:`RowParamMap` as ``J``: Monte Carlo verification at horizons no tree can hold.
"""

from __future__ import annotations

import torch

from ..exact.engine import policy_gradient_from_logit_grad

#: Largest dense Jacobian ``[N_nt * V, num_params]`` built for a non-tabular policy.
MAX_JACOBIAN_ENTRIES = 20_000_000


class ParamMap:
    """The linear map between node-logit space ``[N_nt, V]`` and the policy's parameters.

    ``to_params(g)`` is ``J^T g`` (a gradient in logits to a gradient in parameters) and
    ``to_logits(U)`` is ``J U`` (parameter directions to logit directions). A tabular policy
    whose node logits *are* its one parameter uses the identity; any other policy gets its
    Jacobian once, densely, by ``N_nt V`` vector-Jacobian products (size guard:
    :data:`MAX_JACOBIAN_ENTRIES`), and covariances are kept in logit space (``[N_nt V]^2``) and
    mapped by :meth:`param_trace` / :meth:`param_cov`.
    """

    def __init__(self, policy, tree):
        self.policy = policy
        self.tree = tree
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.logit_shape = (tree.num_nonterminal, tree.vocab_size)
        self.logit_dim = tree.num_nonterminal * tree.vocab_size
        with torch.no_grad():
            logits = policy.node_logits(tree)
        self.identity = (len(self.params) == 1 and logits is self.params[0]
                         and tuple(logits.shape) == self.logit_shape)
        self._jac: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None

    def jacobian(self) -> torch.Tensor:
        """``J = d logits / d theta`` as a dense ``[N_nt * V, num_params]`` float64 matrix."""
        if self.identity:
            return torch.eye(self.logit_dim, dtype=torch.float64)
        if self._jac is None:
            if self.logit_dim * self.num_params > MAX_JACOBIAN_ENTRIES:
                raise ValueError(f"the policy's logit Jacobian would have {self.logit_dim:,} x {self.num_params:,} "
                                 f"entries, above {MAX_JACOBIAN_ENTRIES:,}: verify a tabular policy or a smaller tree")
            rows = []
            with torch.enable_grad():
                logits = self.policy.node_logits(self.tree).reshape(-1)
                chunk = max(1, min(self.logit_dim, 4096))
                for start in range(0, self.logit_dim, chunk):
                    stop = min(start + chunk, self.logit_dim)
                    eye = torch.zeros(stop - start, self.logit_dim, dtype=logits.dtype)
                    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
                    try:
                        grads = torch.autograd.grad(logits, self.params, grad_outputs=eye, retain_graph=True,
                                                    is_grads_batched=True, allow_unused=True)
                        parts = [torch.zeros(stop - start, p.numel(), dtype=torch.float64) if g is None
                                 else g.reshape(stop - start, -1).to(torch.float64) for p, g in zip(self.params, grads)]
                        rows.append(torch.cat(parts, 1))
                    except RuntimeError:  # a policy whose ops do not vmap: one row at a time
                        for i in range(stop - start):
                            grads = torch.autograd.grad(logits, self.params, grad_outputs=eye[i], retain_graph=True,
                                                        allow_unused=True)
                            rows.append(torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None
                                                   else g.reshape(-1).to(torch.float64)
                                                   for p, g in zip(self.params, grads)]).unsqueeze(0))
            self._jac = torch.cat(rows, 0)
        return self._jac

    def to_params(self, g_nv: torch.Tensor) -> torch.Tensor:
        """``J^T g``: logit-space gradients ``[..., N_nt, V]`` (or ``[..., N_nt * V]``) to ``[..., num_params]``.

        A single vector costs one backward pass until the Jacobian exists; batches use the Jacobian."""
        if g_nv.dim() >= 2 and tuple(g_nv.shape[-2:]) == self.logit_shape:
            flat = g_nv.reshape(*g_nv.shape[:-2], self.logit_dim)
        else:
            flat = g_nv
        if self.identity:
            return flat.to(torch.float64)
        if flat.dim() == 1 and self._jac is None:
            grads = policy_gradient_from_logit_grad(self.policy, self.tree, flat.view(self.logit_shape))
            return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
        return flat.to(torch.float64) @ self.jacobian()

    def to_logits(self, u_pk: torch.Tensor) -> torch.Tensor:
        """``J U``: parameter directions ``[num_params, k]`` to logit directions ``[N_nt, V, k]``."""
        if self.identity:
            return u_pk.reshape(*self.logit_shape, -1)
        return (self.jacobian() @ u_pk).reshape(*self.logit_shape, -1)

    def gram(self) -> torch.Tensor | None:
        """``K = J J^T`` ``[N_nt V, N_nt V]`` (``None`` for the identity map), so that a logit-space
        covariance ``C`` has parameter-space trace ``tr(J^T C J) = sum(C * K)``."""
        if self.identity:
            return None
        if self._gram is None:
            J = self.jacobian()
            self._gram = J @ J.T
        return self._gram

    def param_trace(self, cov_logit: torch.Tensor) -> float:
        """``tr(J^T C J)`` of a logit-space covariance ``C`` ``[N_nt V, N_nt V]``."""
        K = self.gram()
        return float(cov_logit.trace()) if K is None else float((cov_logit * K).sum())

    def param_cov(self, cov_logit: torch.Tensor) -> torch.Tensor:
        """``J^T C J``: a logit-space covariance in parameter space, ``[num_params, num_params]``."""
        if self.identity:
            return cov_logit
        if self.num_params ** 2 > MAX_JACOBIAN_ENTRIES:
            raise ValueError(f"a {self.num_params:,} x {self.num_params:,} covariance matrix is too large; "
                             f"ask for its trace only (with_cov=False)")
        J = self.jacobian()
        return J.T @ cov_logit @ J


class RowParamMap:
    """The map between a :class:`~tpg.policies.SharedSoftmax` policy's logit rows and its parameters,
    for Monte Carlo verification without a tree (:mod:`tpg.verify.markov_context`).

    The rows are the states ``(t, prev)`` of the Markov engine (:mod:`tpg.exact.markov`), flat index
    ``t (V + P) + prev`` for ``t < H`` (the MDP's horizon): ``[H (V + P), V]``, the same "logit space"
    as :class:`ParamMap`'s node rows, one row per state instead of per tree node. The policy's one
    parameter is the table ``theta [H_pi, V + P, V]`` with ``H_pi >= H``, whose first ``H (V + P)`` rows
    are these rows, so ``J = d logits / d theta`` selects them:

        to_params(g) = [g; 0]   (positions ``t >= H`` of a longer policy get gradient 0),
        to_logits(U) = U[:H (V + P) V],    J^T J restricted to the rows = I.

    Norms, inner products and traces are therefore the same in both spaces, which is what
    ``identity = True`` tells :func:`tpg.verify.montecarlo.sample_variance_trace` (no ``[D, D]``
    matrix is formed: ``D`` is ``H (V + P) V``, 73,728 at ``H = 1024, V = 8``). A policy with other
    trainable parameters would need a dense Jacobian of that many rows: refused (``ValueError``).
    """

    identity = True

    def __init__(self, policy, horizon: int):
        from ..policies.tabular import SharedSoftmax

        if not isinstance(policy, SharedSoftmax):
            raise ValueError(f"row-space verification needs a SharedSoftmax policy, got {type(policy).__name__}")
        self.policy = policy
        self.params = [p for p in policy.parameters() if p.requires_grad]
        if len(self.params) != 1 or self.params[0] is not policy.logits:
            raise ValueError("row-space verification needs the shared logit table to be the policy's one trainable "
                             "parameter (a dense Jacobian over H (V + P) V logits is out of reach at long horizons)")
        if policy.horizon < horizon:
            raise ValueError(f"the shared policy's horizon {policy.horizon} is below the MDP's {horizon}")
        V, R = policy.vocab_size, policy.vocab_size + policy.num_prompts
        self.num_params = policy.logits.numel()
        self.logit_shape = (horizon * R, V)
        self.logit_dim = horizon * R * V

    def to_params(self, g_nv: torch.Tensor) -> torch.Tensor:
        """``J^T g``: row-space gradients ``[..., H R, V]`` (or ``[..., H R V]``) to ``[..., num_params]``."""
        if g_nv.dim() >= 2 and tuple(g_nv.shape[-2:]) == self.logit_shape:
            g_nv = g_nv.reshape(*g_nv.shape[:-2], self.logit_dim)
        flat = g_nv.to(torch.float64)
        if self.num_params == self.logit_dim:
            return flat
        out = torch.zeros(*flat.shape[:-1], self.num_params, dtype=torch.float64)
        out[..., :self.logit_dim] = flat
        return out

    def to_logits(self, u_pk: torch.Tensor) -> torch.Tensor:
        """``J U``: parameter directions ``[num_params, k]`` to row directions ``[H R, V, k]``."""
        return u_pk[:self.logit_dim].reshape(*self.logit_shape, -1)

    def gram(self) -> None:
        """``None``: ``J J^T`` is the identity on the rows."""
        return None

    def param_trace(self, cov_logit: torch.Tensor) -> float:
        """``tr(J^T C J) = tr C``."""
        return float(cov_logit.trace())

    def param_cov(self, cov_logit: torch.Tensor) -> torch.Tensor:
        """``J^T C J``: ``C`` padded with zeros for the positions past the MDP's horizon."""
        if self.num_params == self.logit_dim:
            return cov_logit
        out = torch.zeros(self.num_params, self.num_params, dtype=torch.float64)
        out[:self.logit_dim, :self.logit_dim] = cov_logit
        return out


def token_nt(tree, nodes_bt: torch.Tensor) -> torch.Tensor:
    """Non-terminal index of each state ``s_t`` (-1 on padding), ``[B, H]``."""
    return torch.where(nodes_bt >= 0, tree.nt_index_n[nodes_bt.clamp(min=0)], torch.full_like(nodes_bt, -1))


def logit_gradient(coef_bt: torch.Tensor, nt_bt: torch.Tensor, tok_bt: torch.Tensor, pi_nv: torch.Tensor,
                   row_weight_b: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_r weight_r sum_t c[r,t] (e_w - pi(.|s_t))`` scattered into node-logit space, ``[N_nt, V]``.

    Args:
        coef_bt: score coefficients ``[B, H]`` (zero on padding).
        nt_bt: non-terminal index of ``s_t`` (-1 on padding), ``[B, H]``.
        tok_bt: the token ``w_t``, ``[B, H]``.
        pi_nv: ``pi(.|s)`` for every non-terminal node, ``[N_nt, V]``.
        row_weight_b: optional weight of each row (the probability of its sample in exact mode).
    """
    c = coef_bt.to(torch.float64)
    if row_weight_b is not None:
        c = c * row_weight_b.to(torch.float64).unsqueeze(1)
    valid = nt_bt >= 0
    nt, tok, cv = nt_bt[valid], tok_bt[valid], c[valid]
    N, V = pi_nv.shape
    g = torch.zeros(N * V, dtype=torch.float64)
    g.index_add_(0, nt * V + tok, cv)
    g = g.view(N, V)
    node_mass = torch.zeros(N, dtype=torch.float64).index_add_(0, nt, cv)
    return g - node_mass.unsqueeze(1) * pi_nv


def batch_logit_gradients(coef_bt: torch.Tensor, nt_bt: torch.Tensor, tok_bt: torch.Tensor, pi_nv: torch.Tensor,
                          batch_b: torch.Tensor, num_batches: int) -> torch.Tensor:
    """One logit-space gradient per batch id, ``[num_batches, N_nt * V]`` (dense; for small sample spaces)."""
    valid = nt_bt >= 0
    N, V = pi_nv.shape
    bid = batch_b.unsqueeze(1).expand_as(nt_bt)[valid]
    nt, tok, cv = nt_bt[valid], tok_bt[valid], coef_bt.to(torch.float64)[valid]
    g = torch.zeros(num_batches * N * V, dtype=torch.float64)
    g.index_add_(0, (bid * N + nt) * V + tok, cv)
    g = g.view(num_batches, N, V)
    mass = torch.zeros(num_batches * N, dtype=torch.float64).index_add_(0, bid * N + nt, cv).view(num_batches, N)
    g -= mass.unsqueeze(2) * pi_nv.unsqueeze(0)
    return g.view(num_batches, N * V)


#: Entries of one chunk's ``[pairs, V]`` table in :func:`batch_sq_norms`.
_SQ_CHUNK_ENTRIES = 2_000_000


def batch_sq_norms(coef_bt: torch.Tensor, nt_bt: torch.Tensor, tok_bt: torch.Tensor, pi_nv: torch.Tensor,
                   batch_b: torch.Tensor, num_batches: int) -> torch.Tensor:
    """``|g_b|^2`` (logit space) of every batch id, ``[num_batches]``, without forming ``g_b``: ``g_b`` is
    non-zero only in the rows its tokens visit, and in row ``s`` it is ``a - m pi(.|s)`` with
    ``a_w = sum c [w_t = w]`` over the batch's tokens at ``s`` and ``m = sum_w a_w``, so

        |g_b|^2 = sum over the (batch, row) pairs visited of |a - m pi(.|s)|^2.

    ``O(tokens)`` memory (the pairs' ``[pairs, V]`` tables are formed a chunk of pairs at a time) and
    ``O(tokens log tokens + pairs V)`` work, where :func:`batch_logit_gradients` needs
    ``num_batches N_nt V`` (at ``H = 1024`` the Markov rows number ``~10^4``)."""
    valid = nt_bt >= 0
    N, V = pi_nv.shape
    bid = batch_b.unsqueeze(1).expand_as(nt_bt)[valid]
    key, order = torch.sort(bid * N + nt_bt[valid])  # tokens grouped by their (batch, row) pair
    pair, inv = torch.unique_consecutive(key, return_inverse=True)
    del key, bid
    tok, cv = tok_bt[valid][order], coef_bt.to(torch.float64)[valid][order]
    out = torch.zeros(num_batches, dtype=torch.float64)
    step = max(1, _SQ_CHUNK_ENTRIES // V)
    bounds = torch.searchsorted(inv, torch.arange(0, pair.numel() + step, step)).tolist()
    for i, p0 in enumerate(range(0, pair.numel(), step)):
        p1 = min(pair.numel(), p0 + step)
        lo, hi = bounds[i], bounds[i + 1]
        a = torch.zeros((p1 - p0) * V, dtype=torch.float64).index_add_(0, (inv[lo:hi] - p0) * V + tok[lo:hi],
                                                                        cv[lo:hi]).view(-1, V)
        dev = a - a.sum(1, keepdim=True) * pi_nv[pair[p0:p1] % N]
        out.index_add_(0, pair[p0:p1] // N, (dev * dev).sum(1))
    return out


def centered_directions(u_logit_nvk: torch.Tensor, pi_nv: torch.Tensor) -> torch.Tensor:
    """``a[s, w, j] = u[s, w, j] - sum_v pi(v|s) u[s, v, j]``: the score's inner product with each
    logit direction, ``<e_w - pi(.|s), u_j[s]>``, for every (node, token), ``[N_nt, V, k]``."""
    return u_logit_nvk - (pi_nv.unsqueeze(2) * u_logit_nvk).sum(1, keepdim=True)


def batch_projections(coef_bt: torch.Tensor, nt_bt: torch.Tensor, tok_bt: torch.Tensor, a_nvk: torch.Tensor,
                      batch_b: torch.Tensor, num_batches: int) -> torch.Tensor:
    """``<g_b, u_j>`` for every batch id ``b`` and direction ``j``, ``[num_batches, k]``, from
    :func:`centered_directions` (one gather per token, no per-batch gradient is formed)."""
    valid = nt_bt >= 0
    bid = batch_b.unsqueeze(1).expand_as(nt_bt)[valid]
    vals = coef_bt.to(torch.float64)[valid].unsqueeze(1) * a_nvk[nt_bt[valid], tok_bt[valid]]
    out = torch.zeros(num_batches, a_nvk.shape[2], dtype=torch.float64)
    return out.index_add_(0, bid, vals)
