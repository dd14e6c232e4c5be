"""Resolve MODEL specs of the command line: ``torchvision:NAME``, ``pkg.mod:factory``,
``path/to/file.py:factory``; and the embedded default of ``sparsify-fx demo``."""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sparsify_fx.errors import SparsifyError

__all__ = ["load_model", "default_input", "parse_input", "make_inputs", "InputSpec", "INPUT_SYNTAX",
           "DEMO_MODEL", "DEMO_INPUT_SHAPE"]

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


#: the --input syntax, as --help shows it
INPUT_SYNTAX = """\
--input [NAME=]DTYPE[SHAPE][:RANGE]   one input per flag, positional in order; NAME= makes
                                      it a keyword input of forward()
  DTYPE  a torch dtype: float32 (default when left out), bfloat16, float16, float64,
         int64, int32, int16, int8, uint8, bool
  SHAPE  comma-separated sizes in brackets: [2,16]
  RANGE  LOW-HIGH (or LOW..HIGH): integers uniform in [LOW, HIGH) (token ids:
         int64[2,16]:0-1000), floats uniform in [LOW, HIGH); a single number
         fills the tensor with it (attention_mask=int64[2,16]:1). No RANGE: floats
         are randn, integers 0-2, bool random
  e.g. --input int64[2,16]:0-1000 --input attention_mask=int64[2,16]:1"""

_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)=)?(?P<dtype>[a-z][a-z0-9]*)?"
                   r"\[(?P<shape>[0-9, ]*)\](?::(?P<range>.+))?$")
_NUMBER = r"-?[0-9]+(?:\.[0-9]*)?(?:e-?[0-9]+)?"
_RANGE = re.compile(rf"^(?P<low>{_NUMBER})(?:-|\.\.)(?P<high>{_NUMBER})$")


@dataclass(frozen=True)
class InputSpec:
    """One ``--input``: keyword name (None: positional), dtype, shape, value range or fill."""

    name: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    low: float | None = None
    high: float | None = None
    fill: float | None = None


def parse_input(text: str) -> InputSpec:
    """Parse one ``--input`` spec (see :data:`INPUT_SYNTAX`); SparsifyError naming what is wrong.

    Example:
        >>> parse_input("int64[2,16]:0-1000")
        InputSpec(name=None, dtype=torch.int64, shape=(2, 16), low=0.0, high=1000.0, fill=None)
    """
    m = _SPEC.match(text.strip())
    if m is None:
        raise SparsifyError(
            f"--input {text!r} is not of the form [NAME=]DTYPE[SHAPE][:RANGE], "
            "e.g. int64[2,16]:0-1000 or attention_mask=int64[2,16]:1 or float32[2,3,224,224]"
        )
    dtype_name = m["dtype"] or "float32"
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise SparsifyError(f"--input {text!r}: {dtype_name!r} is not a torch dtype (float32, bfloat16, int64, bool...)")
    try:
        shape = tuple(int(v) for v in m["shape"].replace(" ", "").split(",") if v)
    except ValueError as e:  # the pattern allows digits only; kept for clarity
        raise SparsifyError(f"--input {text!r}: bad shape {m['shape']!r}") from e
    low = high = fill = None
    if m["range"] is not None:
        r = m["range"].strip()
        if (rm := _RANGE.match(r)) is not None:
            low, high = float(rm["low"]), float(rm["high"])
            if high <= low:
                raise SparsifyError(f"--input {text!r}: range {r!r} is empty (HIGH must exceed LOW; "
                                    "HIGH is exclusive: 0-1000 draws 0..999)")
        elif re.fullmatch(_NUMBER, r):
            fill = float(r)
        else:
            raise SparsifyError(f"--input {text!r}: range {r!r} is neither LOW-HIGH (0-1000) nor one value (1)")
    return InputSpec(m["name"], dtype, shape, low, high, fill)


def _tensor(spec: InputSpec, g: torch.Generator) -> torch.Tensor:
    if spec.fill is not None:
        return torch.full(spec.shape, spec.fill, dtype=spec.dtype)
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=g).bool()
    if spec.dtype.is_floating_point or spec.dtype.is_complex:
        if spec.low is None:
            return torch.randn(*spec.shape, generator=g).to(spec.dtype)
        return (torch.rand(*spec.shape, generator=g) * (spec.high - spec.low) + spec.low).to(spec.dtype)
    low, high = (0, 2) if spec.low is None else (int(spec.low), int(spec.high))
    return torch.randint(low, high, spec.shape, generator=g, dtype=spec.dtype)


def make_inputs(specs: list[InputSpec]) -> tuple[tuple, dict]:
    """Deterministic example inputs for ``--input`` specs: (positional, keyword)."""
    g = torch.Generator().manual_seed(0)
    args, kwargs = [], {}
    for spec in specs:
        if spec.name is None:
            if kwargs:
                raise SparsifyError("--input: positional inputs come before keyword inputs (NAME=...)")
            args.append(_tensor(spec, g))
        elif spec.name in kwargs:
            raise SparsifyError(f"--input: keyword input {spec.name!r} is given twice")
        else:
            kwargs[spec.name] = _tensor(spec, g)
    return tuple(args), kwargs
