"""The canonical graph form every pass works on, and the helpers passes use to read it.

Whatever captured a model (``symbolic_trace`` with module calls, ``torch.export`` with aten
ops, Dynamo with torch functions), :func:`canonicalize` brings the graph to one form:

* **stateless layers are functions**: ``nn.Linear`` / ``nn.ConvNd`` / activation modules and
  every spelling of the same op (``torch._C._nn.linear``, ``aten.linear.default``,
  ``x @ w``, ``x.relu()``) become one canonical ``call_function`` target
  (``F.linear``, ``F.conv2d``, ``torch.matmul``, ``F.relu``...), with parameters as
  ``get_attr`` nodes under their original qualified names;
* **mode-dependent layers are modules**: BatchNorm, Dropout and anything unknown stay (or are
  turned back into) ``call_module`` nodes, so ``train()`` / ``eval()`` keep working;
* every node carries ``node.meta["sfx_module"]``: the qualified name of the module it
  belongs to (used by ``include=`` / ``exclude=`` and by the reports).

A pass then matches one pattern per op: :func:`find_dense_ops` returns every Linear, Conv
and matmul-against-a-parameter as a :class:`DenseOp`, whatever its spelling was.
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

__all__ = [
    "DenseOp",
    "canonicalize",
    "find_dense_ops",
    "install_module",
    "module_name_of",
    "replace_node",
    "OPS_CONTAINER",
    "DENSE_LAYER_TYPES",
]

#: name of the submodule that holds the (parameter-free) op modules passes insert.
OPS_CONTAINER = "sfx_ops"

DENSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

aten = torch.ops.aten

# every spelling -> (canonical target, extra kwargs). "before -> after" is the table itself.
# A str target is a Tensor method: the node becomes ``call_method`` (``aten.view(x, s)`` ->
# ``x.view(s)``), the spelling symbolic_trace and Dynamo give. The aten rows are what
# ``torch.export`` leaves; arguments keep their positions (the signatures agree).
_FUNCTION_ALIASES: dict[Any, tuple[Callable | str, dict]] = {
    torch._C._nn.linear: (F.linear, {}),  # torch._C._nn.linear(x, w, b) -> F.linear(x, w, b)
    aten.linear.default: (F.linear, {}),  # aten.linear(x, w, b) -> F.linear(x, w, b)
    torch.conv1d: (F.conv1d, {}),  # torch.conv1d -> F.conv1d
    torch.conv2d: (F.conv2d, {}),  # torch.conv2d -> F.conv2d
    torch.conv3d: (F.conv3d, {}),  # torch.conv3d -> F.conv3d
    aten.conv1d.default: (F.conv1d, {}),  # aten.conv1d -> F.conv1d
    aten.conv2d.default: (F.conv2d, {}),  # aten.conv2d -> F.conv2d
    aten.conv3d.default: (F.conv3d, {}),  # aten.conv3d -> F.conv3d
    aten.conv1d.padding: (F.conv1d, {}),  # aten.conv1d(x, w, b, s, "same") -> F.conv1d (padding str)
    aten.conv2d.padding: (F.conv2d, {}),  # aten.conv2d(x, w, b, s, "same") -> F.conv2d
    aten.conv3d.padding: (F.conv3d, {}),  # aten.conv3d(x, w, b, s, "same") -> F.conv3d
    operator.matmul: (torch.matmul, {}),  # a @ b -> torch.matmul(a, b)
    aten.matmul.default: (torch.matmul, {}),  # aten.matmul -> torch.matmul
    aten.mm.default: (torch.matmul, {}),  # aten.mm(a, b) -> torch.matmul(a, b)
    torch.mm: (torch.matmul, {}),  # torch.mm(a, b) -> torch.matmul(a, b)
    aten.bmm.default: (torch.bmm, {}),  # aten.bmm(a, b) -> torch.bmm(a, b)
    aten.addmm.default: (torch.addmm, {}),  # aten.addmm -> torch.addmm
    torch.relu: (F.relu, {}),  # torch.relu(x) -> F.relu(x)
    aten.relu.default: (F.relu, {}),  # aten.relu(x) -> F.relu(x)
    torch.relu_: (F.relu, {"inplace": True}),  # torch.relu_(x) -> F.relu(x, inplace=True)
    aten.relu_.default: (F.relu, {"inplace": True}),  # aten.relu_(x) -> F.relu(x, inplace=True)
    aten.gelu.default: (F.gelu, {}),  # aten.gelu(x, approximate) -> F.gelu(x, approximate)
    aten.silu.default: (F.silu, {}),  # aten.silu(x) -> F.silu(x)
    torch.sigmoid: (torch.sigmoid, {}),
    aten.sigmoid.default: (torch.sigmoid, {}),  # aten.sigmoid(x) -> torch.sigmoid(x)
    aten.tanh.default: (torch.tanh, {}),  # aten.tanh(x) -> torch.tanh(x)
    aten.rsqrt.default: (torch.rsqrt, {}),  # aten.rsqrt(x) -> torch.rsqrt(x)
    aten.sqrt.default: (torch.sqrt, {}),  # aten.sqrt(x) -> torch.sqrt(x)
    aten.exp.default: (torch.exp, {}),  # aten.exp(x) -> torch.exp(x)
    aten.neg.default: (operator.neg, {}),  # aten.neg(x) -> -x
    aten.pow.Tensor_Scalar: (torch.pow, {}),  # aten.pow(x, 2) -> torch.pow(x, 2)
    aten.mul.Tensor: (operator.mul, {}),  # aten.mul(a, b) -> a * b
    aten.mul.Scalar: (operator.mul, {}),  # aten.mul(a, 2.0) -> a * 2.0
    aten.div.Tensor: (operator.truediv, {}),  # aten.div(a, b) -> a / b
    aten.div.Scalar: (operator.truediv, {}),  # aten.div(a, 2.0) -> a / 2.0
    aten.mean.dim: (torch.mean, {}),  # aten.mean.dim(x, dims, keepdim) -> torch.mean(x, dims, keepdim)
    aten.sum.dim_IntList: (torch.sum, {}),  # aten.sum.dim_IntList(x, dims, keepdim) -> torch.sum(...)
    aten.cat.default: (torch.cat, {}),  # aten.cat(tensors, dim) -> torch.cat(tensors, dim)
    aten.flatten.using_ints: (torch.flatten, {}),  # aten.flatten(x, s, e) -> torch.flatten(x, s, e)
    aten.scaled_dot_product_attention.default: (F.scaled_dot_product_attention, {}),  # same signature
    aten.view.default: ("view", {}),  # aten.view(x, size) -> x.view(size)
    aten.reshape.default: ("reshape", {}),  # aten.reshape(x, size) -> x.reshape(size)
    aten._unsafe_view.default: ("reshape", {}),  # aten._unsafe_view(x, size) -> x.reshape(size)
    aten.transpose.int: ("transpose", {}),  # aten.transpose(x, a, b) -> x.transpose(a, b)
    aten.permute.default: ("permute", {}),  # aten.permute(x, dims) -> x.permute(dims)
    aten.t.default: ("t", {}),  # aten.t(x) -> x.t()
    aten.unsqueeze.default: ("unsqueeze", {}),  # aten.unsqueeze(x, d) -> x.unsqueeze(d)
    aten.squeeze.dim: ("squeeze", {}),  # aten.squeeze.dim(x, d) -> x.squeeze(d)
    aten.unflatten.int: ("unflatten", {}),  # aten.unflatten(x, d, sizes) -> x.unflatten(d, sizes)
    aten.contiguous.default: ("contiguous", {}),  # aten.contiguous(x) -> x.contiguous()
    aten.clone.default: ("clone", {}),  # aten.clone(x) -> x.clone()
    aten.split.Tensor: ("split", {}),  # aten.split(x, size, dim) -> x.split(size, dim)
    aten.chunk.default: ("chunk", {}),  # aten.chunk(x, n, dim) -> x.chunk(n, dim)
    aten.to.dtype: ("to", {}),  # aten.to.dtype(x, dtype, ...) -> x.to(dtype, ...)
}
_METHOD_ALIASES: dict[str, tuple[Callable, dict]] = {
    "matmul": (torch.matmul, {}),  # a.matmul(b) -> torch.matmul(a, b)
    "relu": (F.relu, {}),  # x.relu() -> F.relu(x)
    "relu_": (F.relu, {"inplace": True}),  # x.relu_() -> F.relu(x, inplace=True)
}

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
    if node.op == "call_function" and node.target in _FUNCTION_ALIASES:
        target, extra = _FUNCTION_ALIASES[node.target]
        if target is node.target and not extra:
            return None
        op = "call_method" if isinstance(target, str) else "call_function"
        return op, target, node.args, {**node.kwargs, **extra}
    if node.op == "call_method" and node.target in _METHOD_ALIASES:
        target, extra = _METHOD_ALIASES[node.target]
        return "call_function", target, node.args, {**node.kwargs, **extra}
    return None


def module_name_of(node: fx.Node) -> str:
    """Qualified name of the module a node belongs to ('' for the root)."""
    name = node.meta.get("sfx_module")
    if name is not None:
        return name
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return _clean_stack_path(path)
    return ""


def _clean_stack_path(path: str) -> str:
    # export/dynamo stacks spell paths like "L__self___layer1_0" or "layer1.0"; keep dotted ones
    if path.startswith("L__self__") or path.startswith("L['self']"):
        return ""
    return path


def _module_type_of(gm: fx.GraphModule, name: str) -> str:
    try:
        return type(gm.get_submodule(name)).__name__ if name else type(gm).__name__
    except AttributeError:
        return ""


@dataclass
class DenseOp:
    """One matmul-like op against a parameter, whatever its spelling was.

    ``kind`` is ``"linear"`` (``F.linear(x, W[out, in], b)``), ``"conv"``
    (``F.convNd(x, W, b, stride, padding, dilation, groups)``) or ``"matmul"``
    (``x @ W[in, out]`` or ``addmm(b, x, W[in, out])``, GPT-2's Conv1D).

    ``input`` / ``weight`` / ``bias`` are read from ``node`` on each access (an earlier rewrite
    may have replaced the node producing the input), so read them *before* ``replace_node``
    erases ``node``: after that they are None.
    """

    node: fx.Node
    kind: str
    _input: fx.Node
    _weight: fx.Node
    _bias: fx.Node | None
    weight_name: str
    module_name: str
    module_type: str
    conv_ndim: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    # operands are read from the node on each access: an earlier rewrite may have replaced
    # the node that produced this op's input
    @property
    def input(self) -> fx.Node:
        return _operands(self.node)[0]

    @property
    def weight(self) -> fx.Node:
        return _operands(self.node)[1]

    @property
    def bias(self) -> fx.Node | None:
        return _operands(self.node)[2]

    @property
    def weight_transposed(self) -> bool:
        """True when the weight is stored ``[in, out]`` (``x @ W``), False for ``[out, in]``."""
        return self.kind == "matmul"

    def conv_padding_ints(self, weight_shape: torch.Size) -> tuple[int, ...] | None:
        """Explicit symmetric padding, or None when ``padding='same'`` needs asymmetric pads."""
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0,) * self.conv_ndim
        pads = []
        for k, d in zip(weight_shape[2:], self.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)


def _operands(node: fx.Node) -> tuple[Any, Any, Any]:
    if node.target is torch.matmul:
        return node.args[0], node.args[1], None
    if node.target is torch.addmm:
        return node.args[1], node.args[2], node.args[0]
    if node.op == "call_function":
        return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return None, None, None


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return (int(value),) * n


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _param_name(gm: fx.GraphModule, node: Any) -> str | None:
    """Qualified parameter name when ``node`` is a get_attr of an nn.Parameter."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        gm.get_parameter(str(node.target))
    except AttributeError:
        return None
    return str(node.target)


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def find_dense_ops(gm: fx.GraphModule) -> tuple[list[DenseOp], list[tuple[fx.Node, str]]]:
    """Every Linear / Conv / matmul-against-a-parameter in a canonical graph.

    Returns ``(ops, unmatched)`` where ``unmatched`` lists matmul-like nodes that are *not*
    against a parameter (activation x activation, e.g. attention scores) with the reason,
    so a pass can report them instead of skipping them silently.
    """
    ops: list[DenseOp] = []
    unmatched: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if str(node.target).startswith(OPS_CONTAINER):
                why = _rewritten_dense_reason(gm, node, mod)
            else:
                why = _opaque_module_reason(mod)
            if why:
                unmatched.append((node, why))
            continue
        if node.op != "call_function":
            continue
        target = node.target
        if target is F.linear or target in _CONV_FUNCS:
            x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
            wname = _param_name(gm, w)
            if wname is None:
                unmatched.append((node, "weight is not a parameter of the model"))
                continue
            if b is not None and _param_name(gm, b) is None:
                unmatched.append((node, "bias is not a parameter of the model"))
                continue
            module = module_name_of(node) or wname.rpartition(".")[0]
            op = DenseOp(node, "linear", x, w, b, wname, module, _module_type_of(gm, module))
            if target in _CONV_FUNCS:
                n = _CONV_FUNCS[target]
                op.kind = "conv"
                op.conv_ndim = n
                op.stride = _tuple(_arg(node, 3, "stride", 1), n)
                padding = _arg(node, 4, "padding", 0)
                op.padding = padding if isinstance(padding, str) else _tuple(padding, n)
                op.dilation = _tuple(_arg(node, 5, "dilation", 1), n)
                op.groups = int(_arg(node, 6, "groups", 1))
            ops.append(op)
        elif target is torch.matmul or target is torch.addmm:
            if target is torch.matmul:
                x, w, b = node.args[0], node.args[1], None
            else:
                b, x, w = node.args[0], node.args[1], node.args[2]
                if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                    unmatched.append((node, "addmm with alpha/beta != 1"))
                    continue
            wname = _param_name(gm, w)
            if wname is None:
                unmatched.append((node, "no operand is a parameter (activation x activation)"))
                continue
            if gm.get_parameter(wname).dim() != 2:
                unmatched.append((node, "parameter operand is not 2-D"))
                continue
            if b is not None and _param_name(gm, b) is None:
                unmatched.append((node, "bias is not a parameter of the model"))
                continue
            module = module_name_of(node) or wname.rpartition(".")[0]
            ops.append(DenseOp(node, "matmul", x, w, b, wname, module, _module_type_of(gm, module)))
    return ops, unmatched


def _rewritten_dense_reason(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> str | None:
    """Why an op module an earlier pass installed in place of a dense op is not a candidate.

    Without it a later pass of the same recipe would say nothing about that layer.
    """
    weights = [a for a in node.all_input_nodes if (name := _param_name(gm, a)) and gm.get_parameter(name).dim() >= 2]
    if weights or any(p.dim() >= 2 for p in mod.parameters()):
        return f"already rewritten by an earlier pass ({type(mod).__name__} at {node.target})"
    return None


def _opaque_module_reason(mod: nn.Module) -> str | None:
    """Why dense layers inside a module kept as one call are out of a pass's reach."""
    dense = [m for m in mod.modules() if isinstance(m, DENSE_LAYER_TYPES)]
    if isinstance(mod, nn.MultiheadAttention):
        return "nn.MultiheadAttention is kept as one module: its projections are not rewritten"
    if isinstance(mod, DENSE_LAYER_TYPES):
        why = "has hooks" if _has_hooks(mod) else "parametrized weight" if _is_parametrized(mod) else "kept as a module"
        return f"{type(mod).__name__} {why}: called as a module, not rewritten"
    if dense:
        return f"{type(mod).__name__} is called as one module: its {len(dense)} dense layer(s) are not rewritten"
    return None


def install_module(gm: fx.GraphModule, name_hint: str, module: nn.Module) -> str:
    """Register ``module`` under ``gm.sfx_ops`` with a unique name; return its call target."""
    container = getattr(gm, OPS_CONTAINER, None)
    if container is None:
        container = nn.Module()
        gm.add_submodule(OPS_CONTAINER, container)
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name_hint) or "op"
    name, i = base, 1
    while hasattr(container, name):
        i += 1
        name = f"{base}_{i}"
    container.add_module(name, module)
    return f"{OPS_CONTAINER}.{name}"


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new``, carry meta over, and erase ``old``."""
    for key, value in old.meta.items():
        new.meta.setdefault(key, value)
    new.meta.setdefault("sfx_origin", old.name)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


# ---------------------------------------------------------------- canonicalization


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
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    x = _input_of(node)
    w = g.get_attr(f"{node.target}.weight")
    b = g.get_attr(f"{node.target}.bias") if mod.bias is not None else None
    padding: Any = mod.padding
    if mod.padding_mode != "zeros":
        # the module pads by itself, then convolves with zero padding: do the same
        x = g.call_function(F.pad, (x, tuple(mod._reversed_padding_repeated_twice)), {"mode": mod.padding_mode})
        x.meta["sfx_module"] = str(node.target)
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
    out.meta["sfx_module"] = f"{name}.out_proj"
    if not mod.batch_first:
        out = g.call_method("transpose", (out, 0, 1))
    return g.call_function(tuple, ([out, None],))


def _has_hooks(mod: nn.Module) -> bool:
    return bool(
        mod._forward_hooks
        or mod._forward_pre_hooks
        or mod._backward_hooks
        or getattr(mod, "_forward_hooks_with_kwargs", None)
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _is_parametrized(mod: nn.Module) -> bool:
    return bool(getattr(mod, "parametrizations", None))


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
            node.meta.setdefault("sfx_module", str(node.target))
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
            if _has_hooks(mod):
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
                created.meta.setdefault("sfx_module", str(node.target))
                # AOTAutograd joins stack traces as strings: never store None
                if node.meta.get("stack_trace") is not None:
                    created.meta.setdefault("stack_trace", node.meta["stack_trace"])
                if "nn_module_stack" in node.meta:  # block membership (sfx segments) survives
                    created.meta.setdefault("nn_module_stack", node.meta["nn_module_stack"])
                created = created.next
            new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
            new.meta.setdefault("sfx_module", str(node.target))
            new.meta["sfx_module_type"] = type(mod).__name__
            node.replace_all_uses_with(new)
            g.erase_node(node)
            report.expanded += 1
        elif node.op in ("call_function", "call_method"):
            canonical = _canonical_call(node)
            if canonical is not None:
                node.op, node.target, node.args, node.kwargs = canonical
                report.renamed += 1
    for node in g.nodes:
        if "sfx_module" not in node.meta:
            node.meta["sfx_module"] = module_name_of(node)
    g.lint()
    gm.recompile()
    return report

