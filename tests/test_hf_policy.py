"""The Hugging Face restricted policy: loading (shorthands, configs, saved checkpoints, tokenizers),
trainable-parameter selection, the restricted head, padding, and precision (tiny models, CPU)."""

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tpg.exact.hf import make_lm_problem, solve_lm  # noqa: E402
from tpg.policies.hf import (HFRestrictedPolicy, apply_trainable, causal_lm_config, decoder_blocks,  # noqa: E402
                             load_causal_lm, packed_layout, parse_trainable)

ALLOWED = [3, 5, 7]
PROMPTS = [[10, 11, 12], [20, 21]]  # different lengths: left padding in every batched forward


def flat(grads):
    return torch.cat([g.reshape(-1).to(torch.float64) for g in grads])


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def policy(request):
    return HFRestrictedPolicy(request.param, ALLOWED, PROMPTS, 3, eos_token=5)


def test_shape_and_description(policy):
    assert policy.vocab_size == 3 and policy.num_prompts == 2 and policy.eos_index == 1
    assert policy.allowed_tokens == (3, 5, 7) and policy.prompt_width == 3
    assert policy.dtype == torch.float64 and policy.compute_dtype == torch.float64
    assert policy.prompt_tokens.tolist() == [[10, 11, 12], [0, 20, 21]] and policy.prompt_len.tolist() == [3, 2]
    assert "K=3" in policy.describe()
    assert policy.model.config._attn_implementation == "tpg_math"  # exact float64 attention


def test_restricted_head_is_the_full_head(policy):
    """z_k(s) = the model's own logit of allowed[k], for padded and unpadded prompts alike."""
    tokens = torch.tensor([[0, 2], [2, 0]])
    with torch.no_grad():
        ours = policy.sequence_logits(torch.tensor([0, 1]), tokens)
        full = policy.sequence_logits(torch.tensor([0, 1]), tokens, full_head=True)
    assert float((ours - full).abs().max()) < 1e-12
    for p, ids in enumerate(PROMPTS):  # one unpadded plain forward per prompt
        seq = torch.tensor([ids + [ALLOWED[t] for t in tokens[p].tolist()]])
        with torch.no_grad():
            logits = policy.model(seq).logits[0, len(ids) - 1:, ALLOWED].to(torch.float64)
        assert float((ours[p] - logits).abs().max()) < 1e-12


def test_float32_upcasts_removed_in_float64():
    pol = HFRestrictedPolicy("llama-tiny", ALLOWED, PROMPTS, 2)
    norms = [m for m in pol.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" in vars(m) for m in norms)  # rebound to the float64 formula


def test_same_seed_same_model_in_every_dtype():
    mdp, p64 = make_lm_problem("gpt2-tiny", ALLOWED, PROMPTS, 2, reward="table")
    p32 = HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2, dtype="float32")
    pbf = HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2, dtype="bfloat16")
    s64, s32, sbf = (solve_lm(mdp, p) for p in (p64, p32, pbf))
    g64 = flat(s64.grads)
    assert abs(s32.J - s64.J) < 1e-5 and float((flat(s32.grads) - g64).norm() / g64.norm()) < 1e-5
    gbf = flat(sbf.grads)
    assert abs(sbf.J - s64.J) < 0.05 and float(gbf @ g64 / (gbf.norm() * g64.norm())) > 0.999


def test_loading_configs_and_saved_checkpoints(tmp_path):
    cfg = causal_lm_config("gpt2-tiny:n_layer=1,n_embd=16")
    assert cfg.n_layer == 1 and cfg.n_embd == 16 and cfg.model_type == "gpt2"
    lm = load_causal_lm(cfg, seed=3)
    assert len(decoder_blocks(lm)) == 1
    again = load_causal_lm(cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(lm.parameters(), again.parameters()))  # seeded
    lm.save_pretrained(tmp_path / "ckpt")
    lm.config.save_pretrained(tmp_path / "cfg_only")
    loaded = HFRestrictedPolicy(str(tmp_path / "ckpt"), ALLOWED, PROMPTS, 2)
    direct = HFRestrictedPolicy(lm, ALLOWED, PROMPTS, 2)
    tree = make_lm_problem(None, ALLOWED, PROMPTS, 2, policy=direct)[0].tree
    with torch.no_grad():
        assert float((loaded.node_logits(tree) - direct.node_logits(tree)).abs().max()) < 1e-6  # float32 weights
    fresh = HFRestrictedPolicy(f"config:{tmp_path / 'cfg_only'}", ALLOWED, PROMPTS, 2, seed=3)
    assert fresh.model.config.n_embd == 16
    cfg_dir = HFRestrictedPolicy(str(tmp_path / "cfg_only"), ALLOWED, PROMPTS, 2, seed=3)  # no weights: random init
    with torch.no_grad():
        assert float((cfg_dir.node_logits(tree) - fresh.node_logits(tree)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="unknown model shorthand"):
        load_causal_lm("no-such-model")


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def test_text_prompts_and_token_strings(tmp_path):
    tok = _word_tokenizer()
    pol = HFRestrictedPolicy("gpt2-tiny", ["w3", "w5", "w7"], ["w10 w11 w12", "w20 w21"], 2, tokenizer=tok,
                             eos_token="w5")
    assert pol.allowed_tokens == (3, 5, 7) and pol.eos_index == 1
    assert [list(p) for p in pol.prompt_ids] == PROMPTS
    lm = load_causal_lm("gpt2-tiny")
    lm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    from_dir = HFRestrictedPolicy(str(tmp_path / "m"), [3, 5, 7], ["w10 w11 w12"], 2)  # the directory's tokenizer
    assert list(from_dir.prompt_ids[0]) == [10, 11, 12]
    with pytest.raises(ValueError, match="tokenizer"):
        HFRestrictedPolicy("gpt2-tiny", ALLOWED, ["w1 w2"], 2)
    with pytest.raises(ValueError, match="not one"):
        HFRestrictedPolicy("gpt2-tiny", ["w3 w4", "w5"], PROMPTS, 2, tokenizer=tok)


def test_trainable_selection():
    assert parse_trainable("last:2") == ("last", 2) and parse_trainable("LoRA:8") == ("lora", 8)
    for bad in ("last", "last:0", "some", "lora:x"):
        with pytest.raises(ValueError, match="trainable"):
            parse_trainable(bad)
    mdp, _ = make_lm_problem("gpt2-tiny", ALLOWED, PROMPTS, 2)
    full = HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2)
    g_full = dict(zip([n for n, p in full.named_parameters() if p.requires_grad], solve_lm(mdp, full).grads))
    for spec in ("last:1", "head"):
        pol = HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2, trainable=spec)
        names = [n for n, p in pol.named_parameters() if p.requires_grad]
        if spec == "head":
            assert names == ["model.transformer.wte.weight"]  # GPT-2 ties the head to the embeddings
        else:
            assert names and all(n.startswith("model.transformer.h.1.") for n in names)
        for n, g in zip(names, solve_lm(mdp, pol).grads):  # the same gradient entries as with all trainable
            assert float((g - g_full[n]).abs().max()) < 1e-12
    frozen = HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2, trainable="none")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_lora_without_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ValueError, match=r"lora:R.*needs the peft package"):
        apply_trainable(load_causal_lm("gpt2-tiny"), "lora:4")


# the linear layers of one block, as LoRA adapts them
LORA_LAYERS = {"gpt2-tiny": {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128),
                             "mlp.c_proj": (128, 32)},
               "llama-tiny": {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (32, 16), "self_attn.v_proj": (32, 16),
                              "self_attn.o_proj": (32, 32), "mlp.gate_proj": (32, 64), "mlp.up_proj": (32, 64),
                              "mlp.down_proj": (64, 32)}}


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_lora_adapts_every_block_linear_layer_and_starts_as_the_base_model(name):
    """lora:R: only the A [R, d_in] and B [d_out, R] of every linear layer of every block are
    trainable (not the LM head, not the base weights); B = 0 gives exactly the base model's node
    logits; A comes from the seed; a nonzero B changes the logits."""
    pytest.importorskip("peft")
    R = 3
    mdp, base = make_lm_problem(name, ALLOWED, PROMPTS, 2, eos_token=5, trainable="none", seed=4)
    pol = HFRestrictedPolicy(name, ALLOWED, PROMPTS, 2, eos_token=5, trainable=f"lora:{R}", seed=4)
    trainable = {n: p for n, p in pol.named_parameters() if p.requires_grad}
    prefix = "model.transformer.h" if name == "gpt2-tiny" else "model.model.layers"
    expected = {}
    for block in range(2):
        for layer, (d_in, d_out) in LORA_LAYERS[name].items():
            expected[f"{prefix}.{block}.{layer}.lora_A.default.weight"] = (R, d_in)
            expected[f"{prefix}.{block}.{layer}.lora_B.default.weight"] = (d_out, R)
    assert {n: tuple(p.shape) for n, p in trainable.items()} == expected
    assert all(p.dtype == torch.float64 for p in pol.parameters())
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in trainable.items() if "lora_B" in n)
    assert all(float(p.detach().abs().max()) > 0.0 for n, p in trainable.items() if "lora_A" in n)
    assert "lora:3" in pol.describe() and f"({sum(p.numel() for p in trainable.values()):,} parameters)" in pol.describe()
    with torch.no_grad():
        logits = pol.node_logits(mdp.tree)
        assert torch.equal(logits, base.node_logits(mdp.tree))  # W x + 0: bit for bit
        again = HFRestrictedPolicy(name, ALLOWED, PROMPTS, 2, eos_token=5, trainable=f"lora:{R}", seed=4)
        assert all(torch.equal(p, q) for p, q in zip(pol.parameters(), again.parameters()))
        other = HFRestrictedPolicy(name, ALLOWED, PROMPTS, 2, eos_token=5, trainable=f"lora:{R}", seed=5)
        assert not torch.equal(dict(other.named_parameters())[next(iter(expected))], trainable[next(iter(expected))])
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
        assert float((pol.node_logits(mdp.tree) - logits).abs().max()) > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="distinct"):
        HFRestrictedPolicy("gpt2-tiny", [3, 3], PROMPTS, 2)
    with pytest.raises(ValueError, match="allowed token ids"):
        HFRestrictedPolicy("gpt2-tiny", [3, 64], PROMPTS, 2)
    with pytest.raises(ValueError, match="not among the allowed"):
        HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2, eos_token=4)
    with pytest.raises(ValueError, match="positions"):
        HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 62)
    with pytest.raises(ValueError, match="empty"):
        HFRestrictedPolicy("gpt2-tiny", ALLOWED, [[]], 2)
    with pytest.raises(ValueError, match="tree_mode"):
        HFRestrictedPolicy("gpt2-tiny", ALLOWED, PROMPTS, 2, tree_mode="flat")


def test_packed_layout_masks():
    """Each node sees the prompt's real tokens, its ancestors and itself; positions are len(x) - 1 + depth."""
    mdp, pol = make_lm_problem("gpt2-tiny", ALLOWED, PROMPTS, 3, eos_token=5)
    tree = mdp.tree
    nt_pm, tok_pm, pos_pt, mask_ptt = packed_layout(tree, pol.prompt_len, pol.prompt_width)
    W = pol.prompt_width
    for p in range(2):
        for i, k in enumerate(nt_pm[p].tolist()):
            node = int(tree.nt_node_k[k])
            prompt, prefix = tree.prefix(node)
            assert prompt == p and int(pos_pt[p, W + i]) == len(PROMPTS[p]) - 1 + len(prefix)
            seen = {int(tree.nt_node_k[nt_pm[p, j]]) for j in torch.nonzero(mask_ptt[p, W + i, W:]).flatten().tolist()}
            ancestors, cur = set(), node
            while cur >= tree.num_prompts:  # the node itself and its non-root ancestors
                ancestors.add(cur)
                cur = int(tree.parent_n[cur])
            assert seen == ancestors
            assert mask_ptt[p, W + i, :W].tolist() == [j >= W - len(PROMPTS[p]) for j in range(W)]


def test_deepcopy_and_reference_policy():
    """The verifier's reference policy is a perturbed deep copy: same logits before the
    perturbation, independent parameters, no shared sampling caches."""
    from tpg.verify.harness import default_reference
    mdp, pol = make_lm_problem("llama-tiny", ALLOWED, PROMPTS, 2, eos_token=5)
    pol.sample(torch.tensor([0, 1]), seed=0)
    twin = copy.deepcopy(pol)
    assert not twin._decode_states and twin.model is not pol.model
    with torch.no_grad():
        assert torch.equal(twin.node_logits(mdp.tree), pol.node_logits(mdp.tree))
        ref = default_reference(pol, seed=0)
        assert not torch.equal(ref.node_logits(mdp.tree), pol.node_logits(mdp.tree))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ref.parameters(), pol.parameters()))


def test_readme_lora_verify_command(capsys):
    """The README's `tpg verify --lm ... --trainable lora:4` line runs as written: REINFORCE is
    unbiased over the adapters' parameters, and GRPO (the negative control) is flagged."""
    pytest.importorskip("peft")
    import json
    from pathlib import Path

    import tpg
    from tpg import cli

    readme = Path(tpg.__file__).resolve().parents[1] / "README.md"
    (line,) = [t for t in readme.read_text().splitlines() if t.startswith("tpg verify --lm") and "lora:" in t]
    rc = cli.main(line.split("#")[0].split()[1:] + ["--estimator", "grpo", "--json"])
    records = json.loads(capsys.readouterr().out)["records"]
    assert rc == 0
    assert {r["spec"]: r["verdict"] for r in records} == {"reinforce": "unbiased", "grpo": "biased"}
