"""Saved-tensor liveness: which tensors the backward keeps, who keeps them, and in what form.

A compression only frees memory when the compressed copy is the *only* holder of a tensor:
``Conv -> ReLU -> Conv`` with the second conv's input compressed still holds that tensor in
full, because ReLU's backward keeps its output. :func:`memory_plan` answers, per tensor of a
canonical graph: which nodes' backward keep it dense (``"kept by relu_3 backward"``), whether
the recipe freed it, and how many bytes stay held after the forward.

Views share storage (``reshape``, ``transpose``, ``getitem`` of a ``chunk``...), and so does
an in-place op's result (``out += identity``, ``relu(x, inplace=True)``): holders of a
view hold its base, so tensors are grouped by storage with a union-find before counting.
The graph of tensors and holders is a ``networkx.DiGraph`` (``plan.graph``).

Autograd saves nothing where no gradient flows: a tensor requires grad when an input that
requires grad or a trainable parameter feeds it (a model's inputs are data unless said
otherwise), and an op whose output does not require grad keeps nothing (a frozen backbone,
a ``torch.no_grad()`` region of an exported graph). Where it does, an op keeps only what
the gradients it owes need: ``F.linear`` keeps its input only for a trainable weight, ``a * b``
keeps ``a`` only when ``b`` requires grad; a convolution keeps its input whenever it runs
with grad. ``nn.Identity`` returns its input (the same storage), and a torch.nn module whose
class overrides ``forward`` (a BatchNorm that also applies its activation in place) is not
matched by its base class's rule: it is probed (``saved_probe``).

What each op's backward keeps (the rule table, autocast's casts, side bytes) is in
``saved_by_op``; this module holds the liveness pass: the per-node gradient analysis, the
storage and alias walk, and the plan they feed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.analysis.saved_by_op import (
    SAVES,
    autocast_copies,
    is_activation,
    is_trainable,
    kept_by,
    math_attention_bytes,
    runs_math_attention,
    runs_torch_forward,
    side_bytes_of,
)
from sparsify_fx.analysis.saved_probe import probe
from sparsify_fx.analysis.shapes import tensor_bytes, tensor_meta
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER, is_in_place
from sparsify_fx.graph.op_table import is_view

__all__ = ["TensorLiveness", "MemoryPlan", "memory_plan", "compressed_bytes_of", "overwritten_in_place",
           "math_attention_bytes", "SAVES", "requires_grad"]


@dataclass
class TensorLiveness:
    """One tensor (a node's output) and who keeps it for backward."""

    node: str
    module: str
    bytes: int | None
    holders: list[str] = field(default_factory=list)  # nodes whose backward keeps it dense
    compressed_by: list[str] = field(default_factory=list)  # nodes keeping a compressed form
    storage: str = ""  # the node whose storage this tensor shares (itself when not a view)
    is_input: bool = False

    @property
    def held(self) -> bool:
        return bool(self.holders)

    @property
    def reason(self) -> str:
        if self.holders:
            return "kept by " + ", ".join(f"{h} backward" for h in self.holders)
        if self.compressed_by:
            return "freed: only compressed copies (" + ", ".join(self.compressed_by) + ")"
        return "not kept"


@dataclass
class MemoryPlan:
    """Per-tensor liveness of one graph and the bytes the backward holds after the forward.

    ``held_bytes`` counts each held storage once (plus ``side_bytes``: max-pool indices and
    normalisation statistics); ``compressed_bytes`` adds the compressed copies
    the rewritten ops save (from the rewrite records). ``unknown`` lists ops whose backward
    this analysis does not know (assumed to keep their tensor inputs).
    """

    tensors: list[TensorLiveness]
    held_bytes: int
    compressed_bytes: int
    unknown: list[str]
    graph: nx.DiGraph
    side_bytes: dict[str, int] = field(default_factory=dict)  # node -> indices / norm stats kept
    #: each held storage once, by its root node (a view's base; a base that is no tensor, such
    #: as a tuple of outputs, holds its largest member's bytes): what ``held_bytes`` sums
    storage_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.held_bytes + self.compressed_bytes

    def by_node(self) -> dict[str, TensorLiveness]:
        return {t.node: t for t in self.tensors}

    def still_dense(self) -> list[TensorLiveness]:
        """Tensors some backward keeps dense, largest first."""
        return sorted((t for t in self.tensors if t.held), key=lambda t: -(t.bytes or 0))


# modules whose output may be their input's storage (Identity returns its input itself)
_ALIAS_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Flatten, nn.Unflatten)
# grad-mode switches an exported graph records for ``with torch.no_grad()``
_SET_GRAD_ENABLED = {torch._C._set_grad_enabled}
# ops whose result never requires grad, whatever their inputs
_NO_GRAD_METHODS = {"detach", "size", "dim"}
def _aliases_input(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op != "call_module" or str(n.target).startswith(OPS_CONTAINER + "."):
        return False
    mod = gm.get_submodule(str(n.target))
    return isinstance(mod, _ALIAS_MODULES) and runs_torch_forward(mod)


def _placeholder_grad(n: fx.Node, inputs_require_grad: bool | None) -> bool:
    shape = tensor_meta(n)
    if shape is not None and not (shape[1].is_floating_point or shape[1].is_complex):
        return False  # token ids, masks: never differentiable
    if inputs_require_grad is not None:
        return inputs_require_grad
    value = n.meta.get("example_value", n.meta.get("val"))
    # a Dynamo graph's placeholders carry their example (an activation after a graph break
    # requires grad); anything else is the model's own input: data
    return bool(getattr(value, "requires_grad", False))


def requires_grad(gm: fx.GraphModule, inputs_require_grad: bool | None = None) -> dict[str, bool]:
    """Which nodes' outputs require grad in a training forward (node name -> bool).

    Args:
        inputs_require_grad: whether the graph's floating-point inputs require grad; None
            reads a Dynamo graph's example values and otherwise takes them as data (False).
    """
    grad: dict[str, bool] = {}
    enabled = True

    def of(a: fx.Node) -> bool:
        return is_trainable(gm, a) if a.op == "get_attr" else grad.get(a.name, False)

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            grad[n.name] = _placeholder_grad(n, inputs_require_grad)
            continue
        if n.op == "call_function" and n.target in _SET_GRAD_ENABLED:
            enabled = bool(n.args[0]) if n.args else enabled
            grad[n.name] = False
            continue
        if n.op in ("get_attr", "output"):
            grad[n.name] = n.op == "get_attr" and is_trainable(gm, n)
            continue
        shape = tensor_meta(n)
        if not enabled or (n.op == "call_method" and n.target in _NO_GRAD_METHODS) or (
                shape is not None and not (shape[1].is_floating_point or shape[1].is_complex)):
            grad[n.name] = False
            continue
        flows = any(of(a) for a in n.all_input_nodes)
        if not flows and n.op == "call_module":
            flows = any(p.requires_grad for p in gm.get_submodule(str(n.target)).parameters())
        grad[n.name] = flows
    return grad


def _root(parent: dict[str, str], name: str) -> str:
    while parent[name] != name:
        parent[name] = parent[parent[name]]
        name = parent[name]
    return name


def overwritten_in_place(node: fx.Node) -> bool:
    """True when an in-place op writes over ``node``'s value, directly or through a view of
    it (``out.transpose(1, 2).reshape(...)`` then ``+=``): an op that keeps its own output
    for backward cannot be installed there."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.args and u.args[0] is n and is_in_place(u):
                return True
            if is_view(u) and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def compressed_bytes_of(rewrites) -> dict[str, int]:
    """``memory_plan``'s ``compressed_bytes`` from rewrite records (``sfx.Rewrite``): the bytes
    each keeps, under its node's name and its op module's."""
    found: dict[str, int] = {}
    for r in rewrites:
        found[r.node] = r.saved_bytes_after or 0
        if r.replacement:
            found.setdefault(str(r.replacement), r.saved_bytes_after or 0)
    return found


def memory_plan(gm: fx.GraphModule, compressed_bytes: dict[str, int] | None = None, *,
                inputs_require_grad: bool | None = None, autocast: torch.dtype | None = None) -> MemoryPlan:
    """Liveness of every tensor of a canonical graph with recorded shapes.

    Args:
        gm: a canonical GraphModule (from ``sfx.capture`` / ``sfx.sparsify``) whose nodes carry
            ``meta["sfx_shape"]`` (recorded when example inputs were given).
        compressed_bytes: bytes each compressing op node keeps (node name, or its op module's
            target -> bytes); :func:`compressed_bytes_of` reads them from rewrite records.
        inputs_require_grad: whether the graph's floating-point inputs require grad (True for
            a graph of a submodule, whose inputs are activations); None takes a Dynamo graph's
            example values, and otherwise the inputs as data (False).
        autocast: the autocast dtype the training forward runs at (None: the graph's
            ``gm.meta[meta.AUTOCAST]``, set by ``MemoryBudget``; absent: no autocast). Under it,
            Linear / Conv / matmul / attention keep their operands cast to it (a copy of an fp32
            activation per call, one per trainable weight), counted as that node's side bytes.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> fast = sfx.sparsify(m, sfx.DropIT(keep=0.5, skip_first_last=False), (torch.randn(3, 4),))
        >>> [t.reason for t in memory_plan(fast).tensors if t.node == "relu"]
        ['kept by relu backward']
    """
    compressed_bytes = dict(compressed_bytes or {})
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
    parent = {n.name: n.name for n in nodes}
    for n in nodes:
        # an in-place op's result is its first operand's storage, as a view's is its base's
        if (is_view(n) or is_in_place(n) or _aliases_input(n, gm)) and n.args and isinstance(n.args[0], fx.Node) \
                and n.args[0].name in parent:
            parent[_root(parent, n.name)] = _root(parent, n.args[0].name)
    info = {
        n.name: TensorLiveness(n.name, str(n.meta.get(meta.MODULE, "")), tensor_bytes(n),
                               is_input=n.op == "placeholder")
        for n in nodes
    }
    graph = nx.DiGraph()
    unknown: list[str] = []
    compressed_total = 0
    extra = 0
    side_bytes: dict[str, int] = {}
    grad = requires_grad(gm, inputs_require_grad)
    low = autocast if autocast is not None else getattr(gm, "meta", {}).get(meta.AUTOCAST)
    cast_weights: set[str] = set()
    for n in nodes:
        graph.add_node(n.name, module=info[n.name].module, bytes=info[n.name].bytes)
        kept, compresses, known = kept_by(n, gm, grad)
        if not grad.get(n.name, True):
            continue  # no autograd node: no saved tensors, no statistics, no compressed copy
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention \
                and runs_math_attention(n, gm, low):
            kept = []  # its own copies of the operands instead: math_attention_bytes
        if low is not None:
            kept, copies = autocast_copies(n, gm, kept, grad, low, cast_weights)
            if copies:
                side_bytes[n.name] = side_bytes.get(n.name, 0) + copies
                extra += copies
        grads = tuple(grad.get(a.name, True) for a in n.all_input_nodes if a.op != "get_attr")
        if not known and (measured := probe(n, gm, grads)) is not None:
            # an op with no rule, run once on its recorded shapes (saved_probe)
            inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
            kept = [inputs[i] for i in measured.inputs] + ([n] if measured.output else [])
            known = True
            if measured.internal:
                side_bytes[n.name] = side_bytes.get(n.name, 0) + measured.internal
                extra += measured.internal
        if not known:
            unknown.append(n.format_node())
        for t in kept:
            if t.name in info:
                info[t.name].holders.append(n.name)
                graph.add_edge(t.name, n.name, form="dense")
        if compresses:
            for t in n.all_input_nodes:
                if t.name in info and is_activation(t):
                    info[t.name].compressed_by.append(n.name)
                    graph.add_edge(t.name, n.name, form="compressed")
            origin = n.meta.get(meta.ORIGIN, n.name)
            # a fused op replaced its consumer (its origin is the Linear / Conv it now is): its
            # module's name is what its rewrite record names
            found = compressed_bytes.get(n.name, compressed_bytes.get(origin))
            if found is None and n.op == "call_module":
                found = compressed_bytes.get(str(n.target))
            compressed_total += found or 0
        if side := side_bytes_of(n, gm, low):
            side_bytes[n.name] = side_bytes.get(n.name, 0) + side
            extra += side
    # a storage is held when any tensor sharing it is held; count each storage once
    held_storages: dict[str, int] = {}
    for t in info.values():
        t.storage = _root(parent, t.node)
    groups: dict[str, list[TensorLiveness]] = {}
    for t in info.values():
        groups.setdefault(t.storage, []).append(t)
    for root, members in groups.items():
        holders = sorted({h for m in members for h in m.holders})
        if holders:
            base = info[root]
            held_storages[root] = base.bytes or max((m.bytes or 0) for m in members)
            if not base.holders:
                base.holders = holders  # a view's holder holds the base
    return MemoryPlan(list(info.values()), sum(held_storages.values()) + extra, compressed_total,
                      unknown, graph, side_bytes, held_storages)
