"""Canonicalization: whatever captured a model (``symbolic_trace`` with module calls,
``torch.export`` with aten ops, Dynamo with torch functions), :func:`canonicalize` brings the
graph to the one form every pass works on (described in ``sparsify_fx/graph/form.py``, which holds
the helpers that read it):

* every spelling of an op becomes one canonical target (``FUNCTION_ALIASES`` /
  ``METHOD_ALIASES`` of ``sparsify_fx/graph/op_table.py``: the "before -> after" table, plus
  the argument-rewriting rules below);
* stateless layer modules (Linear, ConvNd, activations, unmasked MultiheadAttention) are
  expanded into functional calls on ``get_attr`` parameters, and ``x @ W.T`` against a 2-D
  parameter becomes ``F.linear(x, W)``;
* mode-dependent layers stay modules, and every node gets ``node.meta["sfx_module"]``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.graph import meta
from sparsify_fx.graph.form import _is_parametrized, has_hooks, module_name_of
from sparsify_fx.graph.op_table import CONV_FUNCTIONS, FUNCTION_ALIASES, METHOD_ALIASES

__all__ = ["canonicalize", "CanonicalizeReport"]

aten = torch.ops.aten

_INT64_MAX = 2**63 - 1


def _binary_with_alpha(fn: Callable, torch_fn: Callable) -> Callable:
    def rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
        kwargs = dict(node.kwargs)
        alpha = kwargs.pop("alpha", 1)
        if alpha == 1 and not kwargs and len(node.args) == 2:
            return "call_function", fn, node.args, {}
        return "call_function", torch_fn, node.args, {**kwargs, "alpha": alpha}

    return rule


def _dim_index(dim: int, item: Any) -> tuple:
    """The getitem index that applies ``item`` at ``dim`` (negative dims index from the end)."""
    return (slice(None),) * dim + (item,) if dim >= 0 else (Ellipsis, item) + (slice(None),) * (-dim - 1)


def _slice_rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    dim = node.kwargs.get("dim", 0 if dim is None else dim)
    start, end = node.kwargs.get("start", start), node.kwargs.get("end", end)
    step = node.kwargs.get("step", 1 if step is None else step)
    if not isinstance(dim, int):
        return None
    end = None if isinstance(end, int) and end >= _INT64_MAX else end
    return "call_function", operator.getitem, (x, _dim_index(dim, slice(start, end, None if step == 1 else step))), {}


def _select_rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    x, dim, index = node.args[:3]
    if node.kwargs or not isinstance(dim, int):
        return None
    return "call_function", operator.getitem, (x, _dim_index(dim, index)), {}


def _softmax_rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    if node.target is aten._softmax.default:
        x, dim, half_to_float = node.args[:3]
        return None if half_to_float else ("call_function", F.softmax, (x,), {"dim": dim})
    x, dim = node.args[:2]
    dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    return "call_function", F.softmax, (x,), {"dim": dim, **({"dtype": dtype} if dtype is not None else {})}


def _to_rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    kwargs = dict(node.kwargs)
    if kwargs.pop("layout", None) not in (None, torch.strided) or kwargs.pop("pin_memory", None):
        return None
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if node.target is aten._to_copy.default:
        kwargs["copy"] = True
    return "call_method", "to", node.args[:1], kwargs


def _expand_rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    if node.kwargs.get("implicit", False) or len(node.args) > 2:
        return None
    return "call_method", "expand", node.args[:2], {}


def _layer_norm_rule(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    return "call_function", F.layer_norm, node.args[:5], {k: v for k, v in node.kwargs.items() if k != "cudnn_enable"}


# aten spellings whose arguments change on the way: node -> (op, target, args, kwargs), or
# None for "leave it as it is" (an argument the canonical spelling cannot express).
_FUNCTION_REWRITES: dict[Any, Callable[[fx.Node], tuple[str, Any, tuple, dict] | None]] = {
    aten.add.Tensor: _binary_with_alpha(operator.add, torch.add),  # aten.add(a, b[, alpha]) -> a + b | torch.add
    aten.add.Scalar: _binary_with_alpha(operator.add, torch.add),  # aten.add(a, 1) -> a + 1
    aten.sub.Tensor: _binary_with_alpha(operator.sub, torch.sub),  # aten.sub(a, b[, alpha]) -> a - b | torch.sub
    aten.sub.Scalar: _binary_with_alpha(operator.sub, torch.sub),  # aten.sub(a, 1) -> a - 1
    aten.slice.Tensor: _slice_rule,  # aten.slice(x, d, s, e, k) -> x[:, ..., s:e:k]
    aten.select.int: _select_rule,  # aten.select(x, d, i) -> x[:, ..., i]
    aten.softmax.int: _softmax_rule,  # aten.softmax(x, d, dtype) -> F.softmax(x, dim=d, dtype=dtype)
    aten._softmax.default: _softmax_rule,  # aten._softmax(x, d, False) -> F.softmax(x, dim=d)
    aten.to.dtype_layout: _to_rule,  # aten.to(x, dtype=, layout=strided, device=) -> x.to(dtype=, device=)
    aten._to_copy.default: _to_rule,  # aten._to_copy(x, dtype=, ...) -> x.to(dtype=, ..., copy=True)
    aten.expand.default: _expand_rule,  # aten.expand(x, size) -> x.expand(size)
    aten.layer_norm.default: _layer_norm_rule,  # aten.layer_norm(x, s, w, b, eps, cudnn) -> F.layer_norm(x, s, w, b, eps)
}


def _canonical_call(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    """The canonical ``(op, target, args, kwargs)`` of a call node, or None when it already is."""
    if node.op == "call_function" and node.target in _FUNCTION_REWRITES:
        return _FUNCTION_REWRITES[node.target](node)
    if node.op == "call_function" and node.target in FUNCTION_ALIASES:
        target, extra = FUNCTION_ALIASES[node.target]
        if target is node.target and not extra:
            return None
        op = "call_method" if isinstance(target, str) else "call_function"
        return op, target, node.args, {**node.kwargs, **extra}
    if node.op == "call_method" and node.target in METHOD_ALIASES:
        target, extra = METHOD_ALIASES[node.target]
        return "call_function", target, node.args, {**node.kwargs, **extra}
    return None



def _swaps_two_dims(dims: tuple) -> bool:
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}


# spellings of "the transpose of a 2-D tensor" (after the renames above): (op, target) ->
# does it transpose, given the arguments after the tensor
_TRANSPOSES: dict[tuple[str, Any], Callable[[tuple], bool]] = {
    ("call_function", getattr): lambda rest: rest in (("T",), ("mT",)),  # w.T, w.mT
    ("call_function", torch.t): lambda rest: rest == (),  # torch.t(w)
    ("call_function", aten.numpy_T.default): lambda rest: rest == (),  # what export leaves for w.T
    ("call_function", aten.numpy_T): lambda rest: rest == (),  # and Dynamo (the overload packet)
    ("call_function", torch.transpose): _swaps_two_dims,  # torch.transpose(w, 0, 1)
    ("call_method", "t"): lambda rest: rest == (),  # w.t() (and aten.t)
    ("call_method", "transpose"): _swaps_two_dims,  # w.transpose(0, 1) (and aten.transpose)
    ("call_method", "permute"): lambda rest: _swaps_two_dims(tuple(rest[0]) if len(rest) == 1
                                                             and isinstance(rest[0], (list, tuple)) else rest),
}


def _transposed_parameter(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The ``get_attr`` of a 2-D parameter when ``node`` is its transpose, else None."""
    if not isinstance(node, fx.Node) or node.kwargs or not node.args:
        return None
    weight = node.args[0]
    rule = _TRANSPOSES.get((node.op, node.target))
    if rule is None or not isinstance(weight, fx.Node) or weight.op != "get_attr" or not rule(tuple(node.args[1:])):
        return None
    try:
        return weight if gm.get_parameter(str(weight.target)).dim() == 2 else None
    except AttributeError:
        return None


def _fold_transposed_weights(gm: fx.GraphModule) -> int:
    """``x @ W.T`` against a 2-D parameter (Falcon's linear) -> ``F.linear(x, W)``: the same
    op (aten's linear without bias is ``matmul(x, W.t())``), which the passes know as a dense
    layer. Returns how many were folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.matmul or node.kwargs or len(node.args) != 2:
            continue
        x, transposed = node.args
        weight = _transposed_parameter(gm, transposed)
        if weight is None or not isinstance(x, fx.Node):
            continue
        node.target, node.args = F.linear, (x, weight)
        if not transposed.users:
            gm.graph.erase_node(transposed)
        folded += 1
    return folded


def _input_of(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def _expand_linear(gm: fx.GraphModule, node: fx.Node, mod: nn.Linear) -> fx.Node:
    g = gm.graph
    w = g.get_attr(f"{node.target}.weight")
    b = g.get_attr(f"{node.target}.bias") if mod.bias is not None else None
    return g.call_function(F.linear, (_input_of(node), w, b))


def _expand_conv(gm: fx.GraphModule, node: fx.Node, mod: nn.modules.conv._ConvNd) -> fx.Node:
    g = gm.graph
    n = len(mod.kernel_size)
    fn = CONV_FUNCTIONS[n]
    x = _input_of(node)
    w = g.get_attr(f"{node.target}.weight")
    b = g.get_attr(f"{node.target}.bias") if mod.bias is not None else None
    padding: Any = mod.padding
    if mod.padding_mode != "zeros":
        # the module pads by itself, then convolves with zero padding: do the same
        x = g.call_function(F.pad, (x, tuple(mod._reversed_padding_repeated_twice)), {"mode": mod.padding_mode})
        x.meta[meta.MODULE] = str(node.target)
        padding = (0,) * n
    return g.call_function(fn, (x, w, b, tuple(mod.stride), padding, tuple(mod.dilation), mod.groups))


def _simple(fn: Callable, **fixed: Any) -> Callable:
    def expand(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> fx.Node:
        kwargs = {k: getattr(mod, attr) for k, attr in fixed.items()}
        return gm.graph.call_function(fn, (_input_of(node),), kwargs)

    return expand


# module type -> expansion into its functional form (exact type match: subclasses may
# override forward). before -> after in each line.
_MODULE_EXPANSIONS: dict[type[nn.Module], Callable] = {
    nn.Linear: _expand_linear,  # call_module(Linear) -> F.linear(x, get_attr w, get_attr b)
    nn.Conv1d: _expand_conv,  # call_module(Conv1d) -> [F.pad] + F.conv1d(x, w, b, ...)
    nn.Conv2d: _expand_conv,  # call_module(Conv2d) -> [F.pad] + F.conv2d(x, w, b, ...)
    nn.Conv3d: _expand_conv,  # call_module(Conv3d) -> [F.pad] + F.conv3d(x, w, b, ...)
    nn.ReLU: _simple(F.relu, inplace="inplace"),  # call_module(ReLU) -> F.relu(x, inplace)
    nn.GELU: _simple(F.gelu, approximate="approximate"),  # call_module(GELU) -> F.gelu(x)
    nn.SiLU: _simple(F.silu, inplace="inplace"),  # call_module(SiLU) -> F.silu(x, inplace)
}
# NonDynamicallyQuantizableLinear (used by MultiheadAttention) only renames nn.Linear
_MODULE_EXPANSIONS[nn.modules.linear.NonDynamicallyQuantizableLinear] = _expand_linear


def _mha_expandable(node: fx.Node, mod: nn.MultiheadAttention) -> str | None:
    """None when this MultiheadAttention call can be written as explicit ops, else why not."""
    if mod.dropout > 0:
        return "attention dropout > 0 depends on train/eval"
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        return "separate q/k/v weights, bias_k/bias_v or add_zero_attn"
    q, k, v = (node.args + (None, None, None))[:3]
    if not (isinstance(q, fx.Node) and q is k is v) or node.kwargs.get("key") is not None:
        return "not self-attention (query, key and value differ)"
    if len(node.args) > 3:
        return "masks passed positionally"
    for key in ("key_padding_mask", "attn_mask"):
        if node.kwargs.get(key) is not None:
            return f"{key} given"
    if node.kwargs.get("is_causal"):
        return "is_causal=True"
    for user in node.users:
        is_getitem = user.op == "call_function" and user.target is operator.getitem
        if not is_getitem or (user.args[1] != 0 and user.users):
            return "attention weights (output [1]) are used"
    return None


def _expand_mha(gm: fx.GraphModule, node: fx.Node, mod: nn.MultiheadAttention) -> fx.Node:
    # nn.MultiheadAttention(x, x, x, need_weights=False) ->
    #   linear(in_proj) -> chunk(3) -> heads -> SDPA -> merge heads -> linear(out_proj)
    g, name = gm.graph, str(node.target)
    heads, head_dim = mod.num_heads, mod.head_dim
    x = node.args[0]
    if not mod.batch_first:
        x = g.call_method("transpose", (x, 0, 1))
    w, b = g.get_attr(f"{name}.in_proj_weight"), (
        g.get_attr(f"{name}.in_proj_bias") if mod.in_proj_bias is not None else None)
    qkv = g.call_function(F.linear, (x, w, b))
    chunks = g.call_method("chunk", (qkv, 3, -1))
    per_head = []
    for i in range(3):
        t = g.call_function(operator.getitem, (chunks, i))
        t = g.call_method("unflatten", (t, -1, (heads, head_dim)))
        per_head.append(g.call_method("transpose", (t, 1, 2)))
    attn = g.call_function(F.scaled_dot_product_attention, tuple(per_head))
    merged = g.call_method("flatten", (g.call_method("transpose", (attn, 1, 2)), 2))
    ow = g.get_attr(f"{name}.out_proj.weight")
    ob = g.get_attr(f"{name}.out_proj.bias") if mod.out_proj.bias is not None else None
    out = g.call_function(F.linear, (merged, ow, ob))
    out.meta[meta.MODULE] = f"{name}.out_proj"
    if not mod.batch_first:
        out = g.call_method("transpose", (out, 0, 1))
    return g.call_function(tuple, ([out, None],))


@dataclass
class CanonicalizeReport:
    """What :func:`canonicalize` did: counts of expanded modules / renamed ops, and notes."""

    expanded: int = 0
    renamed: int = 0
    kept_as_modules: list[tuple[str, str]] = field(default_factory=list)


def canonicalize(gm: fx.GraphModule) -> CanonicalizeReport:
    """Bring ``gm`` to the canonical form in place (see the module docstring)."""
    report = CanonicalizeReport()
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_module":
            node.meta.setdefault(meta.MODULE, str(node.target))
            mod = gm.get_submodule(str(node.target))
            expand = _MODULE_EXPANSIONS.get(type(mod))
            if type(mod) is nn.MultiheadAttention:
                why = _mha_expandable(node, mod)
                if why is not None:
                    report.kept_as_modules.append((str(node.target), f"MultiheadAttention kept as a module: {why}"))
                    continue
                expand = _expand_mha
            if expand is None:
                continue
            if has_hooks(mod):
                report.kept_as_modules.append((str(node.target), "has hooks; kept as a module call"))
                continue
            if _is_parametrized(mod):
                report.kept_as_modules.append((str(node.target), "parametrized weight; kept as a module call"))
                continue
            anchor = node.prev
            with g.inserting_before(node):
                new = expand(gm, node, mod)
            created = anchor.next
            while created is not node:
                created.meta.setdefault(meta.MODULE, str(node.target))
                # AOTAutograd joins stack traces as strings: never store None
                if node.meta.get("stack_trace") is not None:
                    created.meta.setdefault("stack_trace", node.meta["stack_trace"])
                if "nn_module_stack" in node.meta:  # block membership (sfx segments) survives
                    created.meta.setdefault("nn_module_stack", node.meta["nn_module_stack"])
                created = created.next
            new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
            new.meta.setdefault(meta.MODULE, str(node.target))
            new.meta[meta.MODULE_TYPE] = type(mod).__name__
            node.replace_all_uses_with(new)
            g.erase_node(node)
            report.expanded += 1
        elif node.op in ("call_function", "call_method"):
            canonical = _canonical_call(node)
            if canonical is not None:
                node.op, node.target, node.args, node.kwargs = canonical
                report.renamed += 1
    report.renamed += _fold_transposed_weights(gm)
    for node in g.nodes:
        if meta.MODULE not in node.meta:
            node.meta[meta.MODULE] = module_name_of(node)
    g.lint()
    gm.recompile()
    return report

