"""tpg train --behaviour / --loss: sampling from a behaviour policy, the loss catalog in the trainer, stale:k as a
snapshot queue, and checkpoint/resume with the queue."""

import copy

import pandas as pd
import pytest
import torch

from tpg.offpolicy.losses import LossInputs, get_loss
from tpg.train import UNREPRODUCIBLE_COLUMNS, Trainer, TrainConfig, train
from tpg.train.config import add_config_args
from tpg.train.offpolicy import parse_train_behaviour
from tpg.train.trainer import checkpoint_bytes, read_checkpoint

TAB = "dense:vocab=3,horizon=3,eos=0,prompts=2"
COPY = "copy:vocab=4,length=2,prompts=4,eos=true"


def quick(**kw) -> TrainConfig:
    base = dict(mdp=TAB, iters=4, progress=False, measure_memory=False)
    if "task" in kw:
        base.pop("mdp")
    return TrainConfig(**{**base, **kw})


def same_log(a: pd.DataFrame, b: pd.DataFrame, skip=()) -> None:
    cols = [c for c in a.columns if c not in UNREPRODUCIBLE_COLUMNS and c not in skip]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True), check_exact=True)


# -- the default path is unchanged -------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"estimator": "ppo", "kl": "k3"}, {"task": COPY}])
def test_behaviour_pi_and_catalog_ppo_clip_equal_the_default_run_bitwise(kw):
    """Sampling from mu = pi and the catalog's ppo_clip:0.2 (pi_old = the sampler) is the built-in loss: every
    logged number is the same to the bit (clip_frac counts differently: the tokens the loss zeroes)."""
    a = train(quick(**kw))
    b = train(quick(behaviour="pi", loss="ppo_clip:0.2", **kw))
    same_log(a, b, skip=("clip_frac",))
    assert list(a["behaviour"].unique()) == ["pi"] and list(a["policy_loss"].unique()) == ["ppo_clip:0.2"]
    assert (a["kl_mu_pi"].iloc[1:] == 0).all() and a["kl_mu_pi"].isna().iloc[0]


def test_catalog_pg_with_one_step_equals_the_builtin_loss_at_ratio_one():
    """With one optimiser step per iteration the built-in clip is at ratio 1, where its gradient is pg's."""
    a = train(quick(epochs=1, minibatches=1))
    b = train(quick(epochs=1, minibatches=1, behaviour="pi", loss="pg"))
    pd.testing.assert_series_equal(a["J"], b["J"], rtol=1e-12, atol=1e-12)


# -- sampling from a behaviour ------------------------------------------------------------------------
def test_a_behaviour_run_logs_its_mismatch_and_learns():
    log = train(quick(behaviour="top_p:0.8", loss="is_seq", iters=6))
    assert list(log["behaviour"].unique()) == ["top_p:0.8"] and list(log["policy_loss"].unique()) == ["is_seq"]
    assert (log["kl_mu_pi"].iloc[1:] > 1e-3).all()
    assert log["J"].iloc[-1] > log["J"].iloc[0] + 0.3


def _spy_behaviours(monkeypatch, before=None):
    """Record each iteration's behaviour (and, with ``before``, what it returns before the behaviour is made)."""
    seen = []
    orig = Trainer._behaviour_now

    def spy(self):
        if before is not None:
            before(self)
        beh = orig(self)
        seen.append(beh)
        return beh

    monkeypatch.setattr(Trainer, "_behaviour_now", spy)
    return seen


def test_top_p_behaviour_samples_only_inside_its_support(monkeypatch):
    import tpg.train.trainer as mod

    tr = Trainer(quick(behaviour="top_p:0.5", loss="pg"))
    tr.evaluate()
    seen = _spy_behaviours(monkeypatch)
    batches = []
    real_sample = mod.sample

    def capture(mdp, policy, **kw):
        batches.append(real_sample(mdp, policy, **kw))
        return batches[-1]

    monkeypatch.setattr(mod, "sample", capture)
    tr.step()
    beh, ro = seen[0], batches[0]
    nt = tr._state_nt(ro)
    lmu = beh.logp[nt.clamp(min=0), ro.tokens]
    assert bool(torch.isfinite(lmu[ro.mask]).all()), "a token outside top-p's support was sampled"
    # the estimator saw the trainer's recomputed log pi (the policy before its first step = the reference copy)
    lpi = tr.ref.node_log_probs(tr.tree).to(torch.float64)[nt.clamp(min=0), ro.tokens]
    assert torch.equal(torch.where(ro.mask, lpi, torch.zeros((), dtype=torch.float64)), ro.logp)


def test_stale_k_samples_with_the_policy_of_k_iterations_earlier(monkeypatch):
    k = 2
    tr = Trainer(quick(behaviour=f"stale:{k}", loss="is_token", iters=6))
    tr.evaluate()
    states = []
    used = _spy_behaviours(monkeypatch, before=lambda self: states.append(copy.deepcopy(self.policy.state_dict())))
    for _ in range(6):
        tr.step()
    probe = copy.deepcopy(tr.policy)
    for i, beh in enumerate(used):
        probe.load_state_dict(states[max(i - k, 0)])
        want = torch.log_softmax(probe.node_logits(tr.tree).detach().to(torch.float64), dim=-1)
        torch.testing.assert_close(beh.logp, want, rtol=0, atol=1e-12)
        if i >= 1:  # and not the current policy once it has moved
            probe.load_state_dict(states[i])
            now = torch.log_softmax(probe.node_logits(tr.tree).detach().to(torch.float64), dim=-1)
            assert float((beh.logp - now).abs().max()) > 1e-3
    assert len(tr.snapshots) == k + 1


def test_stale_resume_equals_an_uninterrupted_run(tmp_path):
    full = train(quick(behaviour="stale:2+top_p:0.9", loss="tis:2", iters=6))
    out = str(tmp_path / "run.csv")
    first = quick(behaviour="stale:2+top_p:0.9", loss="tis:2", iters=3, out=out)
    train(first)
    assert len(read_checkpoint(out + ".ckpt")["snapshots"]) == 3  # theta_0..theta_2 at iteration 3
    resumed = train(quick(behaviour="stale:2+top_p:0.9", loss="tis:2", iters=6, out=out, resume=True))
    same_log(full, resumed)


def test_a_checkpoint_with_a_wrong_snapshot_queue_is_refused(tmp_path):
    out = str(tmp_path / "run.csv")
    train(quick(behaviour="stale:3", loss="pg", iters=2, out=out))
    state = read_checkpoint(out + ".ckpt")
    assert len(state["snapshots"]) == 2
    state["snapshots"] = state["snapshots"][:1]
    (tmp_path / "run.csv.ckpt").write_bytes(checkpoint_bytes(state))
    with pytest.raises(ValueError, match="snapshots"):
        train(quick(behaviour="stale:3", loss="pg", iters=4, out=out, resume=True))


def test_transformer_runs_off_policy():
    log = train(quick(task=COPY, behaviour="stale:1", loss="ppo_clip:0.2", iters=3))
    assert log["kl_mu_pi"].iloc[1] < 1e-12 < log["kl_mu_pi"].iloc[2]


# -- the loss inputs -----------------------------------------------------------------------------------
def test_old_pi_reads_the_recomputed_log_probs_when_given():
    logp = torch.tensor([[-1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    base = dict(logp_mu_bt=torch.tensor([[-1.2, -0.4]], dtype=torch.float64),
                advantages_bt=torch.ones(1, 2, dtype=torch.float64), weights_bt=torch.ones(1, 2, dtype=torch.float64),
                mask_bt=torch.ones(1, 2, dtype=torch.bool), batch_b=torch.zeros(1, dtype=torch.long), rows_per_batch=1,
                agg="seq-mean-token-sum")
    loss = get_loss("ppo_clip:0.2,old=pi")
    old = torch.tensor([[-0.9, -0.6]], dtype=torch.float64)
    assert torch.equal(loss.old_logp(logp, LossInputs(**base, logp_old_bt=old)), old)
    assert torch.equal(loss.old_logp(logp, LossInputs(**base)), logp.detach())
    assert torch.equal(get_loss("ppo_clip:0.2").old_logp(logp, LossInputs(**base, logp_old_bt=old)),
                       base["logp_mu_bt"])


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"behaviour": "stale:2,lr=0.1"}, "TrainConfig.behaviour: .*lr="),
    ({"behaviour": "mix:0.5,pi,stale:1"}, "TrainConfig.behaviour: stale:k may only start"),
    ({"behaviour": "top_p:0.9+stale:1"}, "TrainConfig.behaviour"),
    ({"behaviour": "nucleus:0.9"}, "TrainConfig.behaviour: unknown behaviour"),
    ({"loss": "bogus"}, "TrainConfig.loss: unknown loss"),
    ({"resample_rounds": -1}, r"TrainConfig.resample_rounds: must be in \[0, 1000\], got -1"),
    ({"resample_rounds": 2.5}, "TrainConfig.resample_rounds: must be an integer"),
    ({"loss": ""}, "TrainConfig.loss"),
])
def test_bad_behaviour_or_loss_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        quick(**kw)


def test_parse_train_behaviour():
    tb = parse_train_behaviour("stale:2+top_p:0.9")
    assert (tb.stale, tb.spec, tb.on_policy) == (2, "stale:2+top_p:0.9", False)
    assert parse_train_behaviour("pi").on_policy and parse_train_behaviour("stale:0").on_policy
    assert not parse_train_behaviour("stale:1").on_policy
    assert parse_train_behaviour(None) is None


def test_cli_has_the_flags_with_help():
    import argparse

    p = argparse.ArgumentParser()
    add_config_args(p)
    help_text = p.format_help()
    assert "--behaviour SPEC" in help_text and "--loss SPEC" in help_text and "snapshot" in help_text


def test_resume_refuses_another_behaviour(tmp_path):
    out = str(tmp_path / "run.csv")
    train(quick(behaviour="stale:1", loss="pg", iters=2, out=out))
    with pytest.raises(ValueError, match="TrainConfig.behaviour"):
        train(quick(behaviour="stale:2", loss="pg", iters=4, out=out, resume=True))


# -- dynamic sampling (DAPO) -------------------------------------------------------------------------
SPARSE = "sparse:vocab=3,horizon=2,prompts=3,p=0.3,seed=4"


def _draws(mode, n, **kw):
    """``n`` batches of the trainer's dynamic sampling from the initial policy (no update between them)."""
    tr = Trainer(quick(mdp=SPARSE, group_size=3, prompts=4, loss=f"pg:filter_degenerate_groups={mode}", **kw))
    return tr, [tr._sample_batch(tr.policy) for _ in range(n)]


def _exact_q(tr, G):
    from tpg.exact import solve
    from tpg.offpolicy.exact import keep_probabilities

    sol = solve(tr.mdp, tr.policy, with_grad=False)
    return keep_probabilities(tr.mdp, sol.response_prob, sol.response_rm, G), tr.mdp.prompt_weights


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ_and_counts_every_token():
    tr, draws = _draws("true", 40)
    dropped = 0
    for ro, counts in draws:
        rm = ro.rm.view(-1, 3)
        assert bool((rm.amax(1) > rm.amin(1)).all())  # every kept group is informative
        assert counts["groups_kept"] == 4 == ro.batch_size // 3  # ten extra rounds always filled the batch here
        assert counts["tokens_sampled"] >= ro.num_tokens
        assert torch.equal(ro.group, torch.arange(4).repeat_interleave(3))
        dropped += counts["groups_dropped"]
    assert dropped > 20  # the problem does make degenerate groups (the filter is exercised)
    # a negative control: without the filter degenerate groups do reach the update
    tr0 = Trainer(quick(mdp=SPARSE, group_size=3, prompts=4, loss="pg"))
    rms = torch.cat([tr0._sample_batch(tr0.policy)[0].rm.view(-1, 3) for _ in range(40)])
    assert bool((rms.amax(1) == rms.amin(1)).any())


def _prompt_counts(draws, P):
    return torch.bincount(torch.cat([ro.prompt.view(-1, 3)[:, 0] for ro, _ in draws]), minlength=P).double()


def _chi2_p(counts, probs):
    from scipy.stats import chisquare

    probs = probs / probs.sum()
    return chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue


@pytest.mark.filterwarnings("ignore::tpg._progress.Note")  # a rare unfilled slot (1 in 300 batches) is noted
@pytest.mark.parametrize("mode", ["true", "same_prompt"])
def test_dynamic_sampling_draws_the_law_the_verifier_conditions_on(mode):
    """new_prompts: a kept group's prompt follows rho(x) q_x / Z; same_prompt: it follows rho (the prompt is
    kept, its group redrawn), as docs of tpg.offpolicy.exact state and the exact verdicts assume. Each law is
    accepted and the other one rejected by the same chi-square test on the same draws (seeded)."""
    tr, draws = _draws(mode, 300)
    q, rho = _exact_q(tr, 3)
    assert float(q.max() - q.min()) > 0.3  # the two laws differ enough for the test to tell them apart
    counts = _prompt_counts(draws, 3)
    law, other = (rho * q, rho) if mode == "true" else (rho, rho * q)
    assert _chi2_p(counts, law) > 1e-3
    assert _chi2_p(counts, other) < 1e-6


def test_dynamic_sampling_with_no_group_kept_makes_no_update():
    """All rewards equal (sparse with p=0: RM = 0 everywhere): every group is dropped, every round."""
    log = train(quick(mdp="sparse:vocab=3,horizon=2,prompts=2,p=0", group_size=2, prompts=2, iters=2, resample_rounds=3,
                      loss="pg:filter_degenerate_groups=true"))
    assert (log["groups_kept"].iloc[1:] == 0).all() and (log["groups_dropped"].iloc[1:] == 2 * 4).all()
    assert log["grad_norm"].iloc[1:].isna().all() and (log["J"] == log["J"].iloc[0]).all()
    assert (log["tokens_sampled"].iloc[1:] > 0).all()


def test_dynamic_sampling_rounds_bound_the_resampling():
    tr, draws = _draws("true", 30, resample_rounds=0)
    kept = [c["groups_kept"] for _, c in draws]
    assert min(kept) < 4 and all(c["groups_kept"] + c["groups_dropped"] == 4 for _, c in draws)


def test_a_dynamic_sampling_run_learns_repeats_and_resumes(tmp_path):
    kw = dict(mdp=SPARSE, group_size=3, loss="pg:filter_degenerate_groups=same_prompt", iters=6)
    a, b = train(quick(**kw)), train(quick(**kw))
    same_log(a, b)
    assert a["J"].iloc[-1] > a["J"].iloc[0] and (a["groups_dropped"].iloc[1:] > 0).any()
    out = str(tmp_path / "run.csv")
    train(quick(**{**kw, "iters": 3}, out=out))
    same_log(a, train(quick(**kw, out=out, resume=True)))


def test_same_prompt_notes_once_when_a_prompt_cannot_be_filled():
    """A prompt whose groups are almost always degenerate exhausts the rounds: under same_prompt that changes
    the law of the kept prompts, so the run says so, once; new_prompts does not need to."""
    from tpg._progress import Note

    kw = dict(mdp="sparse:vocab=3,horizon=2,prompts=3,p=0.05,seed=1", group_size=3, prompts=3, iters=3,
              resample_rounds=1)
    with pytest.warns(Note, match="same_prompt: iteration 1 left") as rec:
        log = train(quick(loss="pg:filter_degenerate_groups=same_prompt", **kw))
    assert len([w for w in rec if issubclass(w.category, Note)]) == 1 and (log["groups_kept"].iloc[1:] < 3).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Note)
        train(quick(loss="pg:filter_degenerate_groups=true", **kw))
