"""What the benchmark scripts share: the CPU model for their machine lines.

The scripts run as ``python benchmarks/X.py`` and tests import them by module name or by path, so
each one puts this folder on ``sys.path`` before ``from _common import ...``.
"""

from __future__ import annotations

import platform


def cpu_model(fallback: str | None = None) -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo``; where that cannot be read (or has none),
    ``fallback``, by default ``platform.processor() or platform.machine()``."""
    cpu = (platform.processor() or platform.machine()) if fallback is None else fallback
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu
