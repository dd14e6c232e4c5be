"""The op table's rules hold together (sparsify_fx/graph/op_table.py)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from sparsify_fx.graph import op_table as t


def _canonical(target) -> bool:
    """A target canonicalize leaves as it is."""
    if isinstance(target, str):
        return target not in t.METHOD_ALIASES
    return t.FUNCTION_ALIASES.get(target, (target, {}))[0] is target


def test_every_alias_maps_to_a_canonical_target():
    for spelling, (target, _) in t.FUNCTION_ALIASES.items():
        assert _canonical(target), f"{spelling} -> {target}, which is renamed again"
    for name, (target, _) in t.METHOD_ALIASES.items():
        assert _canonical(target), f".{name}() -> {target}, which is renamed again"


def test_every_conv_dim_has_a_dispatch_and_its_inverse():
    assert set(t.CONV_FUNCTIONS) == {1, 2, 3}
    assert {fn: n for n, fn in t.CONV_FUNCTIONS.items()} == t.CONV_NDIM
    for n, fn in t.CONV_FUNCTIONS.items():
        assert fn is getattr(F, f"conv{n}d")
        assert t.FUNCTION_ALIASES[getattr(torch, f"conv{n}d")][0] is fn  # torch.convNd -> F.convNd


def test_categories_that_must_not_overlap_do_not():
    functions = {
        "unary": t.ELEMENTWISE_UNARY_FUNCTIONS, "add": t.ADD_FUNCTIONS, "mul": t.MUL_FUNCTIONS,
        "reduce": t.REDUCE_FUNCTIONS, "softmax": t.SOFTMAX_FUNCTIONS, "layer_norm": t.LAYER_NORM_FUNCTIONS,
        "group_norm": t.GROUP_NORM_FUNCTIONS, "pool": t.POOL_FUNCTIONS, "view": t.VIEW_FUNCTIONS,
        "conv": frozenset(t.CONV_NDIM),
    }
    methods = {
        "unary": t.ELEMENTWISE_UNARY_METHODS, "same_value": t.SAME_VALUE_METHODS, "add": t.ADD_METHODS,
        "mul": t.MUL_METHODS, "reduce": t.REDUCE_METHODS, "softmax": t.SOFTMAX_METHODS, "view": t.VIEW_METHODS,
    }
    for table in (functions, methods):
        names = list(table)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not table[a] & table[b], f"{a} and {b} share {table[a] & table[b]}"
    modules = [t.ELEMENTWISE_MODULES, t.BATCH_NORM_MODULES, t.LAYER_NORM_MODULES, t.POOL_MODULES]
    for i, a in enumerate(modules):
        for b in modules[i + 1:]:
            assert not set(a) & set(b)


def test_zero_safe_ops_are_the_elementwise_ones_finite_at_zero():
    assert t.ZERO_SAFE_UNARY_FUNCTIONS < t.ELEMENTWISE_UNARY_FUNCTIONS
    assert t.ZERO_SAFE_UNARY_METHODS < t.ELEMENTWISE_UNARY_METHODS
    x = torch.zeros(4, requires_grad=True)
    for fn in t.ZERO_SAFE_UNARY_FUNCTIONS - {torch.ops.aten.alias.default}:
        y = fn(x, min=-1.0) if fn is torch.clamp else fn(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), fn
        x.grad = None
    x.sqrt().sum().backward()  # what the subset leaves out: infinite gradient at 0
    assert not torch.isfinite(x.grad).all()


def test_every_method_alias_and_category_names_a_tensor_method():
    names = (set(t.METHOD_ALIASES) | t.ELEMENTWISE_UNARY_METHODS | t.SAME_VALUE_METHODS | t.ADD_METHODS
             | t.MUL_METHODS | t.REDUCE_METHODS | t.SOFTMAX_METHODS | t.VIEW_METHODS)
    assert all(hasattr(torch.Tensor, name) for name in names)
    for target, _ in t.FUNCTION_ALIASES.values():
        assert not isinstance(target, str) or hasattr(torch.Tensor, target)


def test_is_view_reads_both_spellings():
    g = fx.Graph()
    x = g.placeholder("x")
    assert t.is_view(g.call_method("transpose", (x, 0, 1)))
    assert t.is_view(g.call_function(torch.unsqueeze, (x, 0)))
    assert t.is_view(g.call_function(operator.getitem, (x, 0)))
    assert not t.is_view(g.call_function(F.relu, (x,)))
    assert not t.is_view(g.call_method("relu", (x,)))


def test_has_hooks_counts_global_hooks():
    layer = nn.Linear(2, 2)
    assert not sfx.graph.form.has_hooks(layer)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert sfx.graph.form.has_hooks(layer)
    finally:
        handle.remove()
    layer.register_full_backward_hook(lambda m, gi, go: None)
    assert sfx.graph.form.has_hooks(layer)
