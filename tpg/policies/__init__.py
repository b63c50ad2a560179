"""Policies: tabular softmax, shared (position, previous token) softmax, tiny transformer."""

from .base import Policy
from .tabular import SharedSoftmax, TabularSoftmax
from .transformer import TinyTransformerPolicy

__all__ = ["Policy", "SharedSoftmax", "TabularSoftmax", "TinyTransformerPolicy"]
