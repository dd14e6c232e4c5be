"""Slice groups: which units of a canonical graph can be narrowed together, and what follows.

A *slice group* is a set of units (output features of a Linear, output channels of a Conv,
whole attention heads, or whole key/value head groups) such that keeping only a contiguous
window of them is a consistent sub-network: the producers' weight rows and biases, every
per-channel op on the way (BatchNorm's affine parameters and running statistics), and the
consumers' weight columns all take the same window, and no other tensor ever sees the
units' dimension.

From each producer, :func:`find_slice_groups` follows the users of its output, tracking
*where* the units are (which dim, counted from the right, and how many elements of that
dim one unit spans) through window-preserving ops: elementwise activations, BatchNorm over
the unit dim, Dropout, pooling, arithmetic with scalars or with tensors that broadcast
over the units (RoPE's cos / sin, an attention mask with one head), reductions and
softmax over other dims, transposes, and reshapes that split or merge the unit dim with
the dims after it (``view(B, T, -1, d)`` puts whole heads at dim 2). Every path must end
in a consumer (a Linear's input features or a Conv's input channels).

Where tensors from two producers meet, the producers join one group and take the same
window: a product (``silu(gate(x)) * up(x)``, SwiGLU), attention
(``scaled_dot_product_attention(q, k, v)``; with grouped-query attention the units are the
key/value head groups, each spanning ``H / KV`` query heads), or a batched matmul over the
head dim. A *sum* with another producer's tensor, or any op with a tensor that does not
carry the window (the residual stream), forbids the group, naming the node
(``node.format_node()``); so do concatenation along the units, reshapes mixing them with
the dims before them, LayerNorm over them, and graph outputs.

Example:
    >>> import torch, sparsify_fx as sfx
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = sfx.capture(m, example_inputs=(torch.randn(2, 8),)).graph_module
    >>> analysis = sfx.find_slice_groups(gm)
    >>> [(g.kind, g.units, [c.weight for c in g.consumers]) for g in analysis.groups]
    [('channels', 16, ['2.weight'])]
"""

from __future__ import annotations

import math

import torch.fx as fx

from sparsify_fx.analysis.slice_group_types import (
    ForbiddenSliceGroup,
    SliceConsumer,
    SliceGroup,
    SliceGroupAnalysis,
    SliceProducer,
)
from sparsify_fx.analysis.slice_walk import (
    _category,
    _Coarsen,
    _dense_kind,
    _Forbid,
    _Graph,
    _upstream_producers,
    _Walk,
)
from sparsify_fx.graph.form import _arg, find_dense_ops, module_name_of

__all__ = [
    "SliceProducer",
    "SliceConsumer",
    "SliceGroup",
    "ForbiddenSliceGroup",
    "SliceGroupAnalysis",
    "find_slice_groups",
]

# where tensors of several producers may meet, and the refusal when one side is not sliced
_MEET_REASONS = {
    "add": "residual add with another tensor (both sides would need the same window)",
    "mul": "binary op with another tensor (both sides would need the same window)",
    "cat": "concatenation mixes the group with other tensors",
    "matmul": "matmul with another tensor (both sides would need the same window)",
    "sdpa": "attention inputs are not sliced with the same heads",
}


class _Producers:
    """Union-find over producers: the ones whose tensors meet take the same window."""

    def __init__(self, nodes: list[fx.Node]):
        self.parent = {n: n for n in nodes}

    def find(self, n: fx.Node) -> fx.Node:
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return self.parent[n]

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(b)] = self.find(a)


def _meet_operands(node: fx.Node, category: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """(operands that must carry the window or broadcast over it, attention masks)."""
    if category == "cat":
        return [a for a in _arg(node, 0, "tensors") if isinstance(a, fx.Node)], []
    if category == "sdpa":
        qkv = [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]
        mask = _arg(node, 3, "attn_mask")
        return [a for a in qkv if isinstance(a, fx.Node)], [mask] if isinstance(mask, fx.Node) else []
    return list(node.all_input_nodes), []


def _module_of(gm: fx.GraphModule, node: fx.Node) -> str:
    return module_name_of(node) or str(_arg(node, 1, "weight").target).rpartition(".")[0]


def _common_module(names: list[str]) -> str:
    """The producer's module, or the innermost module holding several ('' for the graph root)."""
    if len(set(names)) == 1:
        return names[0]
    common = []
    for level in zip(*(n.split(".") for n in names)):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def find_slice_groups(gm: fx.GraphModule) -> SliceGroupAnalysis:
    """Every sliceable group of units in a canonical graph, and every producer that is not.

    Args:
        gm: a canonical ``GraphModule`` (as made by :func:`sparsify_fx.frontend.cascade`). Shapes
            (recorded in ``node.meta["sfx_shape"]``, or export / Dynamo metadata) are needed
            to follow the units through reshapes, transposes, broadcasts and BatchNorm1d /
            pooling / reductions; without them such paths are refused.

    Returns:
        A :class:`SliceGroupAnalysis`: one :class:`SliceGroup` per set of producers whose
        units can be sliced together, one :class:`ForbiddenSliceGroup` (with the reason and
        the node) per Linear / Conv that cannot.
    """
    graph = _Graph(gm)
    analysis = SliceGroupAnalysis()
    early: dict[fx.Node, str] = {}  # producers refused before any walk
    modules: dict[fx.Node, str] = {}
    for op in find_dense_ops(gm)[0]:
        if op.kind == "matmul":  # otherwise this layer would be missing from the report
            modules[op.node] = op.module_name
            early[op.node] = ("weight in the transposed x @ W[in, out] layout (GPT-2 Conv1D / addmm): SliceOut "
                              "slices F.linear and convolutions only")
    producers: list[fx.Node] = []
    for node in gm.graph.nodes:
        kind = _dense_kind(gm, node)
        if kind is None:
            continue
        weight = str(_arg(node, 1, "weight").target)
        if graph.weight_uses[weight] > 1:
            early[node] = str(_Forbid(f"weight {weight} is shared by {graph.weight_uses[weight]} ops", node))
        elif kind == "conv" and int(_arg(node, 6, "groups", 1)) != 1:
            early[node] = str(_Forbid("grouped / depthwise conv producer", node))
        else:
            producers.append(node)

    units: dict[fx.Node, int] = {}  # per producer; a walk starts with one unit per row (per section)
    for _ in range(16):  # each round only lowers unit counts: a few rounds at most
        walks = {p: _run_walk(graph, p, units) for p in producers}
        sets, problems = _join(graph, walks)
        changed = False
        for root in {sets.find(p) for p in producers}:
            members = [p for p in producers if sets.find(p) is root]
            if any(p in problems for p in members):
                continue
            common = math.gcd(*(units[p] for p in members))
            for p in members:
                if units[p] != common:
                    units[p], changed = common, True
        if not changed:
            break

    forbidden: dict[fx.Node, str] = dict(early)
    claimed_consumers: dict[fx.Node, fx.Node] = {}
    groups: list[tuple[fx.Node, SliceGroup]] = []
    roots = list(dict.fromkeys(sets.find(p) for p in producers))
    for root in roots:
        members = [p for p in producers if sets.find(p) is root]
        try:
            group = _build_group(graph, [walks[p] for p in members], problems)
        except _GroupRefused as e:
            forbidden.update(e.reasons)
            continue
        for c in group.consumers:
            if c.node in claimed_consumers:
                forbidden.update({p.node: str(_Forbid("consumes two slice groups", c.node)) for p in group.producers})
                break
            claimed_consumers[c.node] = root
        else:
            groups.append((members[0], group))
    analysis.groups = [g for _, g in sorted(groups, key=lambda item: graph.order[item[0]])]
    for node in sorted(forbidden, key=graph.order.__getitem__):
        module = modules.get(node) or _module_of(gm, node)
        analysis.forbidden.append(ForbiddenSliceGroup(node, module, forbidden[node]))
    return analysis


def _run_walk(graph: _Graph, producer: fx.Node, units: dict[fx.Node, int]) -> _Walk:
    while True:
        walk = _Walk(graph, producer, units.get(producer))
        units[producer] = walk.units
        try:
            walk.run()
        except _Coarsen as e:
            units[producer] = e.units
            continue
        return walk


def _join(graph: _Graph, walks: dict[fx.Node, _Walk]) -> tuple[_Producers, dict[fx.Node, tuple[int, str]]]:
    """Join producers whose tensors meet; collect each producer's first problem (by node order)."""
    gm = graph.gm
    sets = _Producers(list(walks))
    problems: dict[fx.Node, tuple[int, str]] = {}

    def refuse(producer: fx.Node, node: fx.Node, reason: str) -> None:
        if producer not in problems or graph.order[node] < problems[producer][0]:
            problems[producer] = (graph.order[node], reason)

    for p, walk in walks.items():
        if walk.error is not None:
            note = f" (note: {walk.note})" if walk.note else ""
            refuse(p, walk.error.node, f"{walk.error}{note}")
    carried: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
    for p, walk in walks.items():
        for n, d in walk.dims.items():
            carried.setdefault(n, []).append((p, d))
    meets = sorted({m for w in walks.values() for m in w.meets}, key=graph.order.__getitem__)
    for meet in meets:
        category = _category(meet) or "mul"
        operands, masks = _meet_operands(meet, category)
        members = {p for o in operands for p, _ in carried.get(o, ())}
        dims = {d for o in operands for _, d in carried.get(o, ())}
        reason = None
        if not dims:
            continue
        if len(dims) > 1:
            reason = "the operands carry the units at different dims"
        else:
            dim = dims.pop()
            free = [o for o in operands if o not in carried and not graph.broadcasts(o, dim)]
            if free:
                reason = _MEET_REASONS[category]
                if category == "sdpa":
                    feeders = _upstream_producers(gm, free[0])
                    why = [f"{_module_of(gm, f)}: {walks[f].note or walks[f].error.reason}" for f in feeders
                           if f in walks and walks[f].error is not None]
                    reason = f"attention input {free[0].name} is not sliced with the same heads" + (
                        f" ({'; '.join(why)})" if why else "")
            for mask in masks:
                if reason is None and not graph.broadcasts(mask, dim):
                    shape = graph.shape(mask)
                    reason = ("attention mask may carry a head dim" if shape is None else
                              f"attention mask has {shape[dim]} entries along the head dim (it would need the same window)")
            roots = {sets.find(p) for p in members}
            if reason is None and len(roots) > 1 and category in ("add", "cat"):
                reason = _MEET_REASONS[category]
        if reason is not None:
            for p in members:
                refuse(p, meet, f"{reason}: {meet.format_node()}")
            continue
        first, *rest = members
        for p in rest:
            sets.union(first, p)
    return sets, problems


class _GroupRefused(Exception):
    def __init__(self, reasons: dict[fx.Node, str]):
        super().__init__(reasons)
        self.reasons = reasons


def _build_group(graph: _Graph, walks: list[_Walk], problems: dict[fx.Node, tuple[int, str]]) -> SliceGroup:
    gm = graph.gm
    members = [w.producer for w in walks]
    bad = sorted((problems[p][0], p) for p in members if p in problems)
    if bad:
        _, culprit = bad[0]
        shared = f"sliced together with {_module_of(gm, culprit)}, which cannot be: {problems[culprit][1]}"
        raise _GroupRefused({p: problems[p][1] if p in problems else shared for p in members})
    units = walks[0].units
    producers = [SliceProducer(w.producer, w.weight, w.bias, w.offsets, w.section_rows // units) for w in walks]
    consumers: dict[fx.Node, SliceConsumer] = {}
    norms: dict[fx.Node, None] = {}
    passthrough: dict[fx.Node, None] = {}
    resizes: dict[tuple[fx.Node, tuple[int, ...]], None] = {}
    for w in walks:
        consumers.update(w.consumers)
        norms.update(w.norms)
        passthrough.update(dict.fromkeys(w.passthrough))
        resizes.update(w.resizes)
    try:
        if not consumers:
            raise _Forbid("the units reach no consumer", members[0])
        for member in [*producers, *consumers.values()]:
            if graph.weight_uses[member.weight] > 1:
                raise _Forbid(f"weight {member.weight} is shared", member.node)
    except _Forbid as e:
        raise _GroupRefused({p: str(e) for p in members}) from None
    return SliceGroup(
        kind="heads" if any(p.unit_size > 1 for p in producers) else "channels",
        units=units,
        unit_size=producers[0].unit_size,
        module=_common_module([_module_of(gm, p) for p in members]),
        producers=producers,
        consumers=sorted(consumers.values(), key=lambda c: graph.order[c.node]),
        norms=sorted(norms, key=graph.order.__getitem__),
        passthrough=[n for n in sorted(passthrough, key=graph.order.__getitem__) if n not in consumers],
        resizes=sorted(resizes, key=lambda r: graph.order[r[0]]),
    )
