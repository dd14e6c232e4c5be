"""The whole model's held bytes, and savings a memory plan shows are not real.

A rewrite's own estimate ("this conv now saves 10 % of its input") is not what the model
holds: when another op's backward keeps the same tensor dense (``relu_3`` keeps its output),
the compressed copy is held *beside* the dense one and the model holds more, not less.
:func:`plan_graphs` runs :func:`memory_plan` on every graph with recorded shapes;
:func:`held_bytes` sums them (the headline of ``sfx.explain``), and :func:`false_savings`
lists each compressed tensor that some other backward still keeps dense, with its holders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch.fx as fx

from sparsify_fx.analysis.memory_plan import MemoryPlan, compressed_bytes_of, memory_plan
from sparsify_fx.graph import meta

__all__ = ["FalseSaving", "plan_graphs", "held_bytes", "false_savings", "holder_kind"]


@dataclass(frozen=True)
class FalseSaving:
    """A tensor a rewrite stores compressed while another backward keeps it dense.

    Attributes:
        graph: qualified name of the graph ('' for the root).
        tensor: the node whose output is held twice.
        module: its module.
        bytes: its dense bytes (None without a recorded shape).
        holders: ``(node, op kind)`` of each node whose backward keeps it dense.
        compressed_by: the op-module nodes keeping a compressed copy.
    """

    graph: str
    tensor: str
    module: str
    bytes: int | None
    holders: tuple[tuple[str, str], ...]
    compressed_by: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "kept by " + ", ".join(f"{h} backward" for h, _ in self.holders)


def plan_graphs(graphs: Mapping[str, fx.GraphModule], rewrites: Iterable = ()) -> dict[str, MemoryPlan]:
    """:func:`memory_plan` of each graph with recorded shapes, with the rewrites' compressed
    bytes; a submodule's graph takes activations (they require grad), the root takes data."""
    compressed = compressed_bytes_of(list(rewrites))
    return {
        prefix: memory_plan(gm, compressed, inputs_require_grad=bool(prefix) or None)
        for prefix, gm in graphs.items()
        if any(meta.SHAPE in n.meta for n in gm.graph.nodes)
    }


def held_bytes(graphs: Mapping[str, fx.GraphModule], rewrites: Iterable = ()) -> int | None:
    """Bytes the backward holds after the forward, dense plus compressed, over every graph with
    recorded shapes; None when no graph has shapes (no example inputs were given)."""
    plans = plan_graphs(graphs, rewrites)
    return sum(p.total_bytes for p in plans.values()) if plans else None


def holder_kind(gm: fx.GraphModule, name: str) -> str:
    """What op node ``name`` runs: a module's class name, a function's or method's name."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return "?"
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def false_savings(graphs: Mapping[str, fx.GraphModule], rewrites: Iterable = (),
                  plans: Mapping[str, MemoryPlan] | None = None) -> list[FalseSaving]:
    """Every tensor stored compressed by a rewrite and still kept dense by another backward,
    largest first: its compressed copy is held in addition to the dense tensor."""
    plans = plan_graphs(graphs, rewrites) if plans is None else plans
    found = []
    for prefix, plan in plans.items():
        gm = graphs[prefix]
        for t in plan.tensors:
            holders = [h for h in t.holders if h not in t.compressed_by]
            if t.compressed_by and holders:
                found.append(FalseSaving(prefix, t.node, t.module, t.bytes,
                                         tuple((h, holder_kind(gm, h)) for h in holders),
                                         tuple(t.compressed_by)))
    return sorted(found, key=lambda f: -(f.bytes or 0))
