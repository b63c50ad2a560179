"""Lazy imports: a package's public names, and third-party modules, imported on first use.

Importing torch takes about two seconds, pandas about half of one. ``tpg --help``, ``tpg verify
--help`` and a mistyped spec must answer at once, so the packages on those paths (``tpg`` and its
sub-packages) import their public names only when someone uses one (PEP 562: a module-level
``__getattr__``), and the command-line modules import heavy code inside the functions that need it.

    # in a package's __init__.py
    from .._lazy import lazy_exports
    _EXPORTS = {"solve": ".engine", "ExactSolution": ".engine"}   # name -> the module that defines it
    __all__ = list(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

``from tpg.exact import solve`` and ``tpg.exact.solve`` work as with eager imports (the first use
imports ``tpg.exact.engine`` and caches the name in the package), and so does ``import
tpg.exact.engine``. A sub-module is an attribute too, imported on first access (``import tpg;
tpg.cases.load_case(...)``), as it was when the package imported it eagerly. Any other name
raises ``AttributeError`` as usual.

A name exported by a sub-module of the same name (``tpg.verify.exact_moments``, the function of the
module ``tpg/verify/exact_moments.py``) needs one more step: importing the sub-module binds the
module to that attribute, which would hide the export. A package with such a name sets its module's
class to :class:`LazyPackage`, which binds the exported object instead (what the eager
``from .exact_moments import exact_moments`` did).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module
    (relative to ``package``, e.g. ``".engine"``) it is imported from on first access; a name that
    is not exported but is a sub-module of ``package`` is that sub-module."""

    def __getattr__(name: str):
        where = exports.get(name)
        if where is None:
            if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")  # the import binds it in the package
        value = getattr(importlib.import_module(where, package), name)
        setattr(sys.modules[package], name, value)  # cached: __getattr__ runs once per name
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__


class LazyPackage(types.ModuleType):
    """The class of a lazy package with an export named like one of its sub-modules: when the import
    system binds the sub-module ``pkg.NAME`` as the attribute ``NAME``, the attribute becomes the
    object ``NAME`` of ``_EXPORTS`` instead (the sub-module stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        where = self.__dict__.get("_EXPORTS", {}).get(name)
        if (isinstance(value, types.ModuleType) and where is not None
                and value.__name__ == f"{self.__name__}.{name}" and where.lstrip(".") == name):
            value = getattr(value, name)
        super().__setattr__(name, value)


class LazyModule(types.ModuleType):
    """A stand-in for the module ``name`` that imports it on the first attribute access
    (``pd = LazyModule("pandas")``; ``pd.DataFrame`` imports pandas). It does not enter
    ``sys.modules``: other ``import pandas`` statements are untouched."""

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)


__all__ = ["lazy_exports", "LazyPackage", "LazyModule"]
