"""Every module's ``__all__`` names what it defines or re-exports (style.md: ``__all__`` in every
module). A re-export that an auto-fixer removed as an unused import fails here, by name, instead
of as an ImportError while collecting whichever test imports it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import sparsify_fx.passes as passes
import sparsify_fx


def _modules() -> list[str]:
    names = []
    for package in (sparsify_fx, passes):
        names.append(package.__name__)
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                  if m.name != "__main__"]  # importing it runs the CLI
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_lists_only_defined_names(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names undefined {missing}"
