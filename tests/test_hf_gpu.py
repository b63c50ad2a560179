"""GPU checks of the real-LM path (skipped without CUDA; run by benchmarks/run_gpu.sh).

bfloat16 and float32 on the GPU against the float64 CPU reference of the same weights; the three
ways of computing node logits against each other; the CUDA-graph sampler against the eager one and
against exact probabilities; the forward-mode sketch on the GPU."""

import copy

import pytest
import torch
from scipy.stats import chisquare

pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run `bash benchmarks/run_gpu.sh OUT` on a GPU machine")

from tpg.exact.hf import make_lm_problem, naive_node_logits, solve_lm  # noqa: E402
from tpg.policies.hf import HFRestrictedPolicy, load_causal_lm  # noqa: E402

ALLOWED = [3, 5, 7, 9]
PROMPTS = [[10, 11, 12], [20, 21]]


def flat(grads):
    return torch.cat([g.reshape(-1).to(device="cpu", dtype=torch.float64) for g in grads])


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def weights(request):
    return load_causal_lm(request.param, seed=0)  # float32 on the CPU: one set of weights for every device


def problem(lm, dtype, device, eos=5, horizon=3):
    return make_lm_problem(copy.deepcopy(lm), ALLOWED, PROMPTS, horizon, eos_token=eos, reward="table",
                           dtype=dtype, device=device)


@pytest.mark.parametrize("dtype,tol,grad_tol", [("float32", 1e-5, 1e-4), ("bfloat16", 3e-2, 0.1)])
def test_exact_gradient_on_gpu_matches_float64_cpu(weights, dtype, tol, grad_tol):
    mdp, ref = problem(weights, "float64", "cpu")
    _, gpu = problem(weights, dtype, "cuda")
    s_ref, s_gpu = solve_lm(mdp, ref), solve_lm(mdp, gpu)
    g_ref, g = flat(s_ref.grads), flat(s_gpu.grads)
    assert abs(s_gpu.J - s_ref.J) < tol * max(1.0, abs(s_ref.J))
    assert float((g - g_ref).norm() / g_ref.norm()) < grad_tol
    assert gpu.model.config._attn_implementation == "sdpa"


def test_packed_levels_naive_agree_on_gpu(weights):
    mdp, pol = problem(weights, "float32", "cuda")
    with torch.no_grad():
        pol.tree_mode = "packed"
        packed = pol.node_logits(mdp.tree)
        pol.tree_mode = "levels"
        levels = pol.node_logits(mdp.tree)
        naive = naive_node_logits(pol, mdp.tree, full_head=True)
    assert float((packed - levels).abs().max()) < 1e-4 and float((packed - naive).abs().max()) < 1e-4


def test_cuda_graph_sampler(weights):
    """The captured decode step gives the eager step's samples, and they follow pi."""
    mdp, pol = problem(weights, "float32", "cuda", horizon=4)
    prompts = torch.multinomial(mdp.prompt_weights, 4096, replacement=True, generator=torch.Generator().manual_seed(0))
    tok_g, lp_g, len_g = pol.sample(prompts, seed=1, cuda_graph=True)
    assert pol.last_sample_info["cuda_graph"], pol.last_sample_info
    tok_e, lp_e, len_e = pol.sample(prompts, seed=1, cuda_graph=False)
    assert float((tok_g != tok_e).double().mean()) < 1e-3  # ties at float32 rounding only
    same = (tok_g == tok_e).all(1)
    assert float((lp_g - lp_e)[same].abs().max()) < 1e-5
    sol = solve_lm(mdp, pol, with_grad=False)
    first = torch.bincount(tok_g[prompts == 0, 0], minlength=4).double()
    expected = sol.logp[0].exp() * float((prompts == 0).sum())
    assert chisquare(first.numpy(), expected.numpy()).pvalue > 1e-3


def test_continuations_with_cuda_graph(weights):
    mdp, pol = problem(weights, "bfloat16", "cuda", horizon=4)
    prefixes = torch.tensor([[0, 2, 0], [2, 0, 3]])
    tok, lp, length = pol.sample(torch.tensor([0, 1]), prefix_bt=prefixes, prefix_len_b=torch.tensor([1, 3]),
                                 num_samples=64, seed=2)
    tok = tok.view(2, 64, 4)
    assert bool((tok[0, :, :1] == 0).all()) and bool((tok[1, :, :3] == prefixes[1]).all())
    assert torch.isfinite(lp).all()


def test_sketch_on_gpu(weights):
    from tpg.verify.lm import sketch_logit_jacobian
    mdp, ref = problem(weights, "float64", "cpu")
    _, gpu = problem(weights, "float32", "cuda")
    A_ref = sketch_logit_jacobian(ref, mdp.tree, 8, seed=0)
    A = sketch_logit_jacobian(gpu, mdp.tree, 8, seed=0)
    assert A.shape == A_ref.shape and bool(torch.isfinite(A).all())
    assert gpu.model.config._attn_implementation == "sdpa"  # restored after the forward-mode pass


def test_gpt2_124m_bfloat16_smoke():
    """The benchmark's model class at full size: one exact solve and one sampling batch."""
    pol = HFRestrictedPolicy("gpt2-124m", [11, 13, 17, 19], [list(range(100, 116))], 3, device="cuda")
    mdp, _ = make_lm_problem(None, None, None, 3, policy=pol)
    sol = solve_lm(mdp, pol)
    assert torch.isfinite(flat(sol.grads)).all()
    tok, lp, _ = pol.sample(torch.zeros(256, dtype=torch.long), seed=0)
    assert tok.shape == (256, 3) and torch.isfinite(lp).all()
