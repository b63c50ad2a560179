"""The options of a real-LM problem (``tpg verify --lm ...``), free of torch.

:func:`add_lm_args` declares them; :func:`tpg.verify.lm.problem_from_lm_args` reads them. Kept apart
from :mod:`.lm` (which imports torch and transformers) so that ``tpg verify --help`` answers at once.
"""

from __future__ import annotations

import argparse

from ..mdp.specs import LM_REWARDS
from ..policies.defaults import TRAINABLE_HELP, TREE_MODES

#: Parameter spaces of the verdicts: ``full`` (every trainable parameter), ``sketch`` (a random projection).
PARAM_SPACES = ("auto", "full", "sketch")
#: Directions of the sketch by default.
DEFAULT_SKETCH_DIM = 256


def _add(parser, group, *names, **kw) -> None:
    """Add an option unless the parser already has one of its names (shared options are reused)."""
    if any(n in parser._option_string_actions for n in names):
        return
    (group or parser).add_argument(*names, **kw)


def add_lm_args(parser: argparse.ArgumentParser, group=None) -> None:
    """Options of a real-LM problem. ``--lm`` goes into ``group`` when given (e.g. the command's
    mutually exclusive problem source); the others into ``parser``. Options the parser already has
    are left as they are."""
    _add(parser, group, "--lm", metavar="PATH_OR_CONFIG", default=None,
         help="a Hugging Face causal LM restricted to --allowed-tokens: a local checkpoint directory, "
              "config:PATH (random init), or gpt2-tiny | llama-tiny | gpt2-124m | gpt2-1.5b[:key=value,...]")
    g = parser.add_argument_group("real language model (--lm)")
    _add(parser, g, "--allowed-tokens", metavar="IDS", default=None,
         help="the K allowed LM tokens: ids (3,5,7) or single-token strings with a tokenizer")
    _add(parser, g, "--horizon", type=int, default=3, metavar="H", help="max response length (default 3)")
    _add(parser, g, "--prompt", action="append", metavar="TEXT", default=None,
         help="a prompt as text (needs a tokenizer; repeatable)")
    _add(parser, g, "--prompt-ids", action="append", metavar="IDS", default=None,
         help="a prompt as LM token ids, e.g. 10,11,12 (repeatable; default 1,2,3,4)")
    _add(parser, g, "--prompt-weights", metavar="W", default=None, help="prompt distribution, e.g. 0.3,0.7")
    _add(parser, g, "--eos-token", metavar="ID", default=None, help="EOS (an allowed token id); default none")
    _add(parser, g, "--trainable", default="all", metavar="SPEC", help=f"trainable parameters: {TRAINABLE_HELP}")
    _add(parser, g, "--reward", choices=LM_REWARDS, default="table",
         help="token rewards: a random (position, token) table, a rule (right answer), or a frozen second LM's "
              "log-probability of each token (default table)")
    _add(parser, g, "--reward-seed", type=int, default=0, metavar="S", help="seed of the reward table / answer")
    _add(parser, g, "--reward-scale", type=float, default=1.0, metavar="X", help="multiplies table and lm rewards")
    _add(parser, g, "--reward-target", metavar="IDX", default=None,
         help="rule answer as MDP token indices, e.g. 0-2-1 (default random)")
    _add(parser, g, "--reward-score", choices=("token", "whole"), default="token",
         help="rule: 1 per correct token or 1 for the whole answer")
    _add(parser, g, "--reward-lm", metavar="PATH_OR_CONFIG", default=None,
         help="the reward model of --reward lm (default: --lm initialised with --lm-seed + 1)")
    _add(parser, g, "--twin", action="store_true", help="the zero-reward twin (same RM, all of it on the last token)")
    _add(parser, g, "--lm-gamma", type=float, default=1.0, metavar="G", help="discount (default 1)")
    _add(parser, g, "--lm-dtype", choices=("float64", "float32", "bfloat16"), default=None,
         help="parameter dtype (default float64 on CPU, bfloat16 on CUDA)")
    _add(parser, g, "--lm-device", default="cpu", metavar="DEV", help="device of the LM (default cpu)")
    _add(parser, g, "--lm-seed", type=int, default=0, metavar="S", help="seed of a random initialisation")
    _add(parser, g, "--tokenizer", default=None, metavar="PATH", help="a local tokenizer (default: the --lm directory)")
    _add(parser, g, "--param-space", choices=PARAM_SPACES, default="auto",
         help="full (dense Jacobian), sketch (random projection), auto (sketch in mc mode or when the Jacobian "
              "is too large)")
    _add(parser, g, "--sketch-dim", type=int, default=DEFAULT_SKETCH_DIM, metavar="K",
         help=f"directions of the sketch (default {DEFAULT_SKETCH_DIM})")
    _add(parser, g, "--tree-mode", choices=TREE_MODES, default="auto",
         help="prefix sharing: packed (tree attention, one forward) or levels (key/value cache per level)")
    _add(parser, g, "--lm-max-batch", type=int, default=8192, metavar="N", help="tokens per forward call")


__all__ = ["add_lm_args", "PARAM_SPACES", "DEFAULT_SKETCH_DIM"]
