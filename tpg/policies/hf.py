"""A Hugging Face causal language model as a token-MDP policy over ``K`` allowed tokens.

The restricted policy reads the prompt ``x`` (token ids of the LM) and the response so far, and
puts the LM's softmax on the allowed tokens only::

    pi(k | s) = exp(z_k(s)) / sum_j exp(z_j(s)),     z_k(s) = h_L(s) . W[allowed[k]] (+ b[allowed[k]])

with ``h_L(s)`` the final hidden state (after the final norm) at the last position of ``s`` and
``W`` the LM head; only the ``K`` head rows are computed. The policy's vocabulary is the ``K``
allowed tokens: index ``k`` of the policy is LM token id ``allowed[k]``; EOS, when given, is one
of them.

Exact engine view (:meth:`HFRestrictedPolicy.node_logits`): every distinct prefix is run once.

* ``levels``: the prompts are run once; then level ``d = 1 .. H-1`` of the tree runs one token per
  non-terminal node, attending to its parent's key/value cache (gathered by parent index; each
  level in chunks of ``max_batch`` rows).
* ``packed``: prompt and *all* non-terminal nodes of a prompt's tree in one sequence, with a tree
  attention mask (a node sees the prompt and its ancestors) and position ``len(x) - 1 + depth``
  (``T = Lp + N_nt / P`` tokens; used while ``T <= packed_max_len``).

Both give the logits of full-sequence forwards up to float rounding (``tpg.exact.hf`` checks
this). Sampler view: :meth:`step_log_probs` (the ``tpg.rollouts`` sampler; a cached incremental
path) and :meth:`sample` (batched restricted sampling and continuations on the model's device,
with a static key/value cache and, on CUDA, a captured CUDA graph of the decode step).

Precision: float64 on CPU (the exact checks; the attention is then ``tpg_math``, a plain
float64 attention that also supports forward-mode autodiff, and float32 up-casts inside
RMSNorm layers are removed), bfloat16 or float32 on a GPU with the restricted head and the
log-softmax accumulated in float32.

Caches are a duck-typed object with the ``update(keys, values, layer_idx, ...)`` method that
Hugging Face attention layers call on a ``DynamicCache``; every forward passes an explicit 4-D
additive attention mask and explicit position ids, so no cache or mask internals of a
particular ``transformers`` version are relied on.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import os
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from .base import Policy

#: Shorthand model names (random init from a config): ``NAME`` or ``NAME:key=value,...``.
SHORTHANDS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                               bos_token_id=0, eos_token_id=1, initializer_range=0.1)),
    "llama-tiny": ("llama", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=64, vocab_size=64, max_position_embeddings=64, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.1)),
    "gpt2-124m": ("gpt2", dict()),
    "gpt2-1.5b": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25)),
}
from .defaults import TRAINABLE_HELP, TREE_MODES  # noqa: E402  (torch-free home: tpg verify --help)
MATH_ATTENTION = "tpg_math"
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config attributes under which some models transform the head's logits (soft-capping, scaling):
# the restricted head then falls back to the model's own full-vocabulary logits
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - transformers is installed in the dev venv
        raise ValueError("the Hugging Face policy needs the transformers package (pip install transformers)") from exc
    return transformers


def parse_dtype(dtype) -> torch.dtype | None:
    """``torch.dtype`` from a dtype or its name (``float64``, ``float32``, ``bfloat16``, ``float16``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[str(dtype)]


# ------------------------------------------------------------------------------ attention
def _math_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Plain attention ``softmax(q k^T * scaling + mask) v`` in the inputs' dtype (float32 softmax for
    16-bit inputs): exact float64 on CPU, and every op has forward-mode autodiff (``sdpa`` does not).

    ``query [B, Hq, L, D]``, ``key``/``value [B, Hkv, S, D]`` (grouped-query heads are repeated);
    returns ``([B, L, Hq, D], None)`` as Hugging Face attention functions do."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if scores.dtype in (torch.float16, torch.bfloat16):
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


_REGISTERED = False


def register_math_attention() -> bool:
    """Register ``tpg_math`` with ``transformers``' attention (and mask) interfaces; False if unsupported."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers import AttentionInterface
        AttentionInterface.register(MATH_ATTENTION, _math_attention)
        try:
            from transformers.masking_utils import AttentionMaskInterface, eager_mask
            AttentionMaskInterface.register(MATH_ATTENTION, eager_mask)
        except ImportError:  # older versions build masks without an interface
            pass
    except ImportError:
        return False
    _REGISTERED = True
    return True


def _rmsnorm_float64(self, hidden_states):
    # the Llama-family RMSNorm formula without its float32 up-cast (so float64 stays float64)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _remove_float32_upcasts(model) -> int:
    """Rebind the forward of Llama-family RMSNorm layers (``weight * x / rms(x)`` computed after a
    float32 up-cast) to the same formula in the input's dtype; returns how many were rebound.

    In float64 the up-cast would make gradients float32-accurate (1e-7), and the exact checks
    compare them at 1e-10. Only norms whose source has the Llama form are touched."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
            continue
        try:
            src = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if "to(torch.float32)" in src and "self.weight * hidden_states.to(input_dtype)" in src:
            module.forward = types.MethodType(_rmsnorm_float64, module)
            count += 1
    return count


# ------------------------------------------------------------------------------ caches
class KVCache:
    """Growing per-layer keys and values ``[B, heads, S, d_head]`` (the ``cache.update`` protocol of
    Hugging Face attention layers: append the new positions, return the whole sequence)."""

    def __init__(self, layers: dict | None = None):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {} if layers is None else layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        old = self.layers.get(layer_idx)
        if old is not None:
            key_states = torch.cat([old[0], key_states], dim=-2)
            value_states = torch.cat([old[1], value_states], dim=-2)
        self.layers[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx][0].shape[-2]) if layer_idx in self.layers else 0

    def select(self, index: torch.Tensor) -> "KVCache":
        """The cache of rows ``index`` (a new cache: the original is untouched)."""
        return KVCache({i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.layers.items()})

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        if len(caches) == 1:
            return caches[0]
        return KVCache({i: (torch.cat([c.layers[i][0] for c in caches]), torch.cat([c.layers[i][1] for c in caches]))
                        for i in caches[0].layers})


class StaticKVCache:
    """Preallocated keys and values ``[B, heads, max_len, d_head]`` written at a device-side position
    counter ``pos`` (no allocation and no host synchronisation per step, so a decode step can be
    captured in a CUDA graph). The attention reads all ``max_len`` positions; the caller's
    attention mask hides the ones not yet written."""

    def __init__(self, layers: dict, pos: torch.Tensor):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = layers
        self.pos = pos
        self.max_len = int(next(iter(layers.values()))[0].shape[2])

    @classmethod
    def allocate(cls, like: KVCache, batch: int, max_len: int) -> "StaticKVCache":
        """Zero buffers for ``batch`` rows shaped (heads, head size, dtype, device) like ``like``'s layers."""
        layers = {i: (k.new_zeros(batch, k.shape[1], max_len, k.shape[3]),
                      v.new_zeros(batch, v.shape[1], max_len, v.shape[3])) for i, (k, v) in like.layers.items()}
        device = next(iter(layers.values()))[0].device
        return cls(layers, torch.zeros((), dtype=torch.long, device=device))

    def load_(self, source: KVCache, rows: torch.Tensor) -> None:
        """Rows ``rows`` of ``source`` into the first positions; the counter after them."""
        L = source.get_seq_length()
        for i, (k, v) in source.layers.items():
            bk, bv = self.layers[i]
            bk[:, :, :L].copy_(k.index_select(0, rows))
            bv[:, :, :L].copy_(v.index_select(0, rows))
        self.pos.fill_(L)

    def load_repeated_(self, other: "StaticKVCache", repeats: int) -> None:
        """Every row of ``other`` ``repeats`` times (the continuations of one prefix branch)."""
        for i, (k, v) in other.layers.items():
            bk, bv = self.layers[i]
            bk.copy_(k.repeat_interleave(repeats, 0))
            bv.copy_(v.repeat_interleave(repeats, 0))
        self.pos.copy_(other.pos)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        bk, bv = self.layers[layer_idx]
        idx = self.pos + torch.arange(key_states.shape[-2], device=bk.device)
        bk.index_copy_(2, idx, key_states)
        bv.index_copy_(2, idx, value_states)
        return bk, bv

    def get_seq_length(self, layer_idx: int = 0):
        return self.pos


class _DecodeState:
    """The persistent buffers of a decode run over ``n`` rows: the static cache, the additive mask,
    the ids and positions of the next token, and the step function (captured as a CUDA graph on
    CUDA). Kept between runs, so a graph is captured once per batch size and length and replayed
    afterwards; the buffers are refilled in place."""

    def __init__(self, policy: "HFRestrictedPolicy", like: KVCache, n: int, max_len: int, use_graph: bool):
        dev = policy.device
        self.policy = policy
        self.cache = StaticKVCache.allocate(like, n, max_len)
        self.mask = torch.full((n, 1, 1, max_len), policy._mask_value(), dtype=policy.dtype, device=dev)
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.use_graph = use_graph
        self.info = {"cuda_graph": False, "static_cache": True,
                     "reason": None if use_graph else ("not on CUDA" if dev.type != "cuda" else "disabled")}
        self._step = None

    def load_prompts(self, cache: KVCache, rows: torch.Tensor) -> None:
        pol = self.policy
        W = pol.prompt_width
        self.cache.load_(cache, rows)
        plen = pol.prompt_len.to(pol.device).index_select(0, rows)
        real = torch.arange(W, device=pol.device).unsqueeze(0) >= (W - plen).unsqueeze(1)
        self.mask.fill_(pol._mask_value())
        self.mask[:, 0, 0, :W].masked_fill_(real, 0.0)
        self.pos.copy_((plen - 1).unsqueeze(1))

    def load_branch(self, other: "_DecodeState", repeats: int) -> None:
        self.cache.load_repeated_(other.cache, repeats)
        for name in ("mask", "ids", "pos"):
            getattr(self, name).copy_(getattr(other, name).repeat_interleave(repeats, 0))

    def _eager_step(self):
        """Unmask the position being written, run the new token, advance the counter; ``[n, K]`` logits."""
        self.mask.index_fill_(3, self.cache.pos.view(1), 0.0)
        h = self.policy.decoder(self.ids, self.pos, self.mask, self.cache)
        self.cache.pos.add_(1)
        return self.policy.head(h[:, -1])

    def step(self) -> torch.Tensor:
        if self._step is None:
            self._step = self._eager_step
            if self.use_graph:  # pragma: no cover - needs a GPU
                try:
                    self._step = _capture_cuda_graph(self._eager_step, self.cache, self.mask)
                    self.info.update(cuda_graph=True, reason=None)
                except Exception as exc:  # a model whose forward cannot be captured runs eagerly
                    self.info["reason"] = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
        return self._step()


# ------------------------------------------------------------------------------ loading
def causal_lm_config(name: str):
    """A ``transformers`` config from a shorthand ``NAME[:key=value,...]`` (see :data:`SHORTHANDS`)."""
    transformers = _require_transformers()
    base, _, opts = name.partition(":")
    if base not in SHORTHANDS:
        raise ValueError(f"unknown model shorthand {base!r}; known: {', '.join(SHORTHANDS)} (or a local path)")
    family, kwargs = SHORTHANDS[base]
    kwargs = dict(kwargs)
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"model option {item!r} must be key=value")
        try:
            kwargs[key.strip()] = int(val)
        except ValueError:
            try:
                kwargs[key.strip()] = float(val)
            except ValueError:
                kwargs[key.strip()] = {"true": True, "false": False}.get(val.strip().lower(), val.strip())
    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[family]
    return cls(**kwargs)


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.safetensors.index.json"))


def load_causal_lm(model, dtype=None, device=None, seed: int = 0, attn_implementation: str | None = None):
    """A causal LM from: a model instance (used as is), a ``transformers`` config (random init from
    ``seed``), a shorthand ``NAME[:key=value,...]`` (random init), a local directory with weights
    (``from_pretrained``), or ``config:PATH`` / a directory holding only ``config.json`` (random init).
    Nothing is downloaded (``local_files_only``)."""
    transformers = _require_transformers()
    dtype = parse_dtype(dtype)
    if isinstance(model, nn.Module):
        return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        path = Path(text[len("config:"):] if text.startswith("config:") else text)
        if text.startswith("config:") or (path.exists() and not (path.is_dir() and _has_weights(path))):
            if not path.exists():
                raise ValueError(f"config path {str(path)!r} does not exist")
            model = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        elif path.exists():
            try:
                lm = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                                       **kw)
            except TypeError:  # transformers < 4.56 spells it torch_dtype
                lm = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                                       torch_dtype=dtype, **kw)
            return lm.to(device) if device is not None else lm
        else:
            model = causal_lm_config(text)
    if not isinstance(model, transformers.PretrainedConfig):
        raise ValueError(f"model must be a causal LM, a transformers config, a shorthand or a local path; "
                         f"got {type(model).__name__}")
    # initialised in float32 whatever the dtype, then cast: the same seed gives the same model in
    # float64, float32 and bfloat16 (up to their rounding)
    devices = [torch.device(device).index or 0] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:
            try:
                lm = transformers.AutoModelForCausalLM.from_config(model, dtype=torch.float32, **kw)
            except TypeError:
                lm = transformers.AutoModelForCausalLM.from_config(model, torch_dtype=torch.float32, **kw)
    if dtype is not None:
        lm = lm.to(dtype)
    return lm


def load_tokenizer(tokenizer, model_source=None):
    """A tokenizer instance, or ``AutoTokenizer.from_pretrained`` of a local path (given, or the model's
    directory); ``None`` when there is none."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    transformers = _require_transformers()
    src = tokenizer if tokenizer is not None else model_source
    if src is None or not isinstance(src, (str, os.PathLike)) or not Path(str(src)).is_dir():
        if tokenizer is not None:
            raise ValueError(f"tokenizer path {str(tokenizer)!r} is not a local directory")
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, TypeError):
        if tokenizer is not None:
            raise ValueError(f"cannot load a tokenizer from {str(src)!r}") from None
        return None


def parse_trainable(spec: str) -> tuple[str, int]:
    """``(kind, n)`` from ``all`` | ``none`` | ``head`` | ``last:N`` | ``lora:R``."""
    text = str(spec).strip().lower()
    kind, _, num = text.partition(":")
    if kind in ("all", "none", "head") and not num:
        return kind, 0
    if kind in ("last", "lora"):
        try:
            n = int(num)
        except ValueError:
            n = 0
        if n >= 1:
            return kind, n
    raise ValueError(f"trainable must be {TRAINABLE_HELP}; got {spec!r}")


def decoder_blocks(model) -> nn.ModuleList:
    """The transformer blocks of a causal LM (the largest ``ModuleList`` of its base model)."""
    base = getattr(model, "base_model", model)
    best = None
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def apply_trainable(model, spec: str, seed: int = 0):
    """Set ``requires_grad`` per ``spec`` (see :data:`TRAINABLE_HELP`); returns the model to use
    (LoRA injects adapter layers into it). ``ValueError`` when nothing would be trainable.

    ``lora:R`` (peft's LoRA): every linear layer ``W`` of the blocks (not the LM head) computes
    ``W x + (alpha / R) B A x`` with ``A [R, d_in]`` Kaiming-uniform from ``seed``, ``B [d_out, R] = 0``
    and ``alpha = 2R``, no dropout; only the ``A`` and ``B`` of every adapter are trainable. With
    ``B = 0`` the model computes exactly the base model's logits, and ``dJ/dA = 0`` until ``B`` moves."""
    kind, n = parse_trainable(spec)
    if kind == "lora":
        try:
            import peft
        except ImportError:
            raise ValueError("trainable='lora:R' needs the peft package, which is not installed "
                             "(pip install 'tpg[peft]'), or choose all | last:N | head") from None
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
                         - {"lm_head", "score"})
        cfg = peft.LoraConfig(r=n, lora_alpha=2 * n, lora_dropout=0.0, target_modules=targets, bias="none",
                              fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()))
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            torch.manual_seed(int(seed))  # the adapters' A: the same seed gives the same policy
            # peft asks transformers a deprecated question; nothing the user can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, cfg).get_base_model()
    for p in model.parameters():
        p.requires_grad_(kind == "all")
    if kind == "head":
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
        for p in head.parameters():
            p.requires_grad_(True)
    elif kind == "last":
        blocks = decoder_blocks(model)
        if n > len(blocks):
            raise ValueError(f"trainable=last:{n} but the model has {len(blocks)} blocks")
        for block in list(blocks)[len(blocks) - n:]:
            for p in block.parameters():
                p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------ the tree, packed
def packed_layout(tree, prompt_len_p: torch.Tensor, width: int):
    """The packed-tree sequences: one per prompt, ``width`` prompt slots (left-padded) followed by the
    prompt's ``M`` non-root non-terminal nodes in increasing index.

    Returns ``(nt_pm [P, M], tok_pm [P, M], pos_pt [P, T], mask_ptt [P, T, T] bool)`` with
    ``T = width + M``, or ``None`` when the prompts' trees differ in size. A node at depth ``d``
    sits at position ``len(x) - 1 + d`` and sees the prompt's real tokens, itself and its
    ancestors; a padding slot sees only itself."""
    P = tree.num_prompts
    nodes = tree.nt_node_k
    prompt_k = tree.prompt_n[nodes]
    prompt_k[:P] = -1  # roots are the last prompt slot, not a node of the sequence
    counts = torch.bincount(prompt_k[P:], minlength=P)
    if bool((counts != counts[0]).any()):
        return None
    M = int(counts[0]) if P else 0
    order = torch.argsort(prompt_k[P:] * (tree.num_nonterminal + 1) + torch.arange(P, tree.num_nonterminal),
                          stable=True)
    nt_pm = (order + P).view(P, M)
    local = torch.full((tree.num_nonterminal,), -1, dtype=torch.long)
    local[nt_pm.reshape(-1)] = torch.arange(M).repeat(P)
    parent_nt = tree.nt_index_n[tree.parent_n[nodes[nt_pm]]]
    parent_local = local[parent_nt]  # -1 for children of the root
    depth_pm = tree.depth_n[nodes[nt_pm]]
    anc = torch.zeros(P, M, M, dtype=torch.bool)
    rows = torch.arange(P).unsqueeze(1)
    for d in range(1, tree.horizon):
        at = depth_pm[0] == d  # the same shape for every prompt
        if not bool(at.any()):
            break
        idx = torch.nonzero(at).flatten()
        par = parent_local[:, idx]
        if d > 1:
            anc[:, idx] = anc[rows, par]
        anc[:, idx, idx] = True
    T = width + M
    slot = torch.arange(width)
    pad_p = width - prompt_len_p
    real = slot.unsqueeze(0) >= pad_p.unsqueeze(1)  # [P, width]
    mask = torch.zeros(P, T, T, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask[:, :width, :width] = causal & real.unsqueeze(1)
    mask[:, torch.arange(width), torch.arange(width)] = True
    mask[:, width:, :width] = real.unsqueeze(1)
    mask[:, width:, width:] = anc
    pos = torch.empty(P, T, dtype=torch.long)
    pos[:, :width] = (slot.unsqueeze(0) - pad_p.unsqueeze(1)).clamp(min=0)
    pos[:, width:] = prompt_len_p.unsqueeze(1) - 1 + depth_pm
    tok = tree.token_n[nodes[nt_pm]]
    return nt_pm, tok, pos, mask


# ------------------------------------------------------------------------------ the policy
class HFRestrictedPolicy(Policy):
    """A Hugging Face causal LM restricted to ``K`` allowed tokens (see the module docstring).

    Args:
        model: a causal LM instance, a ``transformers`` config, a shorthand (``gpt2-tiny``,
            ``llama-tiny``, ``gpt2-124m``, ``gpt2-1.5b``, with ``:key=value`` config overrides), or a
            local checkpoint directory (``from_pretrained``; ``config:PATH`` for a random init).
        allowed_tokens: the ``K >= 2`` LM token ids (or single-token strings, with a tokenizer).
        prompts: text (a string or a list of strings, needs a tokenizer), token ids (a list of ids,
            a list of id lists of any lengths, or an int array ``[P, Lp]``).
        horizon: ``H``, the maximum response length.
        tokenizer: a tokenizer or a local path (default: the model's directory, if it has one).
        eos_token: LM token id (or string) of EOS; it must be allowed. ``None``: no EOS.
        trainable: :data:`TRAINABLE_HELP`.
        dtype: parameter dtype (default float64 on CPU, bfloat16 on CUDA; a model instance is cast).
        device: where the model runs (default: a model instance's device, else CPU).
        seed: seed of a random initialisation.
        tree_mode: ``auto`` (packed when a prompt's tree has at most ``packed_max_len`` tokens),
            ``packed`` or ``levels``.
        max_batch: rows (tokens) per forward call in :meth:`node_logits`.
        attn_implementation: the model's attention (default ``tpg_math`` in float64, else ``sdpa``).
        out_device, out_dtype: where and in which dtype :meth:`node_logits` returns (CPU float64, the
            exact engine's).
        incremental_sampling: let :meth:`step_log_probs` keep a key/value cache between calls.
    """

    needs_tree = False

    def __init__(self, model, allowed_tokens, prompts, horizon: int, *, tokenizer=None, eos_token=None,
                 trainable: str = "all", dtype=None, device=None, seed: int = 0, tree_mode: str = "auto",
                 max_batch: int = 8192, packed_max_len: int = 2048, attn_implementation: str | None = None,
                 out_device="cpu", out_dtype=torch.float64, incremental_sampling: bool = True):
        transformers = _require_transformers()
        if device is None and isinstance(model, nn.Module):
            device = next(model.parameters()).device
        device = torch.device("cpu" if device is None else device)
        dtype = parse_dtype(dtype)
        if dtype is None:
            dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
        if tree_mode not in TREE_MODES:
            raise ValueError(f"tree_mode must be one of {', '.join(TREE_MODES)}; got {tree_mode!r}")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        source = model if isinstance(model, (str, os.PathLike)) else None
        if attn_implementation is None and dtype == torch.float64 and register_math_attention():
            attn_implementation = MATH_ATTENTION
        elif attn_implementation == MATH_ATTENTION and not register_math_attention():
            raise ValueError("this transformers version cannot register the tpg_math attention")
        lm = load_causal_lm(model, dtype=dtype, device=device, seed=seed,
                            attn_implementation=None if isinstance(model, nn.Module) else attn_implementation)
        if attn_implementation is not None:
            lm.config._attn_implementation = attn_implementation
        lm = lm.to(device=device, dtype=dtype)
        if dtype == torch.float64:
            _remove_float32_upcasts(lm)
        lm.eval()  # no dropout: the policy is a fixed function of its parameters
        self_tok = load_tokenizer(tokenizer, source)
        super().__init__(0)  # the vocabulary size is set below, once the allowed tokens are known
        lm = apply_trainable(lm, trainable, seed=seed).to(device=device, dtype=dtype)  # LoRA adapters too
        self.model = lm
        self.tokenizer = self_tok
        self.trainable = str(trainable)
        self.model_name = str(model) if source is not None else (
            type(model).__name__ if not isinstance(model, transformers.PretrainedConfig)
            else f"{model.model_type}-config")
        self.device = device
        self.dtype = dtype
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.out_device = torch.device(out_device) if out_device is not None else device
        self.out_dtype = out_dtype
        self.horizon = horizon
        self.tree_mode = tree_mode
        self.max_batch = int(max_batch)
        self.packed_max_len = int(packed_max_len)
        self.incremental_sampling = bool(incremental_sampling)
        lm_vocab = int(getattr(lm.config, "vocab_size", 0) or lm.get_output_embeddings().weight.shape[0])
        allowed = self._token_ids(allowed_tokens, "allowed_tokens")
        if len(allowed) < 2 or len(set(allowed)) != len(allowed):
            raise ValueError(f"allowed_tokens must be >= 2 distinct token ids, got {allowed}")
        if min(allowed) < 0 or max(allowed) >= lm_vocab:
            raise ValueError(f"allowed token ids must be in [0, {lm_vocab - 1}], got {allowed}")
        self.vocab_size = len(allowed)
        self.allowed_tokens = tuple(allowed)
        self.eos_index = None
        if eos_token is not None:
            eos_id = self._token_ids([eos_token], "eos_token")[0]
            if eos_id not in allowed:
                raise ValueError(f"eos_token {eos_id} is not among the allowed tokens {allowed}")
            self.eos_index = allowed.index(eos_id)
        self.prompt_ids = self._parse_prompts(prompts, lm_vocab)
        self.num_prompts = len(self.prompt_ids)
        self.prompt_width = max(len(p) for p in self.prompt_ids)
        max_pos = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        if max_pos is not None and self.prompt_width + horizon > int(max_pos):
            raise ValueError(f"prompt ({self.prompt_width} tokens) + horizon {horizon} exceeds the model's "
                             f"{max_pos} positions")
        width = self.prompt_width
        padded = torch.zeros(self.num_prompts, width, dtype=torch.long)
        for i, ids in enumerate(self.prompt_ids):
            padded[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        # index tensors stay on the CPU (layouts are built there); the model's inputs move to the device
        self.prompt_tokens = padded
        self.prompt_len = torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long)
        self.allowed_ids = torch.tensor(allowed, dtype=torch.long)
        self._allowed_dev = self.allowed_ids.to(device)
        self.restricted_head = not any(getattr(lm.config, a, None) not in (None, 0, 1, 1.0) for a in _LOGIT_TRANSFORMS)
        self._cache_kw = self._cache_keyword()
        self._sampling_state: dict | None = None
        self._packed: dict = {}
        self._decode_states: collections.OrderedDict = collections.OrderedDict()
        self.last_sample_info: dict = {}

    # -------------------------------------------------------------- construction helpers
    def _token_ids(self, items, what: str) -> list[int]:
        out = []
        for item in (items if isinstance(items, (list, tuple)) else [items]):
            if isinstance(item, (int,)) and not isinstance(item, bool):
                out.append(int(item))
            elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
                out.append(int(item))
            elif isinstance(item, str):
                if self.tokenizer is None:
                    raise ValueError(f"{what}: {item!r} is text; give token ids or a tokenizer")
                ids = self.tokenizer.encode(item, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(f"{what}: {item!r} is {len(ids)} tokens, not one")
                out.append(int(ids[0]))
            else:
                raise ValueError(f"{what} must be token ids (or strings with a tokenizer), got {item!r}")
        return out

    def _parse_prompts(self, prompts, lm_vocab: int) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError(f"prompts must be text, a list of texts or token id lists; got {prompts!r}")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            prompts = [list(prompts)]
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (tokenizer=..., or a model directory with one)")
                ids = list(self.tokenizer.encode(p, add_special_tokens=False))
            elif isinstance(p, torch.Tensor):
                ids = [int(t) for t in p.flatten().tolist()]
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = [int(t) for t in p]
            else:
                raise ValueError(f"prompt {i} must be text or a list of token ids, got {p!r}")
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if min(ids) < 0 or max(ids) >= lm_vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {lm_vocab - 1}]")
            out.append(ids)
        return out

    def _cache_keyword(self) -> str:
        params = inspect.signature(self.model.base_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def lm(self):
        """The wrapped causal LM."""
        return self.model

    def __deepcopy__(self, memo):
        # a copy (e.g. the verifier's reference policy) gets fresh sampling caches: decode buffers
        # and captured CUDA graphs belong to the original's tensors
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_decode_states":
                value = collections.OrderedDict()
            elif key == "_sampling_state":
                value = None
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def train(self, mode: bool = True):
        # the wrapped LM stays in eval mode (no dropout): policy-gradient checks need a fixed policy
        super().train(mode)
        self.model.eval()
        return self

    def describe(self) -> str:
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return (f"{self.model_name}: K={self.vocab_size} allowed {list(self.allowed_tokens)}, "
                f"prompts={self.num_prompts}"
                f" (<= {self.prompt_width} tokens), H={self.horizon}, eos={self.eos_index}, dtype="
                f"{str(self.dtype).replace('torch.', '')}, trainable={self.trainable} ({n_train:,} parameters)")

    def extra_repr(self) -> str:
        return self.describe()

    # -------------------------------------------------------------- the model
    def _mask_value(self) -> float:
        return torch.finfo(self.dtype).min

    def _additive(self, allow: torch.Tensor) -> torch.Tensor:
        """A 4-D additive mask ``[B, 1, L, S]`` (0 where allowed) from a bool ``[B, L, S]``."""
        m = torch.zeros(allow.shape, dtype=self.dtype, device=self.device)
        return m.masked_fill_(~allow.to(self.device), self._mask_value()).unsqueeze(1)

    def decoder(self, ids_bl: torch.Tensor, pos_bl: torch.Tensor, mask_b1ls: torch.Tensor, cache=None) -> torch.Tensor:
        """Final hidden states ``[B, L, d]`` of ``L`` new tokens at positions ``pos`` after ``cache``.
        ``mask`` is an additive 4-D mask over the cache's positions and the new ones."""
        kw = {"input_ids": ids_bl.to(self.device), "position_ids": pos_bl.to(self.device),
              "attention_mask": mask_b1ls, "use_cache": cache is not None}
        if cache is not None:
            kw[self._cache_kw] = cache
        out = self.model.base_model(**kw)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def _full_logits(self, ids_bl, pos_bl, mask_b1ls, cache=None) -> torch.Tensor:
        kw = {"input_ids": ids_bl.to(self.device), "position_ids": pos_bl.to(self.device),
              "attention_mask": mask_b1ls, "use_cache": cache is not None}
        if cache is not None:
            kw[self._cache_kw] = cache
        return self.model(**kw).logits

    def head(self, hidden: torch.Tensor, full_norm: bool = False):
        """Restricted logits ``z [..., K]`` in the compute dtype (float32, or float64); with
        ``full_norm`` also ``logsumexp`` over the whole LM vocabulary ``[...]``."""
        emb = self.model.get_output_embeddings()
        W = emb.weight
        allowed = self._allowed_dev if self._allowed_dev.device == W.device else self.allowed_ids.to(W.device)
        h = hidden.to(self.compute_dtype)
        z = h @ W.index_select(0, allowed).to(self.compute_dtype).T
        bias = getattr(emb, "bias", None)
        if bias is not None:
            z = z + bias.index_select(0, allowed).to(self.compute_dtype)
        if not full_norm:
            return z
        full = h @ W.to(self.compute_dtype).T
        if bias is not None:
            full = full + bias.to(self.compute_dtype)
        return z, torch.logsumexp(full, dim=-1)

    def _logits(self, ids_bl, pos_bl, mask_b1ls, cache=None, rows=None, full_norm: bool = False,
                full_head: bool = False):
        """Restricted logits ``[n, K]`` (compute dtype) at ``rows`` (flat indices into ``B * L``; default
        every position), optionally with the full-vocabulary log-normaliser. ``full_head``: take them
        from the model's own full-vocabulary logits (what a plain ``model(...)`` call computes)."""
        if self.restricted_head and not full_head:
            h = self.decoder(ids_bl, pos_bl, mask_b1ls, cache)
            h = h.reshape(-1, h.shape[-1])
            if rows is not None:
                h = h.index_select(0, rows.to(h.device))
            return self.head(h, full_norm)
        logits = self._full_logits(ids_bl, pos_bl, mask_b1ls, cache)
        logits = logits.reshape(-1, logits.shape[-1])
        if rows is not None:
            logits = logits.index_select(0, rows.to(logits.device))
        logits = logits.to(self.compute_dtype)
        z = logits.index_select(1, self.allowed_ids.to(logits.device))
        return (z, torch.logsumexp(logits, dim=-1)) if full_norm else z

    # -------------------------------------------------------------- full sequences (no cache)
    def sequence_logits(self, prompt_b: torch.Tensor, tokens_bt: torch.Tensor, full_norm: bool = False,
                        full_head: bool = False):
        """Restricted logits ``[B, T + 1, K]`` of the states after ``0 .. T`` response tokens, one full
        forward of ``prompt + tokens`` per row (no cache, no sharing); differentiable. ``full_head``:
        through the model's full-vocabulary head, as a plain ``model(...)`` call."""
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long)
        tokens_bt = torch.as_tensor(tokens_bt, dtype=torch.long)
        B, T = tokens_bt.shape
        W = self.prompt_width
        ids = torch.cat([self.prompt_tokens[prompt_b], self.allowed_ids[tokens_bt.clamp(0, self.vocab_size - 1)]], 1)
        plen = self.prompt_len[prompt_b]
        pad = (W - plen).unsqueeze(1)
        slot = torch.arange(W + T)
        real = slot.unsqueeze(0) >= pad
        allow = torch.ones(W + T, W + T, dtype=torch.bool).tril().unsqueeze(0) & real.unsqueeze(1)
        allow = allow | torch.eye(W + T, dtype=torch.bool).unsqueeze(0)
        pos = (slot.unsqueeze(0) - pad).clamp(min=0)
        rows = (torch.arange(B).unsqueeze(1) * (W + T) + torch.arange(W - 1, W + T)).reshape(-1)
        out = self._logits(ids, pos, self._additive(allow), rows=rows, full_norm=full_norm, full_head=full_head)
        if full_norm:
            return out[0].view(B, T + 1, -1), out[1].view(B, T + 1)
        return out.view(B, T + 1, -1)

    def token_log_probs(self, prompt_b, tokens_bt, mask_bt=None, full_head: bool = False) -> torch.Tensor:
        """``log pi(w_t | s_t)`` of each response token ``[B, T]`` (compute dtype, differentiable; 0
        where ``mask_bt`` is False); one full forward per row."""
        tokens_bt = torch.as_tensor(tokens_bt, dtype=torch.long)
        T = tokens_bt.shape[1]
        logp = torch.log_softmax(self.sequence_logits(prompt_b, tokens_bt[:, :T - 1], full_head=full_head), dim=-1)
        out = logp.gather(2, tokens_bt.to(logp.device).clamp(0, self.vocab_size - 1).unsqueeze(2)).squeeze(2)
        if mask_bt is not None:
            out = torch.where(torch.as_tensor(mask_bt).to(out.device), out, torch.zeros((), dtype=out.dtype,
                                                                                       device=out.device))
        return out

    # -------------------------------------------------------------- the exact engine's view
    def check_tree(self, tree) -> None:
        if (tree.num_prompts != self.num_prompts or tree.vocab_size != self.vocab_size
                or tree.horizon > self.horizon or tree.eos_token != self.eos_index):
            raise ValueError(f"HF policy (prompts={self.num_prompts}, K={self.vocab_size}, horizon={self.horizon}, "
                             f"eos={self.eos_index}) does not fit the tree (prompts={tree.num_prompts}, "
                             f"vocab={tree.vocab_size}, horizon={tree.horizon}, eos={tree.eos_token})")

    def resolved_tree_mode(self, tree) -> str:
        """``packed`` or ``levels`` for this tree (``auto``: packed while a prompt's sequence is short)."""
        if self.tree_mode != "auto":
            return self.tree_mode
        per_prompt = (tree.num_nonterminal - tree.num_prompts) // max(tree.num_prompts, 1)
        return "packed" if self.prompt_width + per_prompt <= self.packed_max_len else "levels"

    def node_logits(self, tree, full_norm: bool = False):
        """Restricted logits of every non-terminal node, ``[N_nt, K]`` (``out_dtype`` on ``out_device``),
        each distinct prefix run once (``packed`` or ``levels``; see the module docstring).
        Differentiable. With ``full_norm`` also the full-vocabulary log-normaliser ``[N_nt]``."""
        self.check_tree(tree)
        if self.resolved_tree_mode(tree) == "packed":
            out = self._packed_node_logits(tree, full_norm)
            if out is not None:
                return out
        return self._level_node_logits(tree, full_norm)

    def node_log_probs(self, tree):
        return torch.log_softmax(self.node_logits(tree), dim=-1)

    def node_token_log_probs(self, tree) -> torch.Tensor:
        """``log p_LM(allowed[k] | s)`` under the *full* vocabulary's softmax, ``[N_nt, K]`` (a token
        reward model's score)."""
        z, lse = self.node_logits(tree, full_norm=True)
        return z - lse.unsqueeze(1)

    def _out(self, x):
        return x.to(device=self.out_device, dtype=self.out_dtype)

    def _packed_node_logits(self, tree, full_norm: bool):
        key = (tree.num_prompts, tree.vocab_size, tree.horizon, tree.eos_token, tree.num_nodes)
        if key not in self._packed:
            self._packed[key] = packed_layout(tree, self.prompt_len, self.prompt_width)
        layout = self._packed[key]
        if layout is None:
            return None
        nt_pm, tok_pm, pos_pt, mask_ptt = layout
        P, M = nt_pm.shape
        W = self.prompt_width
        T = W + M
        ids = torch.cat([self.prompt_tokens, self.allowed_ids[tok_pm]], 1)
        per_call = max(1, self.max_batch // T)
        zs, lses = [], []
        for lo in range(0, P, per_call):
            hi = min(P, lo + per_call)
            rows = (torch.arange(hi - lo).unsqueeze(1) * T + torch.arange(W - 1, T)).reshape(-1)
            out = self._logits(ids[lo:hi], pos_pt[lo:hi], self._additive(mask_ptt[lo:hi]), rows=rows,
                               full_norm=full_norm)
            z, lse = out if full_norm else (out, None)
            zs.append(z.view(hi - lo, M + 1, -1))
            if full_norm:
                lses.append(lse.view(hi - lo, M + 1))
        z_pm = torch.cat(zs)  # [P, M + 1, K]: the root, then the nodes
        order = torch.cat([torch.arange(P).unsqueeze(1), nt_pm], 1).reshape(-1)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        z = self._out(z_pm.reshape(P * (M + 1), -1)).index_select(0, inv)
        if not full_norm:
            return z
        return z, self._out(torch.cat(lses).reshape(-1)).index_select(0, inv)

    def _level_node_logits(self, tree, full_norm: bool):
        out, cache = self._prompt_prefill(full_norm)
        zs, lses = [out[0] if full_norm else out], [out[1]] if full_norm else []
        W = self.prompt_width
        real_p = torch.arange(W).unsqueeze(0) >= (W - self.prompt_len).unsqueeze(1)  # [P, W]
        for depth in range(1, tree.horizon):
            lvl = tree.level_nt(depth)
            if lvl.stop == lvl.start:
                break
            nodes = tree.nt_node_k[lvl]
            parent = tree.nt_index_n[tree.parent_n[nodes]] - tree.nt_level_start[depth - 1]
            prompt = tree.prompt_n[nodes]
            ids = self.allowed_ids[tree.token_n[nodes]].unsqueeze(1)
            pos = (self.prompt_len[prompt] - 1 + depth).unsqueeze(1)
            caches = []
            for lo in range(0, nodes.numel(), self.max_batch):
                hi = min(nodes.numel(), lo + self.max_batch)
                sub = cache.select(parent[lo:hi].to(self.device))
                allow = torch.cat([real_p[prompt[lo:hi]], torch.ones(hi - lo, depth, dtype=torch.bool)], 1)
                out = self._logits(ids[lo:hi], pos[lo:hi], self._additive(allow.unsqueeze(1)), sub,
                                   full_norm=full_norm)
                zs.append(out[0] if full_norm else out)
                if full_norm:
                    lses.append(out[1])
                caches.append(sub)
            cache = KVCache.cat(caches)
        z = self._out(torch.cat(zs))
        return (z, self._out(torch.cat(lses))) if full_norm else z

    # -------------------------------------------------------------- the sampler's view
    def _param_version(self) -> tuple:
        return tuple((id(p), p._version) for p in self.parameters())

    def _prompt_prefill(self, full_norm: bool = False):
        """Run the (left-padded) prompts once: ``(logits [P, K] at their last tokens, cache of P rows)``.
        A padding slot sees only itself and is seen by no real token."""
        W = self.prompt_width
        real = torch.arange(W).unsqueeze(0) >= (W - self.prompt_len).unsqueeze(1)  # [P, W]
        allow = torch.ones(W, W, dtype=torch.bool).tril().unsqueeze(0) & real.unsqueeze(1)
        allow = allow | torch.eye(W, dtype=torch.bool).unsqueeze(0)
        pos = (torch.arange(W).unsqueeze(0) - (W - self.prompt_len).unsqueeze(1)).clamp(min=0)
        cache = KVCache()
        out = self._logits(self.prompt_tokens, pos, self._additive(allow), cache,
                           rows=torch.arange(self.num_prompts) * W + W - 1, full_norm=full_norm)
        return out, cache

    def step_log_probs(self, position, prompt_b, tokens_bt, prev_b, nt_b):
        """Next-token log-probabilities ``[B, K]`` (detached, float64 on CPU) of the states
        ``prompt + tokens_bt[:, :position]``.

        With ``incremental_sampling`` the key/value cache of the previous call is reused when that
        call was for ``position - 1`` with the same prompts, the same tokens and unchanged
        parameters; otherwise a full forward (which rebuilds the cache)."""
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long)
        tokens_bt = torch.as_tensor(tokens_bt, dtype=torch.long)[:, :position]
        B = prompt_b.numel()
        W = self.prompt_width
        with torch.no_grad():
            state = self._sampling_state if self.incremental_sampling else None
            version = self._param_version()
            plen = self.prompt_len[prompt_b]
            real = torch.arange(W).unsqueeze(0) >= (W - plen).unsqueeze(1)
            if (state is not None and position >= 1 and state["position"] == position - 1
                    and state["version"] == version and torch.equal(state["prompt"], prompt_b)
                    and torch.equal(state["tokens"], tokens_bt[:, :position - 1])):
                cache = state["cache"]
                ids = self.allowed_ids[tokens_bt[:, position - 1:].clamp(0, self.vocab_size - 1)]
                allow = torch.cat([real, torch.ones(B, position, dtype=torch.bool)], 1).unsqueeze(1)
                z = self._logits(ids, (plen - 1 + position).unsqueeze(1), self._additive(allow), cache)
            elif position == 0:
                z, cache = self._prompt_prefill()
                z = z.index_select(0, prompt_b.to(z.device))
                cache = cache.select(prompt_b.to(self.device))
            else:
                ids = torch.cat([self.prompt_tokens[prompt_b],
                                 self.allowed_ids[tokens_bt.clamp(0, self.vocab_size - 1)]], 1)
                L = W + position
                allow = torch.ones(L, L, dtype=torch.bool).tril().unsqueeze(0) & torch.cat(
                    [real, torch.ones(B, position, dtype=torch.bool)], 1).unsqueeze(1)
                allow = allow | torch.eye(L, dtype=torch.bool).unsqueeze(0)
                pos = (torch.arange(L).unsqueeze(0) - (W - plen).unsqueeze(1)).clamp(min=0)
                cache = KVCache()
                z = self._logits(ids, pos, self._additive(allow), cache, rows=torch.arange(B) * L + L - 1)
            if self.incremental_sampling:
                self._sampling_state = dict(position=position, version=version, prompt=prompt_b.clone(),
                                            tokens=tokens_bt.clone(), cache=cache)
            return torch.log_softmax(z.to(torch.float64), dim=-1).cpu()

    def clear_sampling_cache(self) -> None:
        """Drop the key/value cache kept between sampler calls and the decode buffers (and CUDA graphs)
        kept between :meth:`sample` calls."""
        self._sampling_state = None
        self._decode_states.clear()

    # -------------------------------------------------------------- batched sampling on the device
    def sample(self, prompt_b, horizon: int | None = None, generator: torch.Generator | None = None,
               seed: int | None = None, prefix_bt=None, prefix_len_b=None, num_samples: int = 1,
               cuda_graph: str | bool = "auto"):
        """Sample responses of the restricted policy for a batch of prompts, on the model's device.

        Rows ``i * S .. i * S + S - 1`` (``S = num_samples``) continue row ``i`` of ``prompt_b`` (and of
        ``prefix_bt [B, L]`` / ``prefix_len_b [B]``, forced tokens; then the rows are continuations of
        the given prefixes, each prefix run once before its ``S`` copies branch). Tokens are drawn by
        inverse CDF from uniforms drawn up front on the CPU from ``generator`` (or ``seed``), so a seed
        fixes the batch on any device. A response ends at EOS or after ``horizon`` tokens.

        Decoding uses a static key/value cache; on CUDA the decode step is captured as a CUDA graph
        (``cuda_graph="auto"``; ``False`` runs it eagerly) once per (rows, length), and the buffers
        and graphs of the last few shapes are kept for the next calls (:meth:`clear_sampling_cache`
        frees them). ``last_sample_info`` says whether the graph was used.

        Returns ``(tokens [B*S, H] allowed indices, 0 after the end; logp [B*S, H] float64;
        length [B*S])`` on the CPU.
        """
        H = self.horizon if horizon is None else int(horizon)
        if H < 1 or H > self.horizon:
            raise ValueError(f"horizon must be in [1, {self.horizon}], got {horizon!r}")
        S = int(num_samples)
        if S < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
        prompt_b = torch.as_tensor(prompt_b, dtype=torch.long).flatten()
        B = prompt_b.numel()
        if bool(((prompt_b < 0) | (prompt_b >= self.num_prompts)).any()):
            raise ValueError(f"prompt ids must be in [0, {self.num_prompts - 1}]")
        forced = torch.zeros(B, H, dtype=torch.long)
        flen = torch.zeros(B, dtype=torch.long)
        if prefix_bt is not None:
            prefix_bt = torch.as_tensor(prefix_bt, dtype=torch.long)
            if prefix_bt.dim() != 2 or prefix_bt.shape[0] != B or prefix_bt.shape[1] > H:
                raise ValueError(f"prefix tokens must be [B={B}, L <= {H}], got {list(prefix_bt.shape)}")
            forced[:, :prefix_bt.shape[1]] = prefix_bt
            flen = (torch.full((B,), prefix_bt.shape[1], dtype=torch.long) if prefix_len_b is None
                    else torch.as_tensor(prefix_len_b, dtype=torch.long).flatten())
            if flen.numel() != B or bool(((flen < 0) | (flen > prefix_bt.shape[1])).any()):
                raise ValueError("prefix lengths must be B integers in [0, L]")
            given = torch.arange(H).unsqueeze(0) < flen.unsqueeze(1)
            if bool(((forced < 0) | (forced >= self.vocab_size))[given].any()):
                raise ValueError(f"prefix tokens must be in [0, {self.vocab_size - 1}]")
        gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
        u_hb = torch.rand(H, B * S, generator=gen, dtype=torch.float64)
        tokens = torch.zeros(B * S, H, dtype=torch.long)
        logp = torch.zeros(B * S, H, dtype=torch.float64)
        length = torch.zeros(B * S, dtype=torch.long)
        # rows sharing a prefix length share one decode run; the prefix is decoded once per row, then
        # its S copies branch
        with torch.no_grad():
            for L in torch.unique(flen).tolist():
                idx = torch.nonzero(flen == L).flatten()
                out_rows = (idx.unsqueeze(1) * S + torch.arange(S)).reshape(-1)
                tk, lp, ln = self._decode(prompt_b[idx], forced[idx], int(L), S, H, u_hb[:, out_rows], cuda_graph)
                tokens[out_rows], logp[out_rows], length[out_rows] = tk, lp, ln
        return tokens, logp, length

    def _param_signature(self) -> tuple:
        # a captured graph reads the parameters at fixed addresses: in-place updates are seen, new
        # tensors (a .to(), a reloaded model) need a new capture
        return tuple(p.data_ptr() for p in self.parameters())

    def _decode_state(self, like: KVCache, n: int, max_len: int, cuda_graph) -> _DecodeState:
        use_graph = (self.device.type == "cuda" and cuda_graph not in (False, "off", "false")
                     and self.restricted_head)
        key = (n, max_len, use_graph, self._param_signature())
        state = self._decode_states.pop(key, None)
        if state is None:
            state = _DecodeState(self, like, n, max_len, use_graph)
        self._decode_states[key] = state  # most recently used last
        while len(self._decode_states) > 4:
            self._decode_states.pop(next(iter(self._decode_states)))
        return state

    def _decode(self, prompt_b, forced_bt, n_forced: int, S: int, H: int, u_hb, cuda_graph):
        """One decode run of ``B`` rows with ``n_forced`` forced tokens each, ``S`` samples per row.
        With ``0 < n_forced < H`` the ``B`` rows run the forced prefix and then branch into ``B * S``;
        without forced tokens the ``B * S`` rows run from the prompt. Returns CPU ``(tokens, logp,
        length)`` of the ``B * S`` rows (row ``i * S + s``)."""
        dev = self.device
        W = self.prompt_width
        max_len = -(-(W + H) // 16) * 16  # a multiple of 16 suits the fused attention kernels' masks
        branch = S > 1 and 0 < n_forced < H
        copies = S if n_forced == 0 else 1
        rows = prompt_b.repeat_interleave(copies).to(dev)
        forced = forced_bt.repeat_interleave(copies, 0).to(dev)
        z0, cache0 = self._prompt_prefill()
        state = self._decode_state(cache0, rows.numel(), max_len, cuda_graph)
        state.load_prompts(cache0, rows)
        z = z0.index_select(0, rows)
        u_hb = u_hb.to(dev, self.compute_dtype)
        K, eos = self.vocab_size, self.eos_index
        tok_h, lp_h = [], []
        alive = None
        for t in range(H):
            if branch and t == n_forced:  # each row's S continuations share the cache of its prefix
                nxt = self._decode_state(cache0, rows.numel() * S, max_len, cuda_graph)
                nxt.load_branch(state, S)
                state = nxt
                forced = forced.repeat_interleave(S, 0)
                tok_h = [x.repeat_interleave(S, 0) for x in tok_h]
                lp_h = [x.repeat_interleave(S, 0) for x in lp_h]
                alive = alive.repeat_interleave(S, 0) if alive is not None else None
            if t > 0:
                z = state.step()
            lpv = torch.log_softmax(z.to(self.compute_dtype), dim=-1)
            n = lpv.shape[0]
            u = u_hb[t] if n == u_hb.shape[1] else u_hb[t, ::S]
            cdf = lpv.exp().cumsum(-1)
            tok = (cdf < u.unsqueeze(1) * cdf[:, -1:]).sum(-1).clamp_(max=K - 1)
            if t < n_forced:
                tok = forced[:, t]
            lp = lpv.gather(1, tok.unsqueeze(1)).squeeze(1)
            if eos is not None:
                if alive is None:
                    alive = torch.ones(n, dtype=torch.bool, device=dev)
                tok = torch.where(alive, tok, torch.zeros_like(tok))
                lp = torch.where(alive, lp, torch.zeros_like(lp))
                alive = alive & (tok != eos)
            tok_h.append(tok)
            lp_h.append(lp)
            if t + 1 < H:
                state.ids.copy_(self._allowed_dev[tok].unsqueeze(1))
                state.pos.add_(1)
        self.last_sample_info = dict(state.info)
        if S > 1 and n_forced >= H:  # every token forced: the copies never branched
            tok_h = [x.repeat_interleave(S, 0) for x in tok_h]
            lp_h = [x.repeat_interleave(S, 0) for x in lp_h]
        tokens = torch.stack(tok_h, 1).cpu()
        logp = torch.stack(lp_h, 1).to(torch.float64).cpu()
        if eos is None:
            length = torch.full((tokens.shape[0],), H, dtype=torch.long)
        else:
            ended = tokens == eos
            length = torch.where(ended.any(1), ended.to(torch.long).argmax(1) + 1, torch.full((tokens.shape[0],), H))
        return tokens, logp, length


def _capture_cuda_graph(step, cache: StaticKVCache, mask):  # pragma: no cover - needs a GPU
    """GPU only. Capture ``step`` (which mutates the cache, the mask and the position counter in place) as a
    CUDA graph; returns a function replaying it. Warm-up runs happen on a side stream, as
    ``torch.cuda.graphs`` requires; their writes are undone (the position counter and the mask are
    restored) so the graph's first replay is the real next step."""
    pos0 = cache.pos.clone()
    mask0 = mask.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
                cache.pos.copy_(pos0)
                mask.copy_(mask0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    finally:
        torch.cuda.current_stream().wait_stream(stream)
        cache.pos.copy_(pos0)
        mask.copy_(mask0)

    def replay():
        graph.replay()
        return out

    replay.graph = graph
    return replay


@contextlib.contextmanager
def forward_ad_attention(policy):
    """Switch the policy's model to the ``tpg_math`` attention (forward-mode autodiff works through
    it; ``sdpa`` kernels do not support it) for the duration of the block."""
    model = getattr(policy, "model", None)
    config = getattr(model, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) == MATH_ATTENTION
            or not register_math_attention()):
        yield
        return
    old = config._attn_implementation
    config._attn_implementation = MATH_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = old


__all__ = ["HFRestrictedPolicy", "KVCache", "StaticKVCache", "SHORTHANDS", "TRAINABLE_HELP", "TREE_MODES",
           "MATH_ATTENTION", "apply_trainable", "causal_lm_config", "decoder_blocks", "forward_ad_attention",
           "load_causal_lm", "load_tokenizer", "packed_layout", "parse_dtype", "parse_trainable",
           "register_math_attention"]
