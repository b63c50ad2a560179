"""Helpers shared by test modules (the samplers' chi-square checks, the exact engine against the
reference, the command line's exit code and output); pytest puts tests/ on sys.path, so a test module
imports them as ``from _helpers import ...``."""

import pytest
import torch
from scipy.stats import chisquare


def leaf_of(tree, prompt_b, tokens_bt, mask_bt):
    """Node id of each sampled response, walking the tree from its tokens (not the sampler's ids)."""
    node = prompt_b.clone()
    for t in range(tokens_bt.shape[1]):
        step = tree.num_prompts + tree.nt_index_n[node].clamp(min=0) * tree.vocab_size + tokens_bt[:, t]
        node = torch.where(mask_bt[:, t], step, node)
    assert bool((tree.nt_index_n[node] < 0).all()), "a sampled response does not end at a leaf"
    return node


def chisquare_p(observed, prob, min_bins=2):
    """Goodness-of-fit p-value; bins with expected count < 5 are merged into one (or into the
    smallest kept bin when their total is still below 5). Asserts at least ``min_bins`` bins remain."""
    observed = observed.to(torch.float64)
    expected = prob.to(torch.float64) / prob.sum() * observed.sum()
    assert float(observed[prob == 0].sum()) == 0, "a zero-probability response was sampled"
    big = expected >= 5
    obs, exp = observed[big].tolist(), expected[big].tolist()
    rest_o, rest_e = float(observed[~big].sum()), float(expected[~big].sum())
    if rest_e >= 5:
        obs.append(rest_o)
        exp.append(rest_e)
    elif rest_e > 0:
        i = min(range(len(exp)), key=exp.__getitem__)
        obs[i] += rest_o
        exp[i] += rest_e
    assert len(obs) >= min_bins
    return float(chisquare(obs, exp).pvalue)


def assert_matches_reference_grad(mdp, sol, J_ref, grad_ref, tol):
    """``sol`` (from :func:`tpg.exact.solve`) against :func:`tpg.reference.reference_from_case`'s
    ``(J_ref, grad_ref)``: J, and every non-terminal prefix's logit gradient, to ``tol``."""
    assert sol.J == pytest.approx(J_ref, abs=tol)
    tree = mdp.tree
    assert len(grad_ref) == tree.num_nonterminal
    for k in range(tree.num_nonterminal):
        prompt, prefix = tree.prefix(int(tree.nt_node_k[k]))
        row = torch.tensor(grad_ref[(prompt, tuple(prefix))], dtype=torch.float64)
        assert float((sol.grad_logits[k] - row).abs().max()) < tol, (prompt, prefix)


def run_cli(capsys, main, *argv):
    """``(exit code, stdout, stderr)`` of ``main(argv)`` (``tpg.cli.main``), argparse's usage errors
    (``SystemExit``) included."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
