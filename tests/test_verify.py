"""Verification: dtype-aware comparison and the first diverging node."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import mlp

import sparsify_fx as sfx


def test_verify_ok_and_modes_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), verify=False)
    model.train()
    report = sfx.verify(model, fast, (torch.randn(8, 4),))
    assert report.ok and report.n_outputs == 1 and report.max_abs_err == 0.0
    assert model.training and model[1].training


def test_first_diverging_node_is_named():
    model = mlp(depth=4)
    x = torch.randn(3, 8)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (x,))
    # corrupt one rewritten op so eval diverges right there
    for node in fast.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("sfx_ops"):
            with fast.graph.inserting_after(node):
                bad = fast.graph.call_function(torch.add, (node, 1.0))
            node.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
            break
    fast.recompile()
    with pytest.raises(sfx.VerificationError) as info:
        sfx.verify(model, fast, (x,))
    report = info.value.report
    assert not report.ok
    assert report.first_divergence.startswith("%add")
    assert "first diverging node" in str(info.value)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        out = self.lin(x)
        out += x
        return out.relu()


def test_divergence_at_an_in_place_op_is_not_pinned_on_the_value_it_overwrites():
    import operator
    model, x = Residual(), torch.randn(3, 4)
    gm = sfx.capture(model).graph_module
    (iadd,) = [n for n in gm.graph.nodes if n.target is operator.iadd]
    with gm.graph.inserting_before(iadd):
        doubled = gm.graph.call_function(torch.mul, (iadd.args[1], 2.0))
    iadd.args = (iadd.args[0], doubled)
    gm.recompile()
    with pytest.raises(sfx.VerificationError) as info:
        sfx.verify(model, gm, (x,))
    # the Linear's own value agrees (compared as it was before += overwrote it): the
    # divergence starts at the inserted node that feeds the +=
    assert info.value.report.first_divergence.startswith("%mul"), info.value.report.first_divergence


def test_structure_and_dtype_mismatch_reported():
    class Two(nn.Module):
        def forward(self, x):
            return x, x * 2

    class One(nn.Module):
        def forward(self, x):
            return (x,)

    report = sfx.verify(Two(), One(), (torch.randn(2),), raise_on_mismatch=False)
    assert not report.ok and "structure" in report.mismatches[0]


def test_default_tolerances_depend_on_dtype():
    assert sfx.verify.__module__  # the function, not the module
    from sparsify_fx.verify import default_tolerances

    assert default_tolerances(torch.bfloat16)[0] > default_tolerances(torch.float32)[0]


def test_explicit_tolerances():
    a = nn.Linear(3, 3)

    class Shifted(nn.Module):
        def forward(self, x):
            return a(x) + 1e-3

    assert sfx.verify(a, Shifted(), (torch.randn(2, 3),), atol=1e-2, rtol=0).ok
    assert not sfx.verify(a, Shifted(), (torch.randn(2, 3),), atol=1e-5, rtol=0,
                          raise_on_mismatch=False).ok


# ---------------------------------------------------------------- outputs holding objects


class _Layer:
    """Stands for a cache layer: tensors held as attributes, plus plain fields."""

    def __init__(self, keys, values):
        self.keys, self.values, self.is_initialized, self.device = keys, values, True, keys.device


class _Cache:
    """Stands for a key/value cache object (compared by identity before: two calls, two objects)."""

    __slots__ = ("layers", "seen")

    def __init__(self, layers):
        self.layers, self.seen = layers, len(layers)


class _Output(dict):
    """Stands for a ``ModelOutput``: a dict with attribute access."""


class CacheModel(nn.Module):
    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.shift = shift

    def forward(self, x):
        k = self.lin(x)
        layers = [_Layer(k, k * 2), _Layer(k * 3, (k * 4) + self.shift)]
        return _Output(logits=k.sum(-1), past_key_values=_Cache(layers))


def test_cache_objects_are_compared_by_the_tensors_they_hold():
    model, x = CacheModel(), torch.randn(2, 4)
    same = CacheModel()
    same.lin = model.lin
    report = sfx.verify(model, same, (x,))
    # logits and 2 layers x (keys, values): every tensor compared, none as an object
    assert report.ok and report.n_outputs == 5


def test_mismatch_inside_a_cache_names_where_it_is():
    model, x = CacheModel(), torch.randn(2, 4)
    shifted = CacheModel(shift=1.0)
    shifted.lin = model.lin
    with pytest.raises(sfx.VerificationError) as info:
        sfx.verify(model, shifted, (x,))
    (mismatch,) = info.value.report.mismatches
    assert mismatch.startswith("output past_key_values.layers[1].values: "), mismatch


def test_cache_of_another_shape_is_a_structure_mismatch():
    class Shorter(CacheModel):
        def forward(self, x):
            out = super().forward(x)
            out["past_key_values"].layers.pop()
            return out

    report = sfx.verify(CacheModel(), Shorter(), (torch.randn(2, 4),), raise_on_mismatch=False)
    assert not report.ok and "structure" in report.mismatches[0]
    assert "past_key_values.layers[1].keys" in report.mismatches[0]


def test_cyclic_and_opaque_objects_do_not_hang_or_mismatch():
    class Node:
        def __init__(self, t):
            self.t, self.me, self.fn = t, None, torch.relu

    class Cyclic(nn.Module):
        def forward(self, x):
            n = Node(x * 2)
            n.me = n  # a cycle
            return n, (lambda: None)

    report = sfx.verify(Cyclic(), Cyclic(), (torch.randn(3),))
    assert report.ok and report.n_outputs == 1
