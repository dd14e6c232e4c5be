"""Numerical check of a rewritten module against the original, in eval mode."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.errors import VerificationError
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import is_in_place

__all__ = ["VerifyReport", "verify", "default_tolerances"]

_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` used by :func:`verify` for outputs of ``dtype``."""
    return _TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        ok: every output matched within tolerance.
        max_abs_err / max_rel_err: the largest errors over all floating outputs.
        n_outputs: how many tensor outputs were compared.
        first_divergence: ``node.format_node()`` of the first rewritten-graph node whose value
            differs from the original graph's (None when outputs match or it cannot be located).
        module: qualified name of the module that node belongs to.
        mismatches: one line per differing output.
        skipped: why nothing was compared (a model on the meta device has no values), else None.
    """

    ok: bool
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    n_outputs: int = 0
    first_divergence: str | None = None
    module: str | None = None
    mismatches: list[str] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.ok:
            return f"ok: {self.n_outputs} output(s), max abs err {self.max_abs_err:.3g}"
        where = f"; first diverging node: {self.first_divergence} in module {self.module!r}" if self.first_divergence else ""
        return f"MISMATCH: {'; '.join(self.mismatches[:3])}{where}"


class _Modes:
    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def __enter__(self) -> None:
        self.saved = [{n: m.training for n, m in mod.named_modules()} for mod in self.modules]
        for mod in self.modules:
            mod.eval()

    def __exit__(self, *exc: Any) -> None:
        for mod, saved in zip(self.modules, self.saved):
            for n, m in mod.named_modules():
                m.training = saved.get(n, m.training)


# values compared by ``==``; every other object is walked for the tensors it holds
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
               torch.Size, enum.Enum, type)
_MAX_DEPTH = 12
_MAX_LEAVES = 100_000


class _Opaque:
    """A leaf the walk does not look into (a function, a module, a too-deep object): compared
    by type only, never by identity (two calls return two distinct objects)."""

    def __init__(self, value: Any):
        self.type_name = type(value).__qualname__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and other.type_name == self.type_name

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def _join(path: str, part: str) -> str:
    return path + part if part.startswith("[") or not path else f"{path}.{part}"


def _key(k: Any) -> str:
    return str(k) if isinstance(k, str) and k.isidentifier() else f"[{k!r}]"


def _leaves(value: Any, path: str = "", depth: int = 0, active: frozenset = frozenset()) -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every tensor and primitive held by ``value``, in a stable order.

    Walks dicts (a Hugging Face ``ModelOutput`` is one), lists, tuples (named tuples by field)
    and the attributes (``__dict__`` / ``__slots__``) of any other object, so cache objects
    (``DynamicCache.layers[i].keys``) are compared by the tensors they hold without importing
    the library that defines them. Bounded in depth; cycles are cut.
    """
    if isinstance(value, torch.Tensor) or isinstance(value, _PRIMITIVES):
        yield path, value
        return
    if depth >= _MAX_DEPTH or id(value) in active or isinstance(value, nn.Module):
        yield path, _Opaque(value)
        return
    active = active | {id(value)}
    if isinstance(value, dict):
        items = [(_key(k), v) for k, v in value.items()]
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        items = list(zip(value._fields, value))
    elif isinstance(value, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    else:
        attrs = dict(getattr(value, "__dict__", None) or {})
        for cls in type(value).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and slot not in attrs and hasattr(value, slot):
                    attrs[slot] = getattr(value, slot)
        items = [(k, v) for k, v in attrs.items() if not inspect.isroutine(v)]
        if not items:
            yield path, _Opaque(value)
            return
    for part, v in items:
        yield from _leaves(v, _join(path, part), depth + 1, active)


def _flatten(value: Any) -> list[tuple[str, Any]]:
    out = []
    for i, leaf in enumerate(_leaves(value)):
        if i >= _MAX_LEAVES:
            break
        out.append(leaf)
    return out


def _where(path: str) -> str:
    """``output 0`` (a single tensor), ``output 1`` (a tuple's), ``output logits``,
    ``output cache.layers[0].keys``."""
    if not path:
        return "output 0"
    if path.startswith("["):
        index, _, rest = path[1:].partition("]")
        return f"output {index}{rest}"
    return f"output {path}"


def _compare(ref: Any, out: Any, rtol: float | None, atol: float | None, report: VerifyReport) -> None:
    ref_leaves, out_leaves = _flatten(ref), _flatten(out)
    ref_paths, out_paths = [p for p, _ in ref_leaves], [p for p, _ in out_leaves]
    if ref_paths != out_paths:
        report.ok = False
        first = next((i for i, (a, b) in enumerate(zip(ref_paths, out_paths)) if a != b),
                     min(len(ref_paths), len(out_paths)))
        got = out_paths[first] if first < len(out_paths) else "nothing"
        expected = ref_paths[first] if first < len(ref_paths) else "nothing"
        report.mismatches.append(
            f"output structure differs: {len(out_paths)} leaves vs {len(ref_paths)} expected; "
            f"first difference: got {_where(got) if got != 'nothing' else got}, "
            f"expected {_where(expected) if expected != 'nothing' else expected}")
        return
    for (path, r), (_, o) in zip(ref_leaves, out_leaves):
        where = _where(path)
        if not isinstance(r, torch.Tensor):
            if not isinstance(o, torch.Tensor) and _differs(r, o):
                report.ok = False
                report.mismatches.append(f"{where}: {o!r} != {r!r}")
            continue
        report.n_outputs += 1
        if not isinstance(o, torch.Tensor) or o.shape != r.shape or o.dtype != r.dtype:
            report.ok = False
            report.mismatches.append(f"{where}: got {_describe(o)}, expected {_describe(r)}")
            continue
        rt, at = (rtol, atol) if rtol is not None and atol is not None else default_tolerances(r.dtype)
        if r.is_floating_point() and r.numel():
            diff = (o.double() - r.double()).abs()
            finite = torch.isfinite(diff)
            if finite.any():
                report.max_abs_err = max(report.max_abs_err, float(diff[finite].max()))
                rel = diff[finite] / r.double().abs()[finite].clamp_min(1e-12)
                report.max_rel_err = max(report.max_rel_err, float(rel.max()))
        try:
            torch.testing.assert_close(o, r, rtol=rt, atol=at, equal_nan=True)
        except AssertionError as e:
            report.ok = False
            report.mismatches.append(f"{where}: {str(e).splitlines()[0]}")


def _differs(r: Any, o: Any) -> bool:
    if isinstance(r, float) and isinstance(o, float) and r != r and o != o:
        return False  # nan == nan for this purpose
    try:
        return bool(r != o)
    except Exception:  # noqa: BLE001 - an object whose != cannot answer: compare types
        return type(r) is not type(o)


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor{tuple(v.shape)} {v.dtype}"
    return type(v).__name__


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        # a later in-place op (out += identity) would overwrite the value compared here
        overwritten = any(is_in_place(u) and u.args and u.args[0] is n for u in n.users)
        self.values[n.name] = result.clone() if overwritten and isinstance(result, torch.Tensor) else result
        return result


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple:
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.args)


def _localise(
    original: nn.Module, rewritten: fx.GraphModule, args: tuple, kwargs: dict,
    rtol: float | None, atol: float | None,
) -> tuple[str, str] | None:
    from sparsify_fx.frontend.cascade import capture

    try:
        ref_gm = capture(original, args, kwargs, methods=("symbolic_trace",)).graph_module
        ref, out = _Recorder(ref_gm), _Recorder(rewritten)
        with _Modes(ref_gm, rewritten), torch.no_grad():
            ref.run(*_positional(ref_gm, args, kwargs))
            out.run(*_positional(rewritten, args, kwargs))
    except Exception:  # noqa: BLE001 - localisation is best effort
        return None
    for node in rewritten.graph.nodes:
        name = node.meta.get(meta.ORIGIN, node.name)
        if name not in ref.values or node.name not in out.values:
            continue
        r, o = ref.values[name], out.values[node.name]
        if not isinstance(r, torch.Tensor) or not isinstance(o, torch.Tensor):
            continue
        rt, at = (rtol, atol) if rtol is not None and atol is not None else default_tolerances(r.dtype)
        if r.shape != o.shape or not torch.allclose(o.double(), r.double(), rtol=rt, atol=at, equal_nan=True):
            # a node a pass inserted has no counterpart to compare with: when one feeds the
            # diverging node, it is where the divergence starts
            inserted = [i for i in node.all_input_nodes
                        if i.meta.get(meta.ORIGIN, i.name) not in ref.values and i.op != "get_attr"]
            culprit = inserted[0] if inserted else node
            return culprit.format_node(), str(culprit.meta.get(meta.MODULE, node.meta.get(meta.MODULE, "")))
    return None


def _on_meta(original: nn.Module, rewritten: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why a comparison is impossible: a meta tensor has a shape but no values."""
    for what, tensors in (("the original model", [*original.parameters(), *original.buffers()]),
                          ("the rewritten model", [*rewritten.parameters(), *rewritten.buffers()]),
                          ("the example inputs", [*args, *kwargs.values()])):
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            return (f"{what} are on the meta device (shapes, no values): nothing to compare. "
                    "Verify after materialising: fast.to_empty(device='cpu'), load the weights, then "
                    "sfx.verify(model, fast, inputs) with real inputs")
    return None


def verify(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: tuple | list | Any = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_mismatch: bool = True,
) -> VerifyReport:
    """Compare every output of ``rewritten`` with ``original`` in eval mode.

    Both modules are put in eval mode for the check and their modes restored afterwards.
    Tolerances default to :func:`default_tolerances` of each output's dtype.

    Raises:
        VerificationError: on a mismatch (unless ``raise_on_mismatch=False``), naming the
            first node of the rewritten graph whose value diverges.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Linear(4, 4)
        >>> sfx.verify(m, sfx.capture(m).graph_module, (torch.randn(2, 4),)).ok
        True
    """
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if (why := _on_meta(original, rewritten, args, kwargs)) is not None:
        return VerifyReport(ok=True, skipped=why)
    report = VerifyReport(ok=True)
    with _Modes(original, rewritten), torch.no_grad():
        ref = original(*args, **kwargs)
        out = rewritten(*args, **kwargs)
    _compare(ref, out, rtol, atol, report)
    if not report.ok and isinstance(rewritten, fx.GraphModule):
        where = _localise(original, rewritten, args, kwargs, rtol, atol)
        if where is not None:
            report.first_divergence, report.module = where
    if not report.ok and raise_on_mismatch:
        raise VerificationError(
            f"rewritten {type(rewritten).__name__} differs from the original in eval mode: "
            f"{report.summary()}",
            report,
        )
    return report
