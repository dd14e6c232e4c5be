"""Numerical check of a rewritten module against the original, in eval mode."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from sparsify_fx.errors import VerificationError
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
    """

    ok: bool
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    n_outputs: int = 0
    first_divergence: str | None = None
    module: str | None = None
    mismatches: list[str] = field(default_factory=list)

    def summary(self) -> str:
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


def _compare(ref: Any, out: Any, rtol: float | None, atol: float | None, report: VerifyReport) -> None:
    ref_leaves, ref_spec = tree_flatten(ref)
    out_leaves, out_spec = tree_flatten(out)
    if len(ref_leaves) != len(out_leaves):
        report.ok = False
        report.mismatches.append(f"output structure differs: {ref_spec} vs {out_spec}")
        return
    for i, (r, o) in enumerate(zip(ref_leaves, out_leaves)):
        if not isinstance(r, torch.Tensor):
            if r != o and not (isinstance(o, torch.Tensor)):
                report.ok = False
                report.mismatches.append(f"output {i}: {o!r} != {r!r}")
            continue
        report.n_outputs += 1
        if not isinstance(o, torch.Tensor) or o.shape != r.shape or o.dtype != r.dtype:
            report.ok = False
            report.mismatches.append(f"output {i}: got {_describe(o)}, expected {_describe(r)}")
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
            report.mismatches.append(f"output {i}: {str(e).splitlines()[0]}")


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
        name = node.meta.get("sfx_origin", node.name)
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
                        if i.meta.get("sfx_origin", i.name) not in ref.values and i.op != "get_attr"]
            culprit = inserted[0] if inserted else node
            return culprit.format_node(), str(culprit.meta.get("sfx_module", node.meta.get("sfx_module", "")))
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
