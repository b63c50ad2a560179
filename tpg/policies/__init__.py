"""Policies: tabular softmax, shared (position, previous token) softmax, tiny transformer.

The names below are imported on first use (:mod:`tpg._lazy`).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "Policy": ".base",
    "SharedSoftmax": ".tabular", "TabularSoftmax": ".tabular",
    "TinyTransformerPolicy": ".transformer",
}

__all__ = ["Policy", "SharedSoftmax", "TabularSoftmax", "TinyTransformerPolicy"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
