"""Linear / Conv / matmul-against-a-weight keep their input as bf16 for the weight gradient
(``ActivationMemory(dense="bf16")``).

A dense layer's backward reads its input only for ``grad_weight`` (``grad_input`` needs the
weight, not the input). Keeping that input as bf16 halves it at the cost of two casts (one in
forward, one in backward): on a CPU they run at memory bandwidth, where DropIT's selection
(``passes/dropit.py``) costs a sample, a threshold pass, a compaction and an expand. The
forward and ``grad_input`` are the dense op's, bit for bit; ``grad_bias`` is exact.
``grad_weight`` sees the rounded input: with ``|x - bf16(x)| <= 2^-8 |x|``,
``|dgrad_weight| <= 2^-8 * sum|grad_out| * |x|`` element-wise over the summed dimension.
This is the storage mixed-precision training gives every layer; here the forward stays in the
input's precision. With ``weight_grad="auto"`` on a device with bf16 matrix units (or
``"bf16"``) the weight gradient runs on the bf16 input and a bf16 ``grad_out``
(``passes/kernels/bf16_matmul.py``: ``3 * 2^-8 * sum|grad_out| * |x|`` to first order, and 2-4x faster
there).

Saved only when it frees something: a layer whose input is a graph input (the data batch,
held by the caller) is left alone, and under autocast (where the dense op already saves its
input in the autocast dtype) or for an input of 2 bytes or fewer per element the op module
runs the original op.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.dropit import (
    ConvOpModule,
    conv_forward,
    conv_grads,
    dense_call,
    linear_grads,
    saved_input_reason,
)
from sparsify_fx.passes.kernels.bf16_matmul import (
    bf16_weight_grad,
    check_weight_grad,
    conv_weight_grad,
    kernel_details,
    linear_weight_grad,
)
from sparsify_fx.passes.kernels.op_autograd import in_backward, owned, register_autograd

import sparsify_fx as sfx
from sparsify_fx import PassResult, Rewrite

__all__ = ["Bf16InputLinear", "Bf16InputConv", "rewrite_dense_inputs"]


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    # a plain cast: one pass. Unlike ActivationMemory's (which saturates, because GELU's
    # backward at inf is NaN), it rounds |x| beyond bf16's maximum (within half a bf16 ulp of
    # fp32's) to inf; the weight gradient of such an input is not finite in fp32 either
    return x.detach().to(torch.bfloat16)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("sparsify_fx::bf16in_linear", mutates_args=())
def _bf16in_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, bf16_mm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return owned(F.linear(x, weight.t() if transposed else weight, bias)), _to_bf16(x)


@_bf16in_linear.register_fake
def _(x, weight, bias, transposed, bf16_mm):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], out_features), torch.empty_like(x, dtype=torch.bfloat16)


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, transposed, bf16_mm = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.x_dtype, ctx.transposed, ctx.has_bias, ctx.bf16_mm = x.dtype, transposed, bias is not None, bf16_mm


def _linear_backward(ctx, grad_out, _grad_stored):
    stored, weight = ctx.saved_tensors
    (stored,) = in_backward(grad_out, stored)
    if ctx.bf16_mm and ctx.needs_input_grad[1]:
        grad_x, _, grad_b = linear_grads(ctx, grad_out, weight, None, need_weight=False)
        return grad_x, linear_weight_grad(grad_out, stored, ctx.transposed, weight.dtype), grad_b, None, None
    return (*linear_grads(ctx, grad_out, weight, lambda: stored.to(ctx.x_dtype)), None, None)


bf16in_linear = register_autograd(_bf16in_linear, _linear_backward, _linear_setup)


@torch.library.custom_op("sparsify_fx::bf16in_conv", mutates_args=())
def _bf16in_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, bf16_mm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return conv_forward(x, weight, bias, stride, padding, dilation, groups), _to_bf16(x)


@_bf16in_conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, bf16_mm):
    # the convolution's own meta: a channels-last input gives a channels-last output
    out = conv_forward(x, weight, bias, stride, padding, dilation, groups)
    return out, torch.empty_like(x, dtype=torch.bfloat16)


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups, bf16_mm = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.x_dtype, ctx.bf16_mm = x.dtype, bf16_mm
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_sizes = [weight.shape[0]] if bias is not None else None


def _conv_backward(ctx, grad_out, _grad_stored):
    stored, weight = ctx.saved_tensors
    (stored,) = in_backward(grad_out, stored)
    need_w = ctx.needs_input_grad[1]
    if ctx.bf16_mm and need_w:
        grad_x, _, grad_b = conv_grads(ctx, grad_out, weight, stored.new_zeros(stored.shape, dtype=ctx.x_dtype),
                                       need_weight=False)
        return grad_x, conv_weight_grad(grad_out, stored, weight, ctx.conv), grad_b, None, None, None, None, None
    # convolution_backward reads the input only for grad_weight; its shape is all grad_x needs
    x = stored.to(ctx.x_dtype) if need_w else stored.new_zeros(stored.shape, dtype=ctx.x_dtype)
    return (*conv_grads(ctx, grad_out, weight, x), None, None, None, None, None)


bf16in_conv = register_autograd(_bf16in_conv, _conv_backward, _conv_setup)


# ---------------------------------------------------------------- op modules


def _saves_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and weight.requires_grad and x.is_floating_point()
            and x.element_size() > 2 and not torch.is_autocast_enabled(x.device.type))


class Bf16InputLinear(sfx.OpModule):
    """Parameter-free op module: ``forward(x, weight, bias)`` like the op it replaced.

    ``kind`` is the replaced spelling ("linear", "matmul" or "addmm"); eval mode, autocast and
    half-precision inputs run exactly that op. ``weight_grad``: ``passes/kernels/bf16_matmul.py``.
    """

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False
    storage = "bf16"

    def __init__(self, kind: str = "linear", weight_grad: str = "auto"):
        super().__init__()
        check_weight_grad("Bf16InputLinear", weight_grad)
        self.kind, self.weight_grad = kind, weight_grad

    def extra_repr(self) -> str:
        return f"storage=bf16, kind={self.kind}, weight_grad={self.weight_grad}"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training and _saves_bf16(x, weight):
            return bf16in_linear(x, weight, bias, self.kind != "linear", bf16_weight_grad(self.weight_grad, x))[0]
        return dense_call(self.kind, x, weight, bias)


class Bf16InputConv(ConvOpModule):
    """Parameter-free op module: ``forward(x, weight, bias)`` for Conv1d/2d/3d.
    ``weight_grad``: ``passes/kernels/bf16_matmul.py``."""

    storage = "bf16"

    def __init__(self, stride, padding, dilation, groups: int, weight_grad: str = "auto"):
        super().__init__(stride, padding, dilation, groups)
        check_weight_grad("Bf16InputConv", weight_grad)
        self.weight_grad = weight_grad

    def extra_repr(self) -> str:
        return (f"storage=bf16, stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"weight_grad={self.weight_grad}")

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training and _saves_bf16(x, weight):
            return bf16in_conv(
                x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                bf16_weight_grad(self.weight_grad, x))[0]
        return self.dense(x, weight, bias)


# ---------------------------------------------------------------- the rewrite


def rewrite_dense_inputs(gm: fx.GraphModule, config, ctx, result: PassResult) -> None:
    """Replace every dense op ``ctx`` selects with its bf16-input op module (in place).

    Dense ops an earlier pass already rewrote (DropIT, SliceOut...) are not candidates and are
    not reported here: that pass's report names them.
    """
    ops, _ = sfx.find_dense_ops(gm)
    for op in ops:
        qualified = ctx.qualified(op.module_name)
        weight = gm.get_parameter(op.weight_name)
        x = op.input
        reason = ctx.selection_reason(config, op, op.module_name, gm)
        if reason is None and isinstance(x, fx.Node) and x.op == "placeholder":
            reason = "its input is a graph input (held by the caller): a bf16 copy would add memory"
        padding = None
        if reason is None:
            reason, padding = saved_input_reason(op, weight)
        if reason is not None:
            result.skips.append(ctx.skip(op, reason))
            continue
        if op.kind == "conv":
            module: nn.Module = Bf16InputConv(op.stride, padding, op.dilation, op.groups, config.weight_grad)
            op_name = f"conv{op.conv_ndim}d"
        else:
            kind = "addmm" if op.node.target is torch.addmm else op.kind
            module, op_name = Bf16InputLinear(kind, config.weight_grad), kind
        before = sfx.tensor_bytes(x)
        meta = sfx.tensor_meta(x)
        after = None
        if before is not None and meta is not None:
            itemsize = torch.empty((), dtype=meta[1]).element_size()
            after = before // itemsize * 2 if itemsize > 2 else before
        target = sfx.install_module(gm, f"bf16in_{op.module_name or op.node.name}", module)
        with gm.graph.inserting_before(op.node):
            new = gm.graph.call_module(target, (x, op.weight, op.bias))
        origin = op.node.name
        kernel = kernel_details(op.weight) if op.kind == "conv" else {}
        sfx.replace_node(op.node, new)
        result.rewrites.append(Rewrite(
            ctx.pass_name, origin, qualified, op_name, target,
            saved_bytes_before=before, saved_bytes_after=after,
            details={"storage": "bf16", "weight_grad": config.weight_grad, **kernel},
        ))
        result.modified = True
