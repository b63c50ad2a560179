"""Estimators: hand-computed advantages, reductions, vectorised == plain loops, stacking,
aggregation, KL coefficients, padding. A fake context returns known tensors."""

import math
import statistics

import pytest
import torch

import tpg.estimators as E
from tpg.estimators import ResponseBatch, get_estimator, stack_batches
from tpg.estimators.functional import discounted_returns, gae_advantages
from tpg.estimators.kl import kl_loss_coef, kl_value
from tpg.estimators.trepo import interpolate_fill, segment_fill

H = 3
V = 4


# -- fixtures ----------------------------------------------------------------------------------

def make_batch(rm, lengths, groups, batch_ids=None, prompts=None, horizon=H, seed=0, tokens=None,
               token_rewards=None, gamma=1.0):
    """A ResponseBatch with the given rewards; random tokens/logp/ref_logp on the valid positions."""
    g = torch.Generator().manual_seed(seed)
    B = len(rm)
    length = torch.tensor(lengths)
    mask = torch.arange(horizon).unsqueeze(0) < length.unsqueeze(1)
    if tokens is None:
        tokens = torch.randint(1, V, (B, horizon), generator=g)
    tokens = torch.where(mask, torch.as_tensor(tokens), 0)
    logp = torch.where(mask, -torch.rand(B, horizon, generator=g, dtype=torch.float64) - 0.1, 0.0)
    ref = torch.where(mask, logp + 0.5 * torch.randn(B, horizon, generator=g, dtype=torch.float64), 0.0)
    rm_t = torch.tensor(rm, dtype=torch.float64)
    tlr = torch.zeros(B, horizon, dtype=torch.float64)
    tlr[torch.arange(B), length - 1] = rm_t
    group = torch.tensor(groups)
    return ResponseBatch(prompt=torch.tensor(prompts) if prompts is not None else group.clone(), group=group,
                         batch=torch.zeros(B, dtype=torch.long) if batch_ids is None else torch.tensor(batch_ids),
                         tokens=tokens, mask=mask, logp=logp, token_level_rewards=tlr, rm=rm_t, length=length,
                         ref_logp=ref, gamma=gamma, vocab_size=V, horizon=horizon,
                         token_rewards=None if token_rewards is None else torch.tensor(token_rewards,
                                                                                    dtype=torch.float64))


def random_batch(seed, n_batches=2, groups=2, G=3, horizon=4, singleton=True):
    """Several batch ids, several groups each (one singleton group per batch if asked)."""
    g = torch.Generator().manual_seed(seed)
    rm, lengths, gids, bids = [], [], [], []
    for b in range(n_batches):
        sizes = [G] * groups + ([1] if singleton else [])
        for k, size in enumerate(sizes):
            for _ in range(size):
                rm.append(float(torch.randn(1, generator=g)))
                lengths.append(int(torch.randint(1, horizon + 1, (1,), generator=g)))
                gids.append(k)
                bids.append(b)
    return make_batch(rm, lengths, gids, bids, prompts=[x % 2 for x in gids], horizon=horizon, seed=seed)


class FakeContext:
    """Known hook outputs: greedy and prompt values per prompt, a closed-form continuation value
    ``0.1 prompt + 0.2 sum(prefix tokens) + 0.05 len``, and a given critic."""

    def __init__(self, exact=False, greedy=(0.25, 1.5), prompt_vals=(0.3, 1.2), critic=None, seed=0):
        self.exact = exact
        self.greedy = torch.tensor(greedy, dtype=torch.float64)
        self.pv = torch.tensor(prompt_vals, dtype=torch.float64)
        self.critic = critic
        self.tokens_sampled = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = []

    def greedy_rm(self, prompt_b):
        self.tokens_sampled += 2 * prompt_b.numel()
        return self.greedy[prompt_b]

    def prompt_values(self, prompt_b):
        return self.pv[prompt_b]

    @staticmethod
    def value(prompt, prefix, n):
        return 0.1 * prompt + 0.2 * sum(prefix[:n]) + 0.05 * n

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, K):
        self.calls.append((prompt_b.clone(), prefix_bt.clone(), prefix_len_b.clone(), K))
        self.tokens_sampled += K * int((prefix_bt.shape[1] - prefix_len_b).sum())
        pos = torch.arange(prefix_bt.shape[1]).unsqueeze(0)
        s = (prefix_bt * (pos < prefix_len_b.unsqueeze(1))).sum(1)
        return 0.1 * prompt_b + 0.2 * s + 0.05 * prefix_len_b

    def critic_values(self, batch, kind, gamma, options):
        if self.critic is not None:
            return self.critic(batch)
        B, Hh = batch.mask.shape
        return 0.1 * torch.arange(1, Hh + 2, dtype=torch.float64).expand(B, Hh + 1) + 0.3 * batch.prompt.unsqueeze(1)

    def random_generator(self):
        return self.gen


@pytest.fixture
def tiny():
    # two groups of two; lengths 3, 2, 1, 3
    tokens = [[1, 2, 3], [2, 1, 0], [3, 0, 0], [1, 1, 2]]
    return make_batch([1.0, 0.0, 2.0, 1.0], [3, 2, 1, 3], [0, 0, 1, 1], tokens=tokens)


def per_response(out, tiny):
    """Each row's advantage, asserting it is constant on the row's tokens."""
    rows = []
    for i in range(tiny.batch_size):
        vals = out.advantages[i, : int(tiny.length[i])]
        assert torch.allclose(vals, vals[0].expand_as(vals))
        rows.append(float(vals[0]))
    return rows


# -- hand-computed advantages ------------------------------------------------------------------

def test_reinforce(tiny):
    assert per_response(get_estimator("reinforce")(tiny), tiny) == [1.0, 0.0, 2.0, 1.0]


def test_reward_to_go_discounted():
    r = [[0.5, 0.0, 0.25], [1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    g = 0.5
    rm = [0.5 + g * g * 0.25, 1.0 + g * 2.0, 3.0]
    b = make_batch(rm, [3, 2, 1], [0, 1, 2], token_rewards=r, gamma=g)
    out = get_estimator("reward_to_go")(b)
    # A_t = sum_{k >= t} gamma^(k-1) r_k
    expected = torch.tensor([[0.5 + 0.0625, 0.0625, 0.0625], [2.0, 1.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(out.advantages, expected)
    assert torch.allclose(out.advantages[:, 0], b.rm)  # t = 1 carries RM itself
    with pytest.raises(ValueError, match="token rewards"):
        get_estimator("reward_to_go")(make_batch(rm, [3, 2, 1], [0, 1, 2]))


def test_reinforce_baseline_exact(tiny):
    out = get_estimator("reinforce_baseline")(tiny, FakeContext())
    assert per_response(out, tiny) == pytest.approx([1.0 - 0.3, 0.0 - 0.3, 2.0 - 1.2, 1.0 - 1.2])
    with pytest.raises(ValueError, match="prompt_values"):
        get_estimator("reinforce_baseline")(tiny, None)


def test_reinforce_baseline_running(tiny):
    est = get_estimator("reinforce_baseline:baseline=running")
    assert est.stateful
    ctx = FakeContext()
    assert per_response(est(tiny, ctx), tiny) == [1.0, 0.0, 2.0, 1.0]          # no history: b = 0
    assert per_response(est(tiny, ctx), tiny) == pytest.approx([0.5, -0.5, 0.5, -0.5])  # b = 0.5, 1.5
    est(tiny, FakeContext(exact=True))                                          # exact mode: frozen
    assert per_response(est(tiny, ctx), tiny) == pytest.approx([0.5, -0.5, 0.5, -0.5])
    est.reset()
    assert per_response(est(tiny, ctx), tiny) == [1.0, 0.0, 2.0, 1.0]


def test_rloo(tiny):
    assert per_response(get_estimator("rloo")(tiny), tiny) == [1.0, -1.0, 1.0, -1.0]


def test_remax_and_tokens_spent(tiny):
    ctx = FakeContext()
    out = get_estimator("remax")(tiny, ctx)
    assert per_response(out, tiny) == pytest.approx([0.75, -0.25, 0.5, -0.5])
    assert out.tokens_spent == 2 * tiny.batch_size


def test_grpo(tiny):
    s = math.sqrt(0.5)  # Bessel std of {1, 0} and of {2, 1}
    out = get_estimator("grpo")(tiny)
    assert per_response(out, tiny) == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6)] * 2)
    out = get_estimator("grpo:std_norm=false")(tiny)
    assert per_response(out, tiny) == pytest.approx([0.5, -0.5, 0.5, -0.5])
    out = get_estimator("grpo:eps=0.5")(tiny)
    assert per_response(out, tiny) == pytest.approx([0.5 / (s + 0.5), -0.5 / (s + 0.5)] * 2)


def test_singleton_groups_follow_verl():
    b = make_batch([2.0, -1.0], [2, 3], [0, 1])
    assert per_response(get_estimator("grpo")(b), b) == pytest.approx([2.0 / (1 + 1e-6), -1.0 / (1 + 1e-6)])
    for name in ("dr_grpo", "rloo", "opo"):
        assert per_response(get_estimator(name)(b), b) == [2.0, -1.0]


def test_dr_grpo(tiny):
    est = get_estimator("dr_grpo")
    assert per_response(est(tiny), tiny) == pytest.approx([0.5, -0.5, 0.5, -0.5])
    assert est.customary_agg == "seq-mean-token-sum-norm"


def test_opo(tiny):
    # group 0: lengths 3, 2, R 1, 0 -> b = 3/5; group 1: lengths 1, 3, R 2, 1 -> b = 5/4
    assert per_response(get_estimator("opo")(tiny), tiny) == pytest.approx([0.4, -0.6, 0.75, -0.25])


def whiten_list(xs):
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in xs]


def test_reinforce_pp(tiny):
    out = get_estimator("reinforce_pp")(tiny)
    tokens = [1.0] * 3 + [0.0] * 2 + [2.0] + [1.0] * 3  # reward-to-go of ZRA rewards = RM per token
    w = whiten_list(tokens)
    assert out.advantages[tiny.mask].tolist() == pytest.approx(w)
    # gamma < 1: G_t = gamma^(T-t) RM
    out = get_estimator("reinforce_pp:gamma=0.5")(tiny)
    tokens = [0.25, 0.5, 1.0, 0.0, 0.0, 2.0, 0.25, 0.5, 1.0]
    assert out.advantages[tiny.mask].tolist() == pytest.approx(whiten_list(tokens))


def test_reinforce_pp_baseline(tiny):
    out = get_estimator("reinforce_pp_baseline")(tiny)
    tokens = [0.5] * 3 + [-0.5] * 2 + [0.5] + [-0.5] * 3
    assert out.advantages[tiny.mask].tolist() == pytest.approx(whiten_list(tokens))


def test_ppo_gae_hand(tiny):
    ctx = FakeContext()
    V_ = ctx.critic_values(tiny, "exact", 1.0, {})
    out = get_estimator("ppo_gae:lambda=0.5,gamma=0.9")(tiny, ctx)
    # row 1 (length 2): delta_1 = 0 + 0.9 V2 - V1, delta_2 = R - V2 (V3 = 0: after the end)
    v1, v2 = float(V_[1, 0]), float(V_[1, 1])
    d1, d2 = 0.9 * v2 - v1, 0.0 - v2
    assert out.advantages[1].tolist() == pytest.approx([d1 + 0.45 * d2, d2, 0.0])
    assert get_estimator("ppo_gae:critic=zero")(tiny, None).advantages[tiny.mask].tolist() == \
        [1.0] * 3 + [0.0] * 2 + [2.0] + [1.0] * 3


def test_ppo_gae_critic_checks(tiny):
    bad = FakeContext(critic=lambda b: torch.zeros(b.batch_size, b.horizon))
    with pytest.raises(ValueError, match=r"\[B, H\+1\]"):
        get_estimator("ppo_gae")(tiny, bad)
    nan = FakeContext(critic=lambda b: torch.full((b.batch_size, b.horizon + 1), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        get_estimator("ppo_gae")(tiny, nan)


def test_ppo_gae_passes_options_to_critic(tiny):
    seen = {}

    class Ctx(FakeContext):
        def critic_values(self, batch, kind, gamma, options):
            seen.update(kind=kind, gamma=gamma, options=options)
            return super().critic_values(batch, kind, gamma, options)

    get_estimator("ppo_gae:critic=noisy,sigma=0.3,noise=fresh,gamma=0.8")(tiny, Ctx())
    assert seen["kind"] == "noisy" and seen["gamma"] == 0.8
    assert seen["options"]["sigma"] == 0.3 and seen["options"]["noise"] == "fresh"


def V_of(prompt, tokens, j):
    return FakeContext.value(prompt, tokens, j)


def test_trepo_segment_every(tiny):
    ctx = FakeContext()
    out = get_estimator("trepo:anchors=every:2,K=3")(tiny, ctx)
    toks = tiny.tokens.tolist()
    # row 0 (T = 3, prompt 0): anchors 0, 2, 3 -> tokens 1, 2 get V(2) - V(0); token 3 gets RM - V(2)
    v0, v2 = V_of(0, toks[0], 0), V_of(0, toks[0], 2)
    assert out.advantages[0].tolist() == pytest.approx([v2 - v0, v2 - v0, 1.0 - v2])
    # row 2 (T = 1, prompt 1): anchors 0, 1
    assert out.advantages[2].tolist() == pytest.approx([2.0 - V_of(1, toks[2], 0), 0.0, 0.0])
    # K and the prefixes asked for; tokens counted from the context's counter
    assert all(call[3] == 3 for call in ctx.calls)
    assert out.info["prefixes"] == 2 + 1 + 1 + 2
    assert out.tokens_spent == ctx.tokens_sampled


def test_trepo_all_is_per_step(tiny):
    out = get_estimator("trepo")(tiny, FakeContext())
    toks = tiny.tokens.tolist()
    vals = [V_of(1, toks[3], j) for j in range(3)] + [1.0]
    assert out.advantages[3].tolist() == pytest.approx([vals[1] - vals[0], vals[2] - vals[1], vals[3] - vals[2]])


def test_trepo_segments_delimiter():
    b = make_batch([1.0], [3], [0], tokens=[[2, 3, 1]])
    out = get_estimator("trepo:anchors=segments:2")(b, FakeContext())
    v0, v1 = V_of(0, [2, 3, 1], 0), V_of(0, [2, 3, 1], 1)
    # the delimiter is token 1, so prefix length 1 is an anchor
    assert out.advantages[0].tolist() == pytest.approx([v1 - v0, 1.0 - v1, 1.0 - v1])
    with pytest.raises(ValueError, match="delimiter"):
        get_estimator("trepo:anchors=segments:9")(b, FakeContext())


def test_trepo_interpolate_hand():
    b2 = make_batch([1.0], [4], [0], tokens=[[1, 2, 1, 3]], horizon=4)
    out = get_estimator("trepo:anchors=every:3,fill=interpolate")(b2, FakeContext())
    v = [V_of(0, [1, 2, 1, 3], j) for j in range(4)] + [1.0]
    D = [v[t] - v[t - 1] for t in range(1, 5)]
    # anchor states 0, 3, 4 -> anchor steps 1, 4 (and T = 4); steps 2, 3 interpolate
    expected = [D[0], D[0] + (D[3] - D[0]) / 3, D[0] + 2 * (D[3] - D[0]) / 3, D[3]]
    assert out.advantages[0].tolist() == pytest.approx(expected)


def test_trepo_fill_functions_match_loops():
    g = torch.Generator().manual_seed(3)
    B, Hh = 40, 6
    values = torch.randn(B, Hh + 1, generator=g, dtype=torch.float64)
    T = torch.randint(1, Hh + 1, (B,), generator=g)
    anchors = torch.rand(B, Hh + 1, generator=g) < 0.4
    j = torch.arange(Hh + 1)
    anchors = (anchors & (j <= T.unsqueeze(1))) | (j == 0) | (j == T.unsqueeze(1))
    seg = segment_fill(values, anchors, T)
    itp = interpolate_fill(values, anchors, T)
    for b in range(B):
        A = [a for a in range(Hh + 1) if anchors[b, a]]
        Tb = int(T[b])
        steps = sorted({a + 1 for a in A if a < Tb} | {Tb})
        D = {t: float(values[b, t] - values[b, t - 1]) for t in range(1, Tb + 1)}
        for t in range(1, Hh + 1):
            if t > Tb:
                assert seg[b, t - 1] == 0 and itp[b, t - 1] == 0
                continue
            lo = max(a for a in A if a < t)
            hi = min(a for a in A if a >= t)
            assert float(seg[b, t - 1]) == pytest.approx(float(values[b, hi] - values[b, lo]))
            p = max(s for s in steps if s <= t)
            q = min(s for s in steps if s >= t)
            want = D[p] if p == q else D[p] + (t - p) / (q - p) * (D[q] - D[p])
            assert float(itp[b, t - 1]) == pytest.approx(want)


def test_trepo_random_exact_equals_monte_carlo_mean():
    """Exact mode averages over the anchor draws: compare with many MC draws (same V)."""
    base = make_batch([1.0, 0.5, 2.0], [5, 3, 2], [0, 1, 2], prompts=[0, 1, 0], horizon=5, seed=4)
    N = 3000
    rows = torch.arange(3).repeat(N)
    big = base.index(rows)
    big.batch = torch.arange(big.batch_size)
    big.group = torch.arange(big.batch_size)
    for spec in ("trepo:anchors=random:2", "trepo:anchors=random:2,fill=interpolate",
                 "trepo:anchors=random:1,fill=ipw"):
        est = get_estimator(spec)
        exact = est(base, FakeContext(exact=True)).advantages
        mc = est(big, FakeContext(exact=False, seed=1)).advantages.view(N, 3, 5)
        mean, sd = mc.mean(0), mc.std(0)
        tol = 5 * sd / math.sqrt(N) + 1e-12
        assert bool(((mean - exact).abs() <= tol).all()), spec
    # ipw in exact mode is the per-step advantage
    per_step = get_estimator("trepo")(base, FakeContext()).advantages
    assert torch.allclose(get_estimator("trepo:anchors=random:1,fill=ipw")(base, FakeContext(exact=True)).advantages,
                          per_step)


def test_trepo_refusals():
    with pytest.raises(ValueError, match="fill=ipw needs anchors=random"):
        get_estimator("trepo:anchors=every:2,fill=ipw")
    b = make_batch([1.0], [20], [0], horizon=20)
    with pytest.raises(ValueError, match="C\\(19, 8\\)"):
        get_estimator("trepo:anchors=random:8")(b, FakeContext(exact=True))
    with pytest.raises(ValueError, match="continuation_values"):
        get_estimator("trepo")(b, None)


def test_trepo_tokens_in_exact_mode(tiny):
    ctx = FakeContext(exact=True)
    out = get_estimator("trepo:anchors=every:2")(tiny, ctx)  # fixed anchors: only the needed prefixes
    assert out.tokens_spent == ctx.tokens_sampled > 0 and out.info["prefixes"] == 6
    out = get_estimator("trepo:anchors=random:1")(tiny, FakeContext(exact=True))
    assert out.tokens_spent == 0 and "random anchors" in out.info["tokens_spent_note"]
    out = get_estimator("trepo")(tiny, type("NoCounter", (), {"exact": False,
                                                          "continuation_values": FakeContext().continuation_values})())
    assert out.tokens_spent == 0 and "no tokens_sampled" in out.info["tokens_spent_note"]


# -- reductions --------------------------------------------------------------------------------

def test_gae_lambda1_gamma1_is_monte_carlo():
    b = random_batch(1)
    ctx = FakeContext()
    Vc = ctx.critic_values(b, "exact", 1.0, {})
    out = get_estimator("ppo_gae:lambda=1,gamma=1")(b, ctx)
    expected = (b.rm.unsqueeze(1) - Vc[:, :-1]) * b.mask
    assert torch.allclose(out.advantages, expected)


def test_gae_lambda0_is_td_error():
    b = random_batch(2)
    Vc = FakeContext().critic_values(b, "exact", 1.0, {})
    A = gae_advantages(b.token_level_rewards, Vc, b.mask, 0.9, 0.0)
    Vm = Vc[:, :-1] * b.mask
    Vn = torch.cat([Vm[:, 1:], torch.zeros(b.batch_size, 1, dtype=torch.float64)], 1)
    assert torch.allclose(A, (b.token_level_rewards + 0.9 * Vn - Vm) * b.mask)


@pytest.mark.parametrize("G", [2, 3, 5])
def test_grpo_mean_only_is_scaled_rloo(G):
    b = random_batch(G, G=G, singleton=False)
    grpo = get_estimator("grpo:std_norm=false")(b).advantages
    rloo = get_estimator("rloo")(b).advantages
    assert torch.allclose(grpo, (1 - 1 / G) * rloo)


# -- vectorised == plain Python loops ------------------------------------------------------------

def groups_of(b):
    out = {}
    for i in range(b.batch_size):
        out.setdefault((int(b.batch[i]), int(b.group[i])), []).append(i)
    return out


def grpo_loop(b, std_norm=True, eps=1e-6):
    A = [0.0] * b.batch_size
    for rows in groups_of(b).values():
        R = [float(b.rm[i]) for i in rows]
        mean, std = (0.0, 1.0) if len(R) == 1 else (statistics.fmean(R), statistics.stdev(R))
        for i, r in zip(rows, R):
            A[i] = (r - mean) / (std + eps) if std_norm else r - mean
    return A


def rloo_loop(b):
    A = [0.0] * b.batch_size
    for rows in groups_of(b).values():
        for i in rows:
            others = [float(b.rm[j]) for j in rows if j != i]
            A[i] = float(b.rm[i]) - (sum(others) / len(others) if others else 0.0)
    return A


def opo_loop(b):
    A = [0.0] * b.batch_size
    for rows in groups_of(b).values():
        if len(rows) == 1:
            A[rows[0]] = float(b.rm[rows[0]])
            continue
        L = [int(b.length[i]) for i in rows]
        base = sum(l * float(b.rm[i]) for l, i in zip(L, rows)) / sum(L)
        for i in rows:
            A[i] = float(b.rm[i]) - base
    return A


def rpp_loop(b, gamma):
    out = torch.zeros(b.batch_size, b.horizon, dtype=torch.float64)
    returns = {}
    for i in range(b.batch_size):
        T = int(b.length[i])
        G, run = [0.0] * T, 0.0
        for t in reversed(range(T)):
            run = float(b.token_level_rewards[i, t]) + gamma * run
            G[t] = run
        returns[i] = G
    for bid in set(b.batch.tolist()):
        rows = [i for i in range(b.batch_size) if int(b.batch[i]) == bid]
        flat = [x for i in rows for x in returns[i]]
        w = whiten_list(flat)
        k = 0
        for i in rows:
            for t in range(int(b.length[i])):
                out[i, t] = w[k]
                k += 1
    return out


def gae_loop(rewards, values, mask, gamma, lam):
    B, Hh = rewards.shape
    out = torch.zeros(B, Hh, dtype=torch.float64)
    for i in range(B):
        T = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(T)):
            v_next = float(values[i, t + 1]) if t + 1 < T else 0.0
            delta = float(rewards[i, t]) + gamma * v_next - float(values[i, t])
            last = delta + gamma * lam * last
            out[i, t] = last
    return out


def trepo_segment_loop(b, k):
    out = torch.zeros(b.batch_size, b.horizon, dtype=torch.float64)
    for i in range(b.batch_size):
        T, toks, p = int(b.length[i]), b.tokens[i].tolist(), int(b.prompt[i])
        anchors = sorted({0, T} | {j for j in range(1, T) if j % k == 0})
        val = {j: (float(b.rm[i]) if j == T else V_of(p, toks, j)) for j in anchors}
        for t in range(1, T + 1):
            lo = max(a for a in anchors if a < t)
            hi = min(a for a in anchors if a >= t)
            out[i, t - 1] = val[hi] - val[lo]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loops(seed):
    b = random_batch(seed, n_batches=3, G=3)
    first = lambda out: out.advantages[:, 0].tolist()  # noqa: E731
    assert first(get_estimator("grpo")(b)) == pytest.approx(grpo_loop(b))
    assert first(get_estimator("grpo:std_norm=false")(b)) == pytest.approx(grpo_loop(b, std_norm=False))
    assert first(get_estimator("rloo")(b)) == pytest.approx(rloo_loop(b))
    assert first(get_estimator("opo")(b)) == pytest.approx(opo_loop(b))
    for gamma in (1.0, 0.7):
        got = get_estimator(f"reinforce_pp:gamma={gamma}")(b).advantages
        assert torch.allclose(got, rpp_loop(b, gamma))
    ctx = FakeContext()
    Vc = ctx.critic_values(b, "exact", 1.0, {})
    for gamma, lam in ((1.0, 1.0), (0.9, 0.5), (0.8, 0.0)):
        got = get_estimator(f"ppo_gae:gamma={gamma},lambda={lam}")(b, ctx).advantages
        assert torch.allclose(got, gae_loop(b.token_level_rewards, Vc, b.mask, gamma, lam))
    for k in (1, 2, 3):
        got = get_estimator(f"trepo:anchors=every:{k}")(b, FakeContext()).advantages
        assert torch.allclose(got, trepo_segment_loop(b, k))


def test_discounted_returns_loop():
    b = random_batch(5)
    r = torch.randn(b.batch_size, b.horizon, dtype=torch.float64) * b.mask
    got = discounted_returns(r, b.mask, 0.6)
    for i in range(b.batch_size):
        for t in range(b.horizon):
            want = sum(0.6 ** (k - t) * float(r[i, k]) for k in range(t, int(b.length[i]))) if t < b.length[i] else 0
            assert float(got[i, t]) == pytest.approx(want)


# -- stacking, padding, aggregation --------------------------------------------------------------

STACK_SPECS = [s for s in E.CATALOG if s not in ("reward_to_go",)] + [
    "reinforce_pp:agg=token-mean", "grpo:agg=seq-mean-token-mean", "dr_grpo:agg=customary",
    "trepo:anchors=every:2", "trepo:anchors=random:2", "trepo:anchors=random:1,fill=ipw",
    "trepo:anchors=every:2,fill=interpolate", "ppo_gae:lambda=0.5,gamma=0.9", "grpo:kl=k3",
    "reinforce:kl=k1_reward", "reinforce_pp:kl=k1_reward", "ppo_gae:kl=k2", "trepo:kl=k1_reward",
]


@pytest.mark.parametrize("spec", STACK_SPECS)
def test_stacked_batches_equal_separate(spec):
    parts = [random_batch(10 + k, n_batches=1, G=3, singleton=(k == 1)) for k in range(3)]
    est = get_estimator(spec)
    ctx_exact = "random" in spec  # MC random anchors depend on the stream: compare expectations
    outs = [est(p, FakeContext(exact=ctx_exact)) for p in parts]
    stacked = est(stack_batches(parts), FakeContext(exact=ctx_exact))
    assert torch.allclose(stacked.advantages, torch.cat([o.advantages for o in outs]))
    assert torch.allclose(stacked.weights, torch.cat([o.weights for o in outs]))
    if stacked.kl_coef is not None:
        assert torch.allclose(stacked.kl_coef, torch.cat([o.kl_coef for o in outs]))


def test_group_ids_need_only_be_unique_within_a_batch():
    a = random_batch(20, n_batches=1)
    b = random_batch(21, n_batches=1)
    b.batch = torch.ones_like(b.batch)
    joined = ResponseBatch(**{k: (torch.cat([getattr(a, k), getattr(b, k)]) if isinstance(getattr(a, k), torch.Tensor)
                                  else getattr(a, k)) for k in a.__dataclass_fields__ if k != "token_rewards"})
    got = get_estimator("grpo")(joined).advantages
    assert torch.allclose(got, torch.cat([get_estimator("grpo")(a).advantages, get_estimator("grpo")(b).advantages]))


class NoisyPaddingContext(FakeContext):
    """Non-zero critic values everywhere, including after the end."""

    def critic_values(self, batch, kind, gamma, options):
        return torch.full((batch.batch_size, batch.horizon + 1), 0.7, dtype=torch.float64)


@pytest.mark.parametrize("spec", list(E.CATALOG) + ["trepo:anchors=random:2,fill=interpolate",
                                                   "trepo:anchors=random:2,fill=ipw", "ppo_gae:kl=k3"])
def test_padding_is_zero(spec):
    b = random_batch(7)
    b.token_rewards = b.token_level_rewards.clone()
    out = get_estimator(spec)(b, NoisyPaddingContext())
    pad = ~b.mask
    assert bool((out.advantages[pad] == 0).all()) and bool((out.weights[pad] == 0).all())
    if out.kl_coef is not None:
        assert bool((out.kl_coef[pad] == 0).all())
    assert bool((out.score_coef()[pad] == 0).all())


def test_aggregation_weights_per_mode():
    b = make_batch([1.0] * 5, [1, 2, 3, 2, 2], [0, 0, 0, 0, 0], batch_ids=[0, 0, 0, 1, 1], horizon=4)
    m = b.mask.double()
    n = torch.tensor([3, 3, 3, 2, 2], dtype=torch.float64).unsqueeze(1)
    L = b.length.double().unsqueeze(1)
    tok = torch.tensor([6, 6, 6, 4, 4], dtype=torch.float64).unsqueeze(1)
    want = {"seq-mean-token-sum": m / n, "seq-mean-token-sum-norm": m / (n * 4), "seq-mean-token-mean": m / (n * L),
            "token-mean": m / tok, "token-sum": m}
    for mode, w in want.items():
        out = get_estimator(f"reinforce:agg={mode}")(b)
        assert torch.allclose(out.weights, w), mode
        assert out.info["agg"] == mode
    assert get_estimator("grpo").agg == "seq-mean-token-sum"
    assert get_estimator("grpo:agg=customary").agg == "seq-mean-token-mean"
    assert get_estimator("ppo_gae:agg=customary").agg == "token-mean"
    assert get_estimator("reinforce:agg=token-mean").needs_batches
    assert not get_estimator("reinforce").needs_batches and get_estimator("reinforce_pp").needs_batches


def test_flags():
    groups = {n for n in E.CATALOG if get_estimator(n).needs_groups}
    assert groups == {"rloo", "grpo", "dr_grpo", "opo", "reinforce_pp_baseline"}
    assert [n for n in E.CATALOG if get_estimator(n).uses_token_rewards] == ["reward_to_go"]


# -- KL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_coef_is_autograd_of_k(kind):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(5, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -torch.rand(5, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 4, generator=g) < 0.7
    beta = 0.37
    loss = (beta * kl_value(logp - ref, kind) * mask).sum()
    (grad,) = torch.autograd.grad(loss, logp)
    coef = kl_loss_coef((logp - ref).detach() * mask, mask, kind, beta)
    assert torch.allclose(grad, coef)


def test_k3_is_verl_low_var_kl():
    logp = torch.tensor([-0.2, -1.5, -0.01], dtype=torch.float64)
    ref = torch.tensor([-0.9, -0.3, -0.01], dtype=torch.float64)
    kl = ref - logp  # verl's convention
    verl = torch.exp(kl) - kl - 1
    assert torch.allclose(kl_value(logp - ref, "k3"), verl)
    assert torch.allclose(kl_value(logp - ref, "low_var_kl"), verl)


def test_kl_loss_options(tiny):
    for kind in ("k1", "k2", "k3", "low_var_kl"):
        est = get_estimator(f"grpo:kl={kind},kl_beta=0.2")
        out = est(tiny)
        delta = (tiny.logp - tiny.ref_logp) * tiny.mask
        canon = "k3" if kind == "low_var_kl" else kind
        assert torch.allclose(out.kl_coef, kl_loss_coef(delta, tiny.mask, canon, 0.2))
        assert torch.allclose(out.score_coef(), out.weights * (out.advantages - out.kl_coef))
        plain = get_estimator("grpo")(tiny)
        assert torch.allclose(out.advantages, plain.advantages)  # a loss term leaves A alone
    assert get_estimator("grpo").__call__(tiny).kl_coef is None


def test_kl_in_reward(tiny):
    beta = 0.3
    delta = (tiny.logp - tiny.ref_logp) * tiny.mask
    pen = beta * delta
    out = get_estimator(f"reinforce:kl=k1_reward,kl_beta={beta}")(tiny)
    assert torch.allclose(out.advantages, (tiny.rm - pen.sum(1)).unsqueeze(1) * tiny.mask)
    assert out.kl_coef is None
    # token-level methods subtract the penalty per token, so token t carries -beta sum_{k >= t} Delta_k
    rtg_pen = discounted_returns(pen, tiny.mask, 1.0)
    zero = get_estimator(f"ppo_gae:critic=zero,kl=k1_reward,kl_beta={beta}")(tiny, None)
    assert torch.allclose(zero.advantages, tiny.rm.unsqueeze(1) * tiny.mask - rtg_pen)
    tr = get_estimator(f"trepo:kl=k1_reward,kl_beta={beta}")(tiny, FakeContext())
    assert torch.allclose(tr.advantages, get_estimator("trepo")(tiny, FakeContext()).advantages - rtg_pen)
    b = make_batch([1.0, 2.0], [2, 3], [0, 1], token_rewards=[[0.5, 0.5, 0], [1.0, 0.0, 1.0]])
    pen_b = beta * (b.logp - b.ref_logp) * b.mask
    oracle = get_estimator(f"reward_to_go:kl=k1_reward,kl_beta={beta}")(b)
    assert torch.allclose(oracle.advantages, get_estimator("reward_to_go")(b).advantages
                          - discounted_returns(pen_b, b.mask, 1.0))
    # group methods see RM' = RM - beta sum Delta
    b2 = tiny.index(torch.arange(4))
    b2.rm = tiny.rm - pen.sum(1)
    assert torch.allclose(get_estimator(f"grpo:kl=k1_reward,kl_beta={beta}")(tiny).advantages,
                          get_estimator("grpo")(b2).advantages)


def test_kl_needs_ref_logp(tiny):
    tiny.ref_logp = None
    for spec in ("grpo:kl=k3", "reinforce:kl=k1_reward"):
        with pytest.raises(ValueError, match="ref_logp"):
            get_estimator(spec)(tiny)


# -- PPO clip loss -------------------------------------------------------------------------------

def test_ppo_clip_loss_gradient_at_ratio_one(tiny):
    out = get_estimator("ppo_gae:lambda=0.7")(tiny, FakeContext())
    logp = tiny.logp.clone().requires_grad_(True)
    loss = E.ppo_clip_loss(logp, tiny.logp, out.advantages, out.weights, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, -out.weights * out.advantages)
    # away from ratio 1 the clip cuts the gradient of a positive advantage above 1 + eps
    far = (tiny.logp + 1.0).requires_grad_(True)
    A = torch.ones_like(tiny.logp)
    (g2,) = torch.autograd.grad(E.ppo_clip_loss(far, tiny.logp, A, tiny.mask.double(), 0.2), far)
    assert bool((g2 == 0).all())


# -- the oracle on Rollouts ----------------------------------------------------------------------

def test_oracle_accepts_rollouts():
    from tpg.cases import mdp_from_spec
    from tpg.rollouts import sample

    mdp, pol = mdp_from_spec("dense:vocab=3,horizon=3,eos=0,prompts=2,seed=0,gamma=0.9")
    ro = sample(mdp, pol, num_prompts=3, group_size=2, seed=1)
    est = get_estimator("reward_to_go")
    a = est(ro).advantages
    b = est(ResponseBatch.from_rollouts(ro, keep_token_rewards=True)).advantages
    assert torch.allclose(a, b)
    assert torch.allclose(a[:, 0], ro.rm)
    # other estimators strip the token rewards from Rollouts
    assert torch.allclose(get_estimator("reinforce")(ro).advantages, ro.rm.unsqueeze(1) * ro.mask)


def test_bad_batch_shapes(tiny):
    tiny.rm = tiny.rm[:3]
    with pytest.raises(ValueError, match="rm"):
        get_estimator("reinforce")(tiny)
