"""Training with every estimator of the catalog, logging the exact objective at every iteration.

One iteration (:meth:`Trainer.step`):

1. sample ``prompts`` prompts from ``rho`` and ``group_size`` responses each (:func:`tpg.rollouts.sample`),
   with the current policy, or with a behaviour policy ``mu`` of it (``TrainConfig.behaviour``:
   :mod:`tpg.train.offpolicy`; the trainer then recomputes ``log pi_old`` of the sampled tokens, which
   the estimator sees as ``logp``, and keeps the sampler's ``log mu``);
2. the estimator maps the batch to advantages ``A [B, H]`` and aggregation weights ``w [B, H]``
   once, from the sampling policy (its context, :class:`TrainContext`, samples TRePO's
   continuations and ReMax's greedy response with the current policy, or with ``mu`` when there is a
   behaviour, as the verifier's off-policy mode does, and serves PPO's learned critic);
3. ``epochs`` passes over the batch in ``minibatches`` random minibatches, each one Adam step on
   PPO's clipped surrogate (:func:`~tpg.estimators.ppo.ppo_clip_loss`),

       L = - sum_{b,t} M w min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta sum_{b,t} M w k(log pi - log pi_ref),

   ``rho = pi_theta / pi_old`` against the sampling log-probabilities, the KL term only for the loss
   kinds ``k1 | k2 | k3`` (``k1_reward`` is inside ``A``), ``M`` the number of minibatches (so each
   minibatch's loss is on the scale of the whole batch's), the gradient's global norm clipped to
   ``max_grad_norm``. At the first step ``rho = 1`` and the gradient is the estimator's ``g``. With a
   behaviour ``mu`` the sampling log-probabilities are ``log mu`` (the catalog's ``ppo_clip:eps``, whose
   ``pi_old`` is the sampler). With ``TrainConfig.loss`` the minibatch's policy loss is instead that loss
   of the catalog (:mod:`tpg.offpolicy.losses`: ``pg``, ``is_token``, ``is_seq``, ``tis``, ``mis``,
   ``ppo_clip``, ``gspo``, ``cispo``, plug-ins) on the live ``log pi``, the sampler's ``log mu`` and the
   recomputed ``log pi_old`` (its ``old=pi``), aggregated with the same ``M w``; its importance ratios
   ``pi/mu`` use the live ``log pi`` (``pi_old/mu``, verl's rollout-correction weight, at an iteration's
   first step). ``behaviour=pi`` with ``loss=ppo_clip:<clip_eps>`` is the default run, bit for bit;
4. PPO's critic (when learned) regresses on the lambda-returns in the same minibatches;
5. the exact engine evaluates the new policy: ``J``, ``KL(pi || pi_ref)``, entropy.

All randomness (sampling, continuations, random anchors, minibatch order, critic noise) comes
from one ``torch.Generator`` seeded by ``TrainConfig.seed``, so a run is bitwise reproducible on
CPU, and a checkpoint (policy, optimiser, critic, estimator state such as a running baseline,
the generator's state, ``stale:k``'s queue of policy snapshots and the log) resumes it exactly.

Nothing is lost (:meth:`Trainer.run`, :func:`train`): with a checkpoint path the checkpoint and
the log are written atomically at the start, every ``checkpoint_every`` iterations (default 10)
or ``checkpoint_seconds`` (default 30), at the end, and after SIGINT/SIGTERM (which stop the run
between iterations with :class:`TrainingInterrupted`); a checkpoint file carries the sha256 of
its state (:func:`checkpoint_bytes`), so a damaged one is refused naming the file; a fresh run
never overwrites an existing log or checkpoint without ``force``.

Log columns (one row per iteration; row 0 is the initial policy, before any update):

* ``iter``; ``J`` — exact ``E_x E_W RM(W)`` of the policy after the iteration's updates (the
  zero-reward twin has the same ``J``); ``kl_ref`` — exact sequence ``KL(pi || pi_ref)`` to the
  frozen initial policy; ``entropy`` — exact expected *per-response* entropy
  ``E_x H(W | x) = sum_s mu(s) H(pi(.|s))`` in nats; ``entropy_token`` — that divided by the
  expected length ``E[T]`` (``length``);
* ``grad_norm`` — mean over the iteration's optimiser steps of the policy gradient's global
  norm before clipping; ``loss``, ``clip_frac`` (built-in loss: fraction of tokens whose ratio left
  ``[1 - eps, 1 + eps]``; a catalog loss: fraction of tokens whose gradient the loss sets to 0, clipped
  or masked, while ``w A != 0``), ``rm_mean`` (the batch's mean ``RM``), ``critic_loss`` (PPO);
* ``kl_mu_pi`` — exact per-token ``KL(mu || pi)`` along ``mu``'s responses of the iteration's behaviour
  (0 on-policy; NaN on row 0);
* ``groups_kept``, ``groups_dropped`` — the groups the update used and those dynamic sampling (a loss
  with ``filter_degenerate_groups``) dropped for equal rewards (``prompts`` and 0 without it; NaN and
  0 on row 0). When ``resample_rounds`` extra rounds leave some slots unfilled the update uses the
  groups kept, and with none kept the iteration makes no update (``grad_norm``, ``loss`` NaN);
* ``tokens`` — policy forward tokens spent on sampling: the batch's sampled tokens
  (``tokens_sampled``, dropped groups' included) plus the estimator's extra ones (``tokens_extra``: TRePO's
  continuations, ReMax's greedy responses); ``tokens_total`` cumulative;
* ``wall_s`` — seconds of the training step (sampling, advantages, updates; the memory meter's
  overhead included when on); ``eval_s`` — seconds of the exact evaluation;
* ``peak_mem_bytes`` — ``held_bytes`` (tensor bytes held when the step starts: the policy and
  its Adam state, the critic and its optimiser, the reference when a KL term is on, the reward
  model) plus the measured transient peak of the step (:mod:`tpg.train.memory`);
* ``method`` (the method name of ``--estimator``; earlier logs and checkpoints call it
  ``algo``, and :func:`~tpg.train.logio.read_log` and :meth:`Trainer.load` rename it), ``spec`` (the
  estimator's canonical spec), ``behaviour`` (the behaviour's spec, ``pi``
  on-policy), ``policy_loss`` (the loss's spec; the built-in loss is ``ppo_clip:<clip_eps>``), ``critic`` (``none``, ``table`` or
  ``transformer``: PPO's learned critic), ``seed``, ``reward``, ``problem``.
"""

from __future__ import annotations

import copy
import errno
import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from .._io import CHECKPOINT_ENVELOPE, unwrap_checkpoint
from .._progress import Note
from ..estimators import ResponseBatch, ppo_clip_loss
from ..estimators.kl import KL_LOSS_KINDS, canonical_kl_kind, kl_value
from ..exact.engine import solve
from ..offpolicy.behaviour import resolve_behaviour
from ..offpolicy.losses import LossInputs, get_loss
from ..rollouts import cat_rollouts, check_batches_fit, sample
from ..verify.context import MonteCarloContext, node_paths
from .config import RESUME_FREE_FIELDS, TrainConfig, renamed_fields
from .critic import make_critic
from .logio import RENAMED_COLUMNS
from .memory import TensorMemoryMeter, optimizer_tensors, param_count, reward_model_tensors, tensor_bytes
from .methods import build_estimator, needs_learned_critic
from .offpolicy import behaviour_table, parse_train_behaviour

CHECKPOINT_FORMAT = "tpg-train-checkpoint/1"
#: columns that differ between two runs of the same seed (time and memory measurements)
UNREPRODUCIBLE_COLUMNS = ("wall_s", "eval_s", "peak_mem_bytes")
LOG_COLUMNS = ("iter", "J", "kl_ref", "entropy", "entropy_token", "length", "grad_norm", "loss", "clip_frac",
               "rm_mean", "critic_loss", "kl_mu_pi", "groups_kept", "groups_dropped", "tokens", "tokens_sampled",
               "tokens_extra", "tokens_total",
               "wall_s", "eval_s", "held_bytes", "peak_mem_bytes", "method", "spec", "behaviour", "policy_loss",
               "critic", "seed", "reward", "problem")
#: values of the off-policy columns in the rows of a checkpoint written before they existed (on-policy runs)
_OFFPOLICY_DEFAULTS = {"kl_mu_pi": math.nan, "behaviour": "pi", "policy_loss": None, "groups_kept": math.nan,
                       "groups_dropped": 0}


def _renamed_columns(row: dict) -> dict:
    """A log row with the old column names of :data:`~tpg.train.logio.RENAMED_COLUMNS` replaced by the new ones."""
    if not any(old in row for old in RENAMED_COLUMNS):
        return row
    return {RENAMED_COLUMNS.get(k, k): v for k, v in row.items()}


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrainContext(MonteCarloContext):
    """The Monte Carlo estimator context of :mod:`tpg.verify.context`, sampling with the current
    policy and the trainer's generator, plus the trainer's learned critic: ``critic_values`` of kind
    ``tabular`` returns the critic's values (and keeps them in ``last_critic_values`` for the
    critic's regression targets); the other kinds are the verifier's (``exact`` is an oracle)."""

    def __init__(self, mdp, policy, generator, seed, ref_policy, sol, critic=None):
        super().__init__(mdp, policy, generator=generator, seed=seed, ref_policy=ref_policy, sol=sol)
        self.critic = critic
        self.last_critic_values = None

    def greedy_rm(self, prompt_b):
        # greedy decoding is deterministic: a trainer decodes each distinct prompt of the batch once
        # (verl's ReMax: one greedy response per prompt), so only those tokens are counted
        uniq, inv = torch.unique(torch.as_tensor(prompt_b, dtype=torch.long), return_inverse=True)
        return super().greedy_rm(uniq)[inv]

    def critic_values(self, batch, kind, gamma, options):
        if kind == "tabular" and self.critic is not None:
            self._called("critic_values")
            values = self.critic.values(batch.prompt, batch.tokens, batch.mask)
            self.last_critic_values = values
            return values
        return super().critic_values(batch, kind, gamma, options)


class _FixedLogProbs:
    """A policy stand-in returning precomputed ``log pi [N_nt, V]`` (one tree forward serves J and KL)."""

    def __init__(self, logp):
        self.logp = logp

    def node_logits(self, tree):  # log-probabilities are valid logits
        return self.logp

    def node_log_probs(self, tree):
        return self.logp

    def parameters(self):
        return iter(())


class Trainer:
    """A training run's state: problem, policy, reference, optimiser, critic, generator, log.

    Build with ``Trainer(config)`` (fresh) or :meth:`Trainer.load` (from a checkpoint); :meth:`run`
    trains up to ``config.iters`` and returns the log as a DataFrame."""

    def __init__(self, config: TrainConfig):
        from .problem import load_train_problem

        config.validate()
        problem = load_train_problem(config.task, config.mdp, config.case, config.reward)
        self.config = cfg = config.resolved(problem.kind)
        self.kind = problem.kind
        self.mdp, self.policy = problem.mdp, problem.policy
        # one iteration's batch must fit, now that the horizon is known (O(1), before any sampling)
        check_batches_fit(self.mdp.horizon, cfg.group_size, cfg.prompts, group_flag="TrainConfig.group_size",
                          groups_flag="TrainConfig.prompts")
        self.tree = self.mdp.tree
        self.problem_spec = problem.spec
        self.ref = copy.deepcopy(self.policy)
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.method, self.estimator = build_estimator(cfg.estimator, cfg.kl, cfg.kl_beta)
        self.kl_kind = canonical_kl_kind(cfg.kl)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                    foreach=True)
        self.critic = None
        if needs_learned_critic(self.estimator):
            self.critic = make_critic(cfg.critic_model, self.mdp, self.policy, cfg.critic_lr, cfg.seed + 2000,
                                      (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, cfg.max_grad_norm)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            self.ref_logp_kv = self.ref.node_log_probs(self.tree).to(torch.float64)
        # off-policy: the behaviour mu (None: the policy itself), the catalog loss (None: the built-in PPO clip)
        self.behaviour = parse_train_behaviour(cfg.behaviour)
        self.loss = None if cfg.loss is None else get_loss(cfg.loss)
        self.loss_spec = self.loss.spec if self.loss is not None else get_loss(f"ppo_clip:{cfg.clip_eps!r}").spec
        #: stale:k: state dicts of the policy at the start of the last k + 1 iterations, oldest first
        self.snapshots: list[dict] = []
        self._stale_policy = None
        self.iteration = 0
        self.rows: list[dict] = []
        self.tokens_total = 0
        self._noted_unfilled = False  # the same_prompt note is given once per run
        self._sol = None

    # ------------------------------------------------------------------ pieces
    def _token_log_probs(self, policy, prompt_b, tokens_bt, mask_bt, nt_bt) -> torch.Tensor:
        """``log pi(w_t | s_t)`` of each token, ``[b, H]``, differentiable, 0 on padding: one
        forward of the transformer over the rows, or the policy's table gathered at the states."""
        if self.kind == "transformer":
            return policy.token_log_probs(prompt_b, tokens_bt, mask_bt)
        lp = policy.node_log_probs(self.tree)[nt_bt.clamp(min=0), tokens_bt]
        return torch.where(mask_bt, lp, torch.zeros((), dtype=lp.dtype))

    def _state_nt(self, ro) -> torch.Tensor | None:
        if self.kind == "transformer":
            return None
        H = ro.horizon
        nodes = ro.nodes if ro.nodes is not None else node_paths(self.tree, ro.prompt, ro.tokens, ro.mask)[:, :H]
        return torch.where(nodes >= 0, self.tree.nt_index_n[nodes.clamp(min=0)], torch.full_like(nodes, -1))

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors the method holds between steps, by model (see :func:`models`)."""
        out = {"policy": list(self.policy.parameters()) + optimizer_tensors(self.opt)}
        if self.critic is not None:
            out["critic"] = self.critic.held_tensors()
        if self.kl_kind != "none":
            out["reference"] = list(self.ref.parameters())
        out["reward_model"] = reward_model_tensors(self.mdp)[1]
        if self.snapshots:
            out["stale_snapshots"] = [t for snap in self.snapshots for t in snap.values()]
        return out

    def held_bytes(self) -> int:
        return tensor_bytes(t for ts in self.held_tensors().values() for t in ts)

    def models(self) -> dict:
        """Parameter counts of the models the method holds: ``policy``, ``critic`` (PPO with a
        learned critic), ``reference`` (when a KL term is on), ``reward_model`` (and its kind)."""
        rm_kind, rm_tensors = reward_model_tensors(self.mdp)
        return {"policy": param_count(self.policy.parameters()),
                "critic": param_count(self.critic.parameters()) if self.critic is not None else 0,
                "critic_kind": self.critic.kind if self.critic is not None else "none",
                "reference": param_count(self.ref.parameters()) if self.kl_kind != "none" else 0,
                "reward_model": param_count(rm_tensors), "reward_model_kind": rm_kind}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Exact ``J``, ``KL(pi || pi_ref)``, entropy and expected length of the current policy."""
        t0 = time.perf_counter()
        with torch.no_grad():
            logp = self.policy.node_log_probs(self.tree).to(torch.float64)
            fixed = _FixedLogProbs(logp)
            sol = solve(self.mdp, fixed, with_grad=False)
            kl = solve(self.mdp, fixed, with_grad=False, r_kv=logp - self.ref_logp_kv, gamma=1.0).J
            pi = logp.exp()
            reach = sol.reach[self.tree.nt_node_k]
            ent = float((reach * -torch.special.xlogy(pi, pi).sum(1)).sum())
            length = float(reach.sum())
        self._sol = sol
        return {"J": sol.J, "kl_ref": kl, "entropy": ent, "entropy_token": ent / length if length > 0 else 0.0,
                "length": length, "eval_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ one iteration
    def _behaviour_now(self):
        """The iteration's behaviour: ``None`` when the policy samples itself, else the resolved
        :class:`~tpg.offpolicy.behaviour.Behaviour` (``stale:k``: the snapshot queue advances first)."""
        tb = self.behaviour
        if tb is None:
            return None
        source = self.policy
        if tb.stale:
            self.snapshots.append({k: v.detach().clone() for k, v in self.policy.state_dict().items()})
            del self.snapshots[:max(0, len(self.snapshots) - (tb.stale + 1))]
            if self._stale_policy is None:
                self._stale_policy = copy.deepcopy(self.policy)
                for p in self._stale_policy.parameters():
                    p.requires_grad_(False)
            self._stale_policy.load_state_dict(self.snapshots[0])
            source = self._stale_policy
        if tb.on_policy:
            return None
        return resolve_behaviour(behaviour_table(tb, self.mdp, source), self.mdp, self.policy, sol_pi=self._sol)

    def _catalog_loss(self, logp_new, rows, mask, logp_mu, logp_old, adv, w_mb):
        """``(L, zeroed tokens)``: the catalog loss of a minibatch (one batch) and the number of its tokens
        whose gradient coefficient the loss sets to 0 (clipped or masked) while ``w A != 0``."""
        zero = torch.zeros((), dtype=torch.float64)
        n = int(rows.numel())
        inp = LossInputs(logp_mu_bt=torch.where(mask, logp_mu[rows], zero), advantages_bt=adv[rows], weights_bt=w_mb,
                         mask_bt=mask, batch_b=torch.zeros(n, dtype=torch.long), rows_per_batch=n,
                         agg=getattr(self.estimator, "agg", "seq-mean-token-sum"), logp_old_bt=logp_old[rows])
        loss = self.loss.batch_total(logp_new, inp)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss {self.loss.spec}: the minibatch loss is not a scalar")
        loss = loss.reshape(())
        if not loss.requires_grad:
            return loss, float(mask.sum())
        (grad,) = torch.autograd.grad(loss, logp_new, retain_graph=True, allow_unused=True)
        if grad is None:
            return loss, float(mask.sum())
        live = mask & (w_mb * adv[rows] != 0)
        return loss, float((live & (grad == 0)).sum())

    def _update(self) -> dict:
        cfg, est = self.config, self.estimator
        with torch.no_grad():
            mu = self._behaviour_now()
            ro, drawn = self._sample_batch(self.policy if mu is None else mu.policy)
            if ro is None:  # dynamic sampling kept no group: no update this iteration
                return {**drawn, "tokens_extra": 0, "tokens": drawn["tokens_sampled"],
                        "kl_mu_pi": 0.0 if mu is None else float(mu.mismatch["kl_token"])}
            nt = self._state_nt(ro)
            logp_mu = ro.logp.to(torch.float64)  # what the sampler reported: log mu (log pi on-policy)
            if mu is not None:  # the trainer recomputes log pi_old of the sampled tokens with its own parameters
                ro.logp = self._token_log_probs(self.policy, ro.prompt, ro.tokens, ro.mask, nt).to(ro.logp.dtype)
            ref_logp = None
            if self.kl_kind != "none":
                ref_logp = self._token_log_probs(self.ref, ro.prompt, ro.tokens, ro.mask, nt)
            batch = ResponseBatch.from_rollouts(ro, ref_logp=ref_logp, keep_token_rewards=est.uses_token_rewards)
            hook_policy, hook_sol = (self.policy, self._sol) if mu is None else (mu.policy, mu.sol)
            ctx = TrainContext(self.mdp, hook_policy, self.gen, cfg.seed, self.ref, hook_sol, self.critic)
            out = est(batch, ctx)
        adv, w = out.advantages.detach(), out.weights.detach()
        returns = None
        if self.critic is not None:
            H = batch.horizon
            returns = torch.where(batch.mask, adv + ctx.last_critic_values[:, :H], torch.zeros((), dtype=adv.dtype))
        B = batch.batch_size
        M = min(cfg.minibatches, B)  # dynamic sampling may keep fewer responses than minibatches
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        norms, losses, clipped, critic_losses = [], [], [], []
        n_tokens = float(batch.mask.sum())
        for _ in range(cfg.epochs):
            perm = torch.randperm(B, generator=self.gen)
            for rows in perm.tensor_split(M):
                mask = batch.mask[rows]
                logp_new = self._token_log_probs(self.policy, batch.prompt[rows], batch.tokens[rows], mask,
                                                 None if nt is None else nt[rows])
                w_mb = w[rows] * M
                if self.loss is None:  # the built-in PPO clip, pi_old = the sampler's log-probabilities
                    loss = ppo_clip_loss(logp_new, logp_mu[rows], adv[rows], w_mb, cfg.clip_eps)
                else:
                    loss, zeroed = self._catalog_loss(logp_new, rows, mask, logp_mu, batch.logp, adv, w_mb)
                if self.kl_kind in KL_LOSS_KINDS:
                    delta = torch.where(mask, logp_new - batch.ref_logp[rows], torch.zeros((), dtype=logp_new.dtype))
                    loss = loss + self.config.kl_beta * (w_mb * kl_value(delta, self.kl_kind) * mask).sum()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
                self.opt.step()
                losses.append(float(loss.detach()))
                if self.loss is None:
                    with torch.no_grad():
                        ratio = torch.exp(logp_new.detach() - logp_mu[rows])
                        clipped.append(float((((ratio - 1).abs() > cfg.clip_eps) & mask).sum()))
                else:
                    clipped.append(zeroed)
                if self.critic is not None:
                    critic_losses.append(self.critic.update(batch.prompt[rows], batch.tokens[rows], mask,
                                                            returns[rows], w_mb))
        self.opt.zero_grad(set_to_none=True)
        steps = len(norms)
        extra = int(round(ctx.tokens_sampled))
        return {"grad_norm": sum(norms) / steps, "loss": sum(losses) / steps,
                "clip_frac": sum(clipped) / (cfg.epochs * n_tokens) if n_tokens else 0.0,
                "rm_mean": float(batch.rm.mean()),
                "critic_loss": sum(critic_losses) / len(critic_losses) if critic_losses else math.nan,
                "kl_mu_pi": 0.0 if mu is None else float(mu.mismatch["kl_token"]),
                **drawn, "tokens_extra": extra, "tokens": drawn["tokens_sampled"] + extra}

    def _sample_batch(self, sampler):
        """``(rollouts, counts)``: the iteration's groups sampled from ``sampler``. Under dynamic sampling
        (the loss's ``filter_degenerate_groups``) a group of ``G >= 2`` whose rewards are all equal is
        dropped and replaced -- by a fresh prompt's group (``new_prompts``, DAPO) or by a new group of the
        same prompt (``same_prompt``) -- for up to ``resample_rounds`` more sampling rounds, after which
        the batch holds the groups kept (``None`` when there are none). ``counts``: ``tokens_sampled``
        (every sampled token, dropped groups' included), ``groups_kept``, ``groups_dropped``."""
        cfg = self.config
        G = cfg.group_size
        mode = "false" if self.loss is None else self.loss.filter
        ro = sample(self.mdp, sampler, num_prompts=cfg.prompts, group_size=G, generator=self.gen)
        if mode == "false" or G < 2:
            return ro, {"tokens_sampled": ro.num_tokens, "groups_kept": cfg.prompts, "groups_dropped": 0}
        spent, dropped, kept = 0, 0, []
        for round_ in range(cfg.resample_rounds + 1):
            spent += ro.num_tokens
            rm = ro.rm.view(-1, G)
            ok = rm.amax(1) != rm.amin(1)  # exact equality, as the verifier conditions
            dropped += int((~ok).sum())
            if bool(ok.any()):
                kept.append(ro.index(ok.repeat_interleave(G)))
            if bool(ok.all()) or round_ == cfg.resample_rounds:
                break
            prompts = ro.prompt.view(-1, G)[~ok, 0]
            if mode == "new_prompts":
                ro = sample(self.mdp, sampler, num_prompts=int(prompts.numel()), group_size=G, generator=self.gen)
            else:
                ro = sample(self.mdp, sampler, prompts=prompts, group_size=G, generator=self.gen)
        n_kept = sum(r.batch_size for r in kept) // G
        if mode == "same_prompt" and n_kept < cfg.prompts and not self._noted_unfilled:
            self._noted_unfilled = True
            warnings.warn(f"dynamic sampling same_prompt: iteration {self.iteration + 1} left "
                          f"{cfg.prompts - n_kept} of {cfg.prompts} prompts without a non-degenerate group after "
                          f"{cfg.resample_rounds} extra rounds; such iterations drop those prompts, so the kept "
                          f"prompts lean towards those whose rewards vary (not rho, the law tpg verify conditions "
                          f"on); groups_kept in the log shows when (noted once per run)", Note, stacklevel=2)
        counts = {"tokens_sampled": spent, "groups_kept": n_kept, "groups_dropped": dropped}
        return (cat_rollouts(kept) if kept else None), counts

    def step(self) -> dict:
        """One training iteration and the exact evaluation after it; returns (and logs) its row."""
        if self._sol is None:  # after a resume: the context needs the current policy's exact solution
            self.evaluate()
        held = self.held_bytes()
        meter = TensorMemoryMeter() if self.config.measure_memory else nullcontext()
        t0 = time.perf_counter()
        with meter:
            stats = self._update()
        wall = time.perf_counter() - t0
        self.iteration += 1
        self.tokens_total += stats["tokens"]
        row = self._row(self.iteration, {**stats, "wall_s": wall, "held_bytes": held,
                                         "peak_mem_bytes": held + meter.peak if self.config.measure_memory
                                         else math.nan})
        self.rows.append(row)
        return row

    def _row(self, it: int, stats: dict) -> dict:
        ev = self.evaluate()
        cfg = self.config
        row = {"iter": it, **ev, "grad_norm": math.nan, "loss": math.nan, "clip_frac": math.nan,
               "rm_mean": math.nan, "critic_loss": math.nan, "kl_mu_pi": math.nan, "groups_kept": math.nan,
               "groups_dropped": 0, "tokens": 0, "tokens_sampled": 0, "tokens_extra": 0,
               "wall_s": 0.0, "held_bytes": self.held_bytes(), "peak_mem_bytes": math.nan}
        row.update(stats)
        row.update(tokens_total=self.tokens_total, method=self.method, spec=self.estimator.spec,
                   behaviour="pi" if self.behaviour is None else self.behaviour.spec, policy_loss=self.loss_spec,
                   critic=self.critic.kind if self.critic is not None else "none", seed=cfg.seed,
                   reward=cfg.reward, problem=self.problem_spec)
        return {k: row[k] for k in LOG_COLUMNS}

    # ------------------------------------------------------------------ the loop
    def run(self, progress: bool | None = None, handle_signals: bool | None = None):
        """Train up to ``config.iters`` iterations; the log as a DataFrame.

        With a checkpoint path (``config.checkpoint``, or ``OUT.ckpt``) the checkpoint, and the log
        when ``config.out`` is set, are written (atomically) at the start, every
        ``checkpoint_every`` iterations or ``checkpoint_seconds`` seconds, and at the end.
        ``handle_signals`` (default: when there is a checkpoint path and this is the main thread):
        SIGINT and SIGTERM finish the current iteration, write the checkpoint and the log, and
        raise :class:`TrainingInterrupted`; a second signal stops at once (``KeyboardInterrupt``)."""
        cfg = self.config
        if handle_signals is None:
            handle_signals = cfg.checkpoint_path is not None
        with torch_threads(cfg.threads), _deferred_signals(handle_signals) as received:
            return self._run(cfg.progress if progress is None else progress, received)

    def _run(self, show: bool | None, received: list):
        from .._progress import progress_bar

        cfg = self.config
        if not self.rows:
            self.rows.append(self._row(0, {}))
        self.save_progress()  # at the start: an unwritable --out or checkpoint fails now, not after the run
        last_save = time.monotonic()
        bar = progress_bar(show, total=cfg.iters, initial=self.iteration, desc=f"{self.method} seed {cfg.seed}",
                           leave=True)
        bar.set_postfix(J=f"{self.rows[-1]['J']:.4f}")
        try:
            while self.iteration < cfg.iters:
                row = self.step()
                bar.update(1)
                bar.set_postfix(J=f"{row['J']:.4f}")
                if received and self.iteration < cfg.iters:
                    self.save_progress()
                    raise TrainingInterrupted(received[0], self.iteration, cfg.iters, cfg.checkpoint_path, cfg.out)
                by_count = cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0
                by_time = cfg.checkpoint_seconds and time.monotonic() - last_save >= cfg.checkpoint_seconds
                if (by_count or by_time) and self.iteration < cfg.iters:
                    self.save_progress()
                    last_save = time.monotonic()
        finally:
            bar.close()
        self.save_progress()
        return self.log()

    def save_progress(self) -> None:
        """Write the checkpoint (when there is a checkpoint path) and then the log (when
        ``config.out`` is set), both atomically, so the log on disk always matches the checkpoint."""
        cfg = self.config
        if cfg.checkpoint_path:
            self.save(cfg.checkpoint_path)
        if cfg.out:
            from .logio import write_log

            write_log(self.log(), cfg.out, quiet=self.iteration > 0)

    def log(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(LOG_COLUMNS))

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        est_state = {k: v.clone() for k, v in vars(self.estimator).items()
                     if k.startswith("_") and isinstance(v, torch.Tensor)}
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "iteration": self.iteration,
                "tokens_total": self.tokens_total, "policy": self.policy.state_dict(),
                "reference": self.ref.state_dict(), "optimizer": self.opt.state_dict(),
                "critic": None if self.critic is None else self.critic.state_dict(),
                "estimator": est_state, "generator": self.gen.get_state(), "rows": list(self.rows),
                "snapshots": [{k: v.clone() for k, v in snap.items()} for snap in self.snapshots]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint atomically (serialised in memory with its checksum,
        :func:`checkpoint_bytes`, written to a temporary file, then renamed); an ``OSError``
        names ``path``."""
        from .._io import write_bytes_atomic

        write_bytes_atomic(path, checkpoint_bytes(self.state()))

    @classmethod
    def load(cls, config: TrainConfig, path: str | os.PathLike | None = None) -> "Trainer":
        """The trainer of a checkpoint, continuing under ``config`` (only the fields of
        :data:`~tpg.train.config.RESUME_FREE_FIELDS` may differ from the checkpointed run's).

        A missing, unreadable, truncated or foreign checkpoint, or one whose contents do not fit the
        run (a damaged file that still unpickles), raises one ``ValueError`` naming the file."""
        path = Path(path or config.checkpoint_path)
        where = f"TrainConfig.checkpoint: {str(path)!r}"
        if not path.is_file():
            raise ValueError(f"TrainConfig.checkpoint: no checkpoint at {str(path)!r} to resume from")
        state = read_checkpoint(path)
        trainer = cls(config)
        saved = renamed_fields(state["config"])  # a checkpoint of an earlier release: its field names
        for f in fields(TrainConfig):
            if f.name in RESUME_FREE_FIELDS:
                continue
            # a field the checkpoint lacks is newer than it: that run had the field's default behaviour
            was = saved[f.name] if f.name in saved else (None if f.default is MISSING else f.default)
            if was != getattr(trainer.config, f.name):
                raise ValueError(f"TrainConfig.{f.name}: the checkpoint was made with {f.name}={was!r}, "
                                 f"not {getattr(trainer.config, f.name)!r}")
        if state["iteration"] > config.iters:
            raise ValueError(f"TrainConfig.iters: the checkpoint is at iteration {state['iteration']}, past "
                             f"iters={config.iters}")
        part = "policy"
        try:
            trainer.policy.load_state_dict(state["policy"])
            part = "reference"
            trainer.ref.load_state_dict(state["reference"])
            part = "optimizer"
            trainer.opt.load_state_dict(state["optimizer"])
            part = "critic"
            if trainer.critic is not None:
                trainer.critic.load_state_dict(state["critic"])
            part = "estimator"
            for k, v in state["estimator"].items():
                setattr(trainer.estimator, k, v.clone())
            part = "generator"
            trainer.gen.set_state(state["generator"])
            part = "stale snapshots"
            trainer.snapshots = _restored_snapshots(trainer, state)
            part = "log rows"
            defaults = {**_OFFPOLICY_DEFAULTS, "policy_loss": trainer.loss_spec}
            rows = [{k: (r[k] if k in r or k not in defaults else defaults[k]) for k in LOG_COLUMNS}
                    for r in map(_renamed_columns, state["rows"])]
        except Exception as exc:  # wrong shapes, missing keys, wrong types: the file is not this run's state
            raise ValueError(f"{where} is damaged: its {part} cannot be restored ({_one_line(exc)})") from None
        trainer.iteration = state["iteration"]
        trainer.tokens_total = state["tokens_total"]
        trainer.rows = rows
        with torch.no_grad():
            trainer.ref_logp_kv = trainer.ref.node_log_probs(trainer.tree).to(torch.float64)
        trainer._sol = None
        return trainer


def _restored_snapshots(trainer: "Trainer", state: dict) -> list[dict]:
    """The ``stale:k`` snapshot queue of a checkpoint (``[]`` in one written before it existed, which an
    on-policy run never filled), checked against the run: ``min(iteration, k + 1)`` policy state dicts."""
    snaps = state.get("snapshots", [])
    k = trainer.behaviour.stale if trainer.behaviour is not None else 0
    want = min(state["iteration"], k + 1) if k else 0
    if not isinstance(snaps, list) or len(snaps) != want:
        raise ValueError(f"{len(snaps) if isinstance(snaps, list) else type(snaps).__name__} snapshots for "
                         f"stale:{k} at iteration {state['iteration']}, expected {want}")
    shapes = {name: tuple(v.shape) for name, v in trainer.policy.state_dict().items()}
    out = []
    for snap in snaps:
        if not isinstance(snap, dict) or set(snap) != set(shapes) or \
                any(not isinstance(v, torch.Tensor) or tuple(v.shape) != shapes[n] for n, v in snap.items()):
            raise ValueError("a snapshot is not a state dict of the policy")
        out.append({name: v.clone() for name, v in snap.items()})
    return out


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    if isinstance(exc, KeyError) and exc.args:
        return f"missing {exc.args[0]!r}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def checkpoint_bytes(state: dict) -> bytes:
    """A checkpoint file's bytes: ``torch.save`` of the envelope
    ``{"format": CHECKPOINT_ENVELOPE, "sha256": hex digest of S, "state": S as a uint8 tensor}``,
    ``S`` the ``torch.save`` bytes of ``state``. torch's zip reader does not check its CRCs, so a
    damaged byte inside a tensor would otherwise load silently; :func:`read_checkpoint` verifies."""
    import hashlib
    import io

    inner = io.BytesIO()
    torch.save(state, inner)
    payload = inner.getvalue()
    outer = io.BytesIO()
    torch.save({"format": CHECKPOINT_ENVELOPE, "sha256": hashlib.sha256(payload).hexdigest(),
                "state": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, outer)
    return outer.getvalue()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The verified state dict of a checkpoint file (:func:`checkpoint_bytes`; a checkpoint of the
    plain ``tpg-train-checkpoint/1`` layout, from before the checksum, is read unverified).

    ``ValueError`` naming the file when it is not a checkpoint, is truncated, or any byte differs
    from what was written, or when a field is missing or of the wrong type."""
    where = f"TrainConfig.checkpoint: {str(path)!r}"

    def load(source):
        try:
            return torch.load(source, weights_only=True)
        except Exception as exc:  # truncated, damaged or foreign: any error of the zip reader or unpickler
            raise ValueError(f"{where} cannot be read as a checkpoint (truncated, damaged or another kind of "
                             f"file: {_one_line(exc)})") from None

    state = unwrap_checkpoint(load(path), where)  # verified against its sha256
    _check_state(state, where)
    return state


def _check_state(state, where: str) -> None:
    """``ValueError`` unless ``state`` has the fields of a checkpoint, of the right types."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not a {CHECKPOINT_FORMAT} file")
    kinds = {"config": dict, "iteration": int, "tokens_total": int, "policy": dict, "reference": dict,
             "optimizer": dict, "estimator": dict, "generator": torch.Tensor, "rows": list}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{where} is damaged: {key!r} is missing or not a {kind.__name__}")
    if state["iteration"] < 0 or len(state["rows"]) != state["iteration"] + 1 or \
            not all(isinstance(r, dict) for r in state["rows"]):
        raise ValueError(f"{where} is damaged: {len(state['rows'])} log rows for iteration {state['iteration']}")


class TrainingInterrupted(BaseException):
    """Raised by :meth:`Trainer.run` after SIGINT or SIGTERM, once the iteration in progress is done
    and the checkpoint and the log are written. A ``BaseException`` (like ``KeyboardInterrupt``), so
    a broad ``except Exception`` does not swallow a request to stop.

    Attributes: ``signum``, ``iteration`` (iterations done), ``iters`` (asked for), ``checkpoint``
    and ``out`` (the files written, or ``None``); ``exit_status`` is ``128 + signum`` (130 for
    SIGINT, 143 for SIGTERM), the shell's convention."""

    def __init__(self, signum: int, iteration: int, iters: int, checkpoint: str | None, out: str | None):
        self.signum, self.iteration, self.iters = int(signum), iteration, iters
        self.checkpoint, self.out = checkpoint, out
        self.exit_status = 128 + self.signum
        super().__init__(self.message())

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        head = f"stopped by {name} after iteration {self.iteration} of {self.iters}"
        if not self.checkpoint:
            return f"{head}; nothing was saved (no --out or --checkpoint), so the run cannot be resumed"
        saved = f"checkpoint {self.checkpoint}" + (f" and log {self.out}" if self.out else "")
        return f"{head}; wrote {saved}: run the same command with --resume to continue"


@contextmanager
def _deferred_signals(enabled: bool):
    """While active (``enabled`` and in the main thread), SIGINT and SIGTERM append their number to
    the yielded list instead of stopping the process (the loop checks it between iterations); a
    second signal raises ``KeyboardInterrupt`` at once. The previous handlers come back after."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def existing_outputs(config: TrainConfig) -> list[tuple[str, str]]:
    """``(field, path)`` of the run's log and checkpoint files that already exist."""
    out = []
    for name, path in (("out", config.out), ("checkpoint", config.checkpoint_path)):
        if path and os.path.lexists(path):
            out.append((name, path))
    return out


def train(config: TrainConfig, handle_signals: bool | None = None):
    """Run ``config`` (resuming from its checkpoint with ``config.resume``); the log as a
    ``pandas.DataFrame`` (columns: see the module docstring), also written to ``config.out``.

    A fresh run (neither ``resume`` nor ``force``) refuses to start when its log or checkpoint
    exists: ``ValueError`` naming the file and both ways on. Checkpoints and signals: :meth:`Trainer.run`."""
    for path in (config.out, config.checkpoint_path):
        if path and os.path.isdir(path):  # no flag helps here: say what is wrong with the path
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not config.resume and not config.force:
        found = existing_outputs(config)
        if found:
            name, path = found[0]
            raise ValueError(f"TrainConfig.{name}: {path!r} exists (an earlier run's "
                             f"{'log' if name == 'out' else 'checkpoint'}); continue that run with --resume, or "
                             f"start afresh over it with --force")
    trainer = Trainer.load(config) if config.resume else Trainer(config)
    return trainer.run(handle_signals=handle_signals)


__all__ = ["Trainer", "TrainContext", "TrainingInterrupted", "train", "existing_outputs", "read_checkpoint",
           "checkpoint_bytes", "LOG_COLUMNS", "UNREPRODUCIBLE_COLUMNS", "CHECKPOINT_FORMAT", "CHECKPOINT_ENVELOPE"]
