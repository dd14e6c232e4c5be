"""Tuple-unpacking of a tensor, as eager runs it.

``q, k, v = qkv`` on a tensor runs ``qkv.unbind(0)`` in eager mode: one autograd node, whose
backward stacks the three gradients. ``symbolic_trace`` records it as three
``getitem(qkv, i)``: three ``select``s, each of whose backwards zero-fills a tensor of
``qkv``'s full shape and copies its gradient in, and two additions. On a GPT-2-style block on
a 2-core CPU that is +8 ms of a 360 ms step (``docs/benchmarks.md``).
:func:`unbind_unpacking` gives such a graph eager's ``unbind`` back. It runs on the rewritten
graphs, after every pass: the passes' pattern matching keeps reading the ``getitem`` form.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from sparsify_fx.analysis.segments import call_module_by_ref
from sparsify_fx.analysis.shapes import tensor_meta
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import is_in_place
from sparsify_fx.graph.op_table import is_view

__all__ = ["unbind_unpacking"]


def _written_through(item: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether an op might write into ``item`` or a view of it. A view that ``unbind``
    returned cannot be modified in place (autograd raises), one that ``select`` returned can,
    so such an unpacking stays as it is. Modules called by reference (a recomputed segment's
    body) are not looked into: they count as writers."""
    seen, todo = {item}, [item]
    while todo:
        value = todo.pop()
        for user in value.users:
            if is_in_place(user) and user.args and user.args[0] is value:
                return True
            if user.op == "call_module":
                if getattr(gm.get_submodule(str(user.target)), "inplace", False):
                    return True
            elif user.op == "call_function" and user.target is call_module_by_ref:
                return True
            # (contiguous() returns its input itself when it already is contiguous)
            if (is_view(user) or (user.op == "call_method" and user.target == "contiguous")) and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def _unpacked(node: fx.Node) -> list[fx.Node] | None:
    """``node``'s users when they are ``getitem(node, 0..n-1)``, one each, on a tensor whose
    first dimension is ``n`` (what tracing ``a, b, c = tensor`` records); else None."""
    meta = tensor_meta(node)
    if meta is None or not meta[0]:
        return None
    n = meta[0][0]
    items = list(node.users)
    if len(items) != n or n < 2:
        return None
    for item in items:
        if item.op != "call_function" or item.target is not operator.getitem or item.kwargs \
                or len(item.args) != 2 or item.args[0] is not node or type(item.args[1]) is not int:
            return None
    if sorted(item.args[1] for item in items) != list(range(n)):
        return None
    return items


def unbind_unpacking(gm: fx.GraphModule) -> int:
    """Rewrite every tuple-unpacking of a tensor in ``gm`` (not in its submodules) as one
    ``unbind(0)``; returns how many. Values are unchanged, gradients too (a stack of the
    items' gradients instead of a sum of zero-padded ones)."""
    count = 0
    for node in list(gm.graph.nodes):
        items = _unpacked(node)
        if items is None or any(_written_through(item, gm) for item in items):
            continue
        with gm.graph.inserting_after(node):
            unbind = gm.graph.call_method("unbind", (node, 0))
        for key in (meta.MODULE, "nn_module_stack", "stack_trace"):
            if node.meta.get(key) is not None:
                unbind.meta[key] = node.meta[key]
        for item in items:
            item.args = (unbind, item.args[1])
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
