"""What the core and the passes know about ops, as data: one rule per line.

Every analysis and pass reads its op knowledge here instead of keeping a copy:

* the canonical spelling of each op (:data:`FUNCTION_ALIASES`, :data:`METHOD_ALIASES`), the
  "before -> after" table ``canonicalize`` applies;
* the conv dispatch (:data:`CONV_FUNCTIONS` by spatial rank, :data:`CONV_NDIM` its inverse);
* op categories, each a set of canonical targets (functions), Tensor method names or module
  types: elementwise unary / binary, views, reductions, softmax, norms, pooling.

Categories say what an op *is*; what an analysis does with it (a slice walk's rule, a memory
plan's "kept by backward") stays with the analysis. Where two analyses need different sets,
the table has two named categories, each saying why (e.g. :data:`ELEMENTWISE_UNARY_FUNCTIONS`
against its subset :data:`ZERO_SAFE_UNARY_FUNCTIONS`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FUNCTION_ALIASES",
    "METHOD_ALIASES",
    "CONV_FUNCTIONS",
    "CONV_NDIM",
    "ELEMENTWISE_UNARY_FUNCTIONS",
    "ELEMENTWISE_UNARY_METHODS",
    "NOT_FINITE_AT_ZERO",
    "ZERO_SAFE_UNARY_FUNCTIONS",
    "ZERO_SAFE_UNARY_METHODS",
    "SAME_VALUE_METHODS",
    "ELEMENTWISE_MODULES",
    "ADD_FUNCTIONS",
    "ADD_METHODS",
    "MUL_FUNCTIONS",
    "MUL_METHODS",
    "REDUCE_FUNCTIONS",
    "REDUCE_METHODS",
    "SOFTMAX_FUNCTIONS",
    "SOFTMAX_METHODS",
    "LAYER_NORM_FUNCTIONS",
    "GROUP_NORM_FUNCTIONS",
    "BATCH_NORM_MODULES",
    "LAYER_NORM_MODULES",
    "POOL_FUNCTIONS",
    "POOL_MODULES",
    "VIEW_FUNCTIONS",
    "VIEW_METHODS",
    "is_view",
]

aten = torch.ops.aten

# ---------------------------------------------------------------- canonical spellings

# every spelling -> (canonical target, extra kwargs). A str target is a Tensor method: the node
# becomes ``call_method`` (``aten.view(x, s)`` -> ``x.view(s)``), the spelling symbolic_trace
# and Dynamo give. The aten rows are what ``torch.export`` leaves; arguments keep their
# positions (the signatures agree). Spellings whose arguments change on the way (aten.add's
# alpha, aten.slice -> getitem...) are rules with code, in ``frontend/canonical.py``.
FUNCTION_ALIASES: dict[Any, tuple[Callable | str, dict]] = {
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
    torch.sigmoid: (torch.sigmoid, {}),  # already canonical (listed: the test reads the targets)
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
METHOD_ALIASES: dict[str, tuple[Callable, dict]] = {
    "matmul": (torch.matmul, {}),  # a.matmul(b) -> torch.matmul(a, b)
    "relu": (F.relu, {}),  # x.relu() -> F.relu(x)
    "relu_": (F.relu, {"inplace": True}),  # x.relu_() -> F.relu(x, inplace=True)
}

# ---------------------------------------------------------------- conv dispatch

CONV_FUNCTIONS: dict[int, Callable] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # spatial rank -> op
CONV_NDIM: dict[Callable, int] = {fn: n for n, fn in CONV_FUNCTIONS.items()}  # op -> spatial rank

# ---------------------------------------------------------------- elementwise

# one output element per input element, from that element alone (other arguments scalars):
# a window of the units passes through, and so does any change of width
ELEMENTWISE_UNARY_FUNCTIONS: frozenset = frozenset({
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.mish, F.softplus,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,  # F.sigmoid / F.tanh are other objects
    F.dropout,  # a mask per element
    torch.clamp, torch.abs, torch.rsqrt, torch.sqrt, torch.exp, torch.pow, operator.neg, torch.neg,
    aten.alias.default,  # what torch.export leaves for a no-op view
})
ELEMENTWISE_UNARY_METHODS: frozenset[str] = frozenset({
    "relu", "sigmoid", "tanh", "clamp", "abs", "neg", "exp", "rsqrt", "sqrt", "pow",
})
# value or gradient infinite at 0 (rsqrt(0), d sqrt / dx at 0, pow with a negative or
# fractional exponent): an inert all-zero channel turns into inf / NaN through them
NOT_FINITE_AT_ZERO: frozenset = frozenset({torch.rsqrt, torch.sqrt, torch.pow, "rsqrt", "sqrt", "pow"})
# elementwise and finite at 0: zero channels a widened layer adds stay harmless (IsoFLOP wide)
ZERO_SAFE_UNARY_FUNCTIONS: frozenset = ELEMENTWISE_UNARY_FUNCTIONS - NOT_FINITE_AT_ZERO
ZERO_SAFE_UNARY_METHODS: frozenset[str] = ELEMENTWISE_UNARY_METHODS - NOT_FINITE_AT_ZERO
# the same values, maybe another dtype, layout or autograd history
SAME_VALUE_METHODS: frozenset[str] = frozenset({
    "contiguous", "clone", "detach", "to", "float", "half", "bfloat16",
})
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

# binary, broadcasting: a + b / a - b (the units add up) and a * b / a / b (they scale)
ADD_FUNCTIONS: frozenset = frozenset({
    operator.add, operator.sub, torch.add, torch.sub, operator.iadd, operator.isub,
})
ADD_METHODS: frozenset[str] = frozenset({"add", "sub", "add_", "sub_"})
MUL_FUNCTIONS: frozenset = frozenset({
    operator.mul, operator.truediv, torch.mul, torch.div, operator.imul, operator.itruediv,
})
MUL_METHODS: frozenset[str] = frozenset({"mul", "div", "mul_", "div_"})

# ---------------------------------------------------------------- reductions, softmax, norms

REDUCE_FUNCTIONS: frozenset = frozenset({torch.mean, torch.sum, torch.amax})  # over dims given
REDUCE_METHODS: frozenset[str] = frozenset({"mean", "sum", "amax"})
SOFTMAX_FUNCTIONS: frozenset = frozenset({F.softmax, F.log_softmax, torch.softmax, torch.log_softmax})
SOFTMAX_METHODS: frozenset[str] = frozenset({"softmax", "log_softmax"})
LAYER_NORM_FUNCTIONS: frozenset = frozenset({F.layer_norm, F.rms_norm})  # over the last dims
GROUP_NORM_FUNCTIONS: frozenset = frozenset({F.group_norm})  # over channel groups
BATCH_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # per channel
LAYER_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)  # over the last dims

# ---------------------------------------------------------------- pooling

POOL_FUNCTIONS: frozenset = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
})
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)

# ---------------------------------------------------------------- views

# results that may share their first argument's storage (reshape / flatten view when they
# can; getitem of a tensor or of a chunk's tuple). Holders of a view hold its base.
VIEW_FUNCTIONS: frozenset = frozenset({
    torch.flatten, operator.getitem, torch.transpose, torch.permute, torch.reshape,
    # the functional spellings of the view methods below (symbolic_trace keeps torch.t(x))
    torch.t, torch.unsqueeze, torch.squeeze, torch.chunk, torch.split, torch.unbind,
    torch.narrow, torch.select, torch.unflatten,
})
VIEW_METHODS: frozenset[str] = frozenset({
    "view", "reshape", "flatten", "transpose", "permute", "unflatten", "chunk", "unbind",
    "squeeze", "unsqueeze", "expand", "split", "t", "view_as", "narrow", "select",
})


def is_view(node: fx.Node) -> bool:
    """True when ``node``'s result may share storage with its first argument."""
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    return node.op == "call_function" and node.target in VIEW_FUNCTIONS
