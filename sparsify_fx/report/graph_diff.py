"""The plain-text graph diff of a rewrite (:meth:`ExplainReport.graph_diff`): per module, each
original node a pass replaced (``-``), its op-module call (``+``), and each candidate a pass
left alone with the reason (``~``)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import torch.fx as fx

from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER
from sparsify_fx.infra.pass_base import Rewrite
from sparsify_fx.report.formatting import fmt_bytes as _fmt_bytes
from sparsify_fx.report.formatting import fmt_flops as _fmt_flops

if TYPE_CHECKING:
    from sparsify_fx.report.explain import ExplainReport

__all__ = ["render_graph_diff", "module_order", "rewrite_index", "is_op_call", "target_str", "qualified"]


def _is_op_call(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(OPS_CONTAINER + ".")


def _qualified(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def _target_str(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or str(target)


def _rewrite_index(report: ExplainReport) -> dict[tuple[str, str], Rewrite]:
    """(graph prefix, op-module target) -> the Rewrite that installed it."""
    # op-module targets are unique within one graph only; a rewrite's qualified module
    # name tells which graph it belongs to (the longest matching prefix wins)
    prefixes = sorted(report.graph_modules, key=len, reverse=True)
    index: dict[tuple[str, str], Rewrite] = {}
    for r in report.rewrites:
        for prefix in prefixes:
            if not prefix or r.module == prefix or r.module.startswith(prefix + "."):
                index.setdefault((prefix, r.replacement), r)
                break
    return index


def _module_order(report: ExplainReport) -> list[str]:
    """Qualified module names in graph order (so the diff reads like the model)."""
    order: dict[str, None] = {}
    for prefix, gm in report.graph_modules.items():
        for n in gm.graph.nodes:
            order.setdefault(_qualified(prefix, str(n.meta.get(meta.MODULE, ""))), None)
    return list(order)


def _graph_diff(report: ExplainReport, width: int) -> str:
    nodes: dict[tuple[str, str], fx.Node] = {}
    for prefix, gm in report.graph_modules.items():
        for n in gm.graph.nodes:
            if _is_op_call(n):
                nodes[(prefix, str(n.target))] = n
    by_target = {id(r): key for key, r in _rewrite_index(report).items()}
    changes: dict[str, list[tuple[str, str, str]]] = {}
    for r in report.rewrites:
        key = by_target.get(id(r))
        node = nodes.get(key) if key else None
        if node is not None:
            args = ", ".join(f"%{a.name}" if isinstance(a, fx.Node) else repr(a) for a in node.args)
            plus = f"%{node.name} = {r.replacement}({args})"
        else:
            plus = f"{r.replacement} (replaced again by a later pass)"
        cost = []
        if r.saved_bytes_before is not None or r.saved_bytes_after is not None:
            cost.append(f"saved {_fmt_bytes(r.saved_bytes_before)} -> {_fmt_bytes(r.saved_bytes_after)}")
        if r.flops_before is not None:
            cost.append(f"FLOPs {_fmt_flops(r.flops_before)} -> {_fmt_flops(r.flops_after)}")
        changes.setdefault(r.module, []).extend([
            ("-", f"%{r.node}: {r.op}  [{r.pass_name}]", ""),
            ("+", plus, "; ".join(cost)),
        ])
    for sk in report.skipped:
        changes.setdefault(sk.module or sk.node, []).append(
            ("~", f"%{sk.node}: {sk.op} kept by {sk.pass_name}", sk.reason))
    order = [m for m in _module_order(report) if m in changes]
    order += [m for m in changes if m not in order]

    def wrap(text: str, first: str, rest: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                             break_on_hyphens=False) or [first.rstrip()]

    lines = wrap(
        f"graph diff: {len(report.rewrites)} node(s) replaced, {len(report.skipped)} candidate(s) "
        f"kept, {len(order)} module(s)", "", "  ")
    lines += wrap("- original node   + replacement (op module)   ~ kept, with the reason", "", "  ")
    if not order:
        lines.append("(no rewrites and no skipped candidates)")
    for module in order:
        lines.append("")
        lines += wrap(module or "(root)", "", "  ")
        for sign, text, extra in changes[module]:
            lines += wrap(text, f"  {sign} ", "      ")
            if extra:
                lines += wrap(extra, "      ", "      ")
    return "\n".join(lines) + "\n"


render_graph_diff = _graph_diff
module_order = _module_order
rewrite_index = _rewrite_index
is_op_call = _is_op_call
target_str = _target_str
qualified = _qualified
