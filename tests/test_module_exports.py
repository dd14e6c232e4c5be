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
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
                  if not m.name.endswith("__main__")]  # importing it runs the CLI
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_all_lists_only_defined_names(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names undefined {missing}"
