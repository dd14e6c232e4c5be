"""Resolve MODEL specs of the command line: ``torchvision:NAME``, ``pkg.mod:factory``,
``path/to/file.py:factory``; and the embedded default of ``sparsify-fx demo``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from sparsify_fx.errors import SparsifyError

__all__ = ["load_model", "default_input", "DEMO_MODEL", "DEMO_INPUT_SHAPE"]

DEMO_MODEL = "torchvision:resnet18"
DEMO_INPUT_SHAPE = (8, 3, 64, 64)


def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL spec names (random weights; nothing is downloaded)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise SparsifyError(
            f"MODEL {spec!r} is not of the form torchvision:NAME, package.module:factory "
            "or path/to/file.py:factory"
        )
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError) as e:
            raise SparsifyError(
                f"torchvision has no model {name!r}; see torchvision.models.list_models()"
            ) from e
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise SparsifyError(f"MODEL file {source!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise SparsifyError(f"cannot import {source!r} for MODEL {spec!r}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None:
        raise SparsifyError(f"{source!r} has no attribute {name!r} (MODEL {spec!r})")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"MODEL {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def default_input(spec: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A deterministic input for an image model: ``shape`` or 2x3x224x224."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(*(shape or (2, 3, 224, 224)), generator=g)
