"""One context manager shared by the exact engine and the samplers: torch's intra-op thread count
set for a block."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int):
    """Run torch with ``n`` intra-op threads inside the block (the previous setting is restored).

    :func:`tpg.exact.solve` and the samplers (:mod:`tpg.rollouts`) run on one thread: their ops
    are chains of cheap passes (one tree level, or one ``[B]`` vector, at a time), and with
    several intra-op threads each pass ends in a thread barrier that, on a machine shared with
    other jobs, can wait a whole scheduler tick for a descheduled worker (measured: ``solve`` 3x
    slower on 2 threads than on 1 under load, the V = 8, H = 16 sampler benchmark 10x slower;
    both about as fast idle). A policy's own calls (``node_log_probs``, ``step_log_probs``, the
    chain rule) keep the caller's setting. The setting is process-wide: do not solve or sample
    from several Python threads at once.
    """
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
