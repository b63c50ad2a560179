"""Measured memory of a training step, and the models a method holds.

How the peak is measured. Python's ``tracemalloc`` does not see torch's CPU allocations (they go
through c10's allocator, not the Python heap), and torch keeps allocation statistics for CUDA
only. :class:`TensorMemoryMeter` therefore counts tensor storage directly: a
``TorchDispatchMode`` sees the output of every ATen operation run inside it (forward, backward
and optimiser alike; the autograd engine runs CPU backward on the calling thread with the mode
active), records each new storage's ``nbytes`` and registers a finalizer on the storage object,
which torch keeps alive exactly as long as the C++ storage lives (autograd's saved tensors
included). ``peak`` is the largest total of live storage bytes allocated since entry. What it
leaves out: kernels' internal scratch buffers, allocator slack and fragmentation, Python objects.
What was allocated before entry (parameters, optimiser state, models) is counted separately as
*held* bytes (:func:`tensor_bytes`), so a step's peak is ``held + transient peak``.

The count is deterministic (same run, same bytes), unlike the process's resident set size,
whose high-water mark moves with the allocator's caching.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryMeter(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by ATen ops inside the ``with`` block.

    Attributes after (or during) the block: ``peak`` (bytes), ``current`` (bytes still live),
    ``allocations`` (number of storages seen)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.allocations = 0
        self._live: dict[int, int] = {}
        self._finalizers: list = []

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = (out,) if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) \
            else tree_flatten(out)[0]
        for t in outs:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._live:  # empty, or a view of a storage already counted
                continue
            n = storage.nbytes()
            self._live[key] = n
            self.current += n
            self.allocations += 1
            if self.current > self.peak:
                self.peak = self.current
            self._finalizers.append(weakref.finalize(storage, self._free, key))
        return out

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        # storages that outlive the block (new optimiser state, gradients) keep no hook into the meter
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()
        return out


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (an iterable; ``None`` entries skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_tensors(opt) -> list[torch.Tensor]:
    """Every tensor of an optimiser's state (Adam's moments and step counters)."""
    if opt is None:
        return []
    out = []
    for state in opt.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def reward_model_tensors(mdp) -> tuple[str, list[torch.Tensor]]:
    """What the reward of ``mdp`` is, and its floating-point tensors (the reward model's weights).

    ``rule`` (a rule task: integer answers, no weights), ``table`` (a token-reward table, one
    entry per tree edge or per (position, previous token, token)), ``network`` (the frozen
    random reward model of the ``rm`` task). The zero-reward twin holds its base's."""
    rewards = mdp.rewards
    base = getattr(rewards, "base", rewards)
    tensors = [v for v in vars(base).values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    name = type(base).__name__
    kind = "rule" if not tensors else ("network" if name == "RewardModelRewards" else "table")
    return kind, tensors


def param_count(tensors) -> int:
    return int(sum(t.numel() for t in tensors))


__all__ = ["TensorMemoryMeter", "tensor_bytes", "optimizer_tensors", "reward_model_tensors", "param_count"]
