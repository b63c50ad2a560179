"""Policies: tabular softmax, shared (position, previous token) softmax."""

from .base import Policy
from .tabular import SharedSoftmax, TabularSoftmax

__all__ = ["Policy", "SharedSoftmax", "TabularSoftmax"]
