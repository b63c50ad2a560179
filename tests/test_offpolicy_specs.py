"""The torch-free behaviour and loss grammar (tpg.offpolicy.specs) refuses what the engine refuses, in
the same words, and accepts what it accepts; the classes' declarations are the grammar's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tpg.offpolicy import specs

ROOT = Path(__file__).resolve().parents[1]

BAD_BEHAVIOURS = ["nosuch", "temperature:-1", "temperature:0", "top_k:0", "top_p:1.5", "min_p:2", "logit_noise:-0.1",
                  "logit_noise:0.1,-3", "precision:fp8", "stale:-1", "stale:2,lr=0", "file:", "mix:0.5,pi",
                  "mix:1.5,pi,temperature:2", "top_p:0.9+stale:2", "temperature:2+file:x.json", "pi:3",
                  "temperature:2+", "(temperature:2", "temperature:1,2", "top_k:k=2,3", "temperature:T=1,T=2",
                  "temperature,2"]
GOOD_BEHAVIOURS = ["pi", "temperature:0.7+top_p:0.9", "top_k:2", "min_p:0.1", "logit_noise:0.5,3",
                   "precision:bf16", "stale:2,lr=0.3", "mix:0.3,(temperature:2+top_p:0.9),logit_noise:0.1",
                   "temp:1.3", "(stale:1)+temperature:2", "file:case.json"]
BAD_LOSSES = ["nosuch", "tis:-1", "tis:2,level=word", "tis:2,cap=3", "mis:2,1", "mis:0.5,2,reweight=maybe",
              "ppo_clip:-1", "ppo_clip:0.2,dual_clip=0.5", "ppo_clip:0.2,old=nu", "gspo:0.1,clip_high=-2",
              "cispo:x", "pg:3", "pg:filter_degenerate_groups=sometimes", "is_seq:1,2"]
GOOD_LOSSES = ["pg", "is_token", "is_seq", "tis:2", "tis:2,level=geo", "mis:0.5,2,reweight=false",
               "ppo_clip:0.2,clip_high=0.28,dual_clip=3", "gspo", "gspo:3e-4", "cispo:0.2,old=pi",
               "pg:filter_degenerate_groups=true"]


@pytest.mark.parametrize("spec", BAD_BEHAVIOURS)
def test_a_bad_behaviour_is_refused_in_the_engines_words(spec):
    from tpg.offpolicy.behaviour import parse_chain

    with pytest.raises(ValueError) as light:
        specs.parse_behaviour(spec)
    with pytest.raises(ValueError) as real:
        parse_chain(spec)
    assert str(light.value) == str(real.value)


@pytest.mark.parametrize("spec", GOOD_BEHAVIOURS)
def test_a_good_behaviour_parses_to_the_engines_stage(spec):
    from tpg.offpolicy.behaviour import parse_chain

    node, stage = specs.parse_behaviour(spec), parse_chain(spec)
    assert node.spec == stage.spec and node.source == stage.source
    assert specs.parse_behaviour(node.spec).spec == node.spec  # the canonical spec parses to itself


@pytest.mark.parametrize("spec", BAD_LOSSES)
def test_a_bad_loss_is_refused_in_the_engines_words(spec):
    from tpg.offpolicy.losses import get_loss

    with pytest.raises(ValueError) as light:
        specs.check_loss_spec(spec)
    with pytest.raises(ValueError) as real:
        get_loss(spec)
    assert str(light.value) == str(real.value)


@pytest.mark.parametrize("spec", GOOD_LOSSES)
def test_a_good_loss_is_accepted(spec):
    from tpg.offpolicy.losses import get_loss

    specs.check_loss_spec(spec)
    assert get_loss(get_loss(spec).spec).spec == get_loss(spec).spec


def test_a_missing_loss_plugin_file_in_the_engines_words(tmp_path, monkeypatch):
    from tpg.offpolicy.losses import get_loss

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as light:
        specs.check_loss_spec("nowhere.py:loss:clip_ratio=0.2")
    with pytest.raises(ValueError) as real:
        get_loss("nowhere.py:loss:clip_ratio=0.2")
    assert str(light.value) == str(real.value)
    specs.check_loss_spec(f"{ROOT}/examples/plugins/ppo_tis_loss_verl.py:compute_policy_loss:clip_ratio=0.2")


def test_the_classes_declarations_are_the_grammars():
    from tpg.offpolicy.behaviour import STAGES
    from tpg.offpolicy.losses import LOSSES

    assert list(STAGES) == list(specs.STAGE_DECLS) and list(LOSSES) == list(specs.LOSS_DECLS)
    for name, cls in STAGES.items():
        d = specs.STAGE_DECLS[name]
        assert (cls.positional, cls.OPTIONS, cls.help) == (d.positional, d.options, d.help)
        if name not in ("mix",):  # mix's source is a property of its components
            assert cls.source is d.source
    for name, cls in LOSSES.items():
        d = specs.LOSS_DECLS[name]
        assert (cls.positional, cls.OPTIONS, cls.help) == (d.positional, d.options, d.help)


def test_the_grammar_imports_no_torch():
    code = ("import sys; from tpg.offpolicy.specs import parse_behaviour, check_loss_spec; "
            "parse_behaviour('temperature:0.7+top_p:0.9'); check_loss_spec('ppo_clip:0.2'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_a_users_own_stage_object_keeps_its_own_spec():
    """Stage objects (not specs) are accepted by resolve_behaviour: a user's subclass with its own name and
    options writes its spec from its own declarations, not the catalog's."""
    from tpg.estimators.options import Option
    from tpg.offpolicy.behaviour import Stage, Temperature

    class Sharpen(Stage):
        name = "sharpen"
        positional = ("k",)
        OPTIONS = {"k": Option(2.0, "float", "factor", low=0.0)}

        def apply(self, z_nv, env):
            return z_nv * self.values["k"]

    class Tagged(Temperature):
        OPTIONS = {**Temperature.OPTIONS, "extra": Option(0, "int", "a user's tag")}

    assert Sharpen({"k": 3.0}).spec == "sharpen:3" and Tagged({"T": 2.0, "extra": 3}).spec == "temperature:2,extra=3"
