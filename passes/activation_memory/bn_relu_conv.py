"""BatchNorm -> ReLU (or ReLU6) -> Conv as one op whose backward keeps only the BatchNorm's input.

In ``conv -> BN -> ReLU -> conv`` (ResNet's bottleneck and basic block, DenseNet's
``norm -> relu -> conv``, MobileNetV2's ``BN -> ReLU6 -> conv``), autograd keeps two dense
tensors per link: BatchNorm's input ``x``
(for its backward) and the ReLU's output ``r`` (for the ReLU's backward and the next conv's
weight gradient). ``r`` is a per-channel affine map of ``x`` followed by a ReLU, so it can be
rebuilt from ``x`` and the batch statistics in one elementwise pass. This op keeps ``x``, the
per-channel mean and inverse std, and rebuilds ``r`` in backward: the gradients are exact
(the same formulas on the same values; the rebuilt ``r`` is within one rounding of the
forward's, which runs the dense ``aten.native_batch_norm``). It is what
``ActivationMemory(batchnorm="recompute")`` installs, and the 1-bit ReLU mask is not needed
either: the sign of the rebuilt ``r`` is the mask.

Forward is the three dense ops: BatchNorm updates the running statistics (and
``num_batches_tracked``, ``momentum=None`` as a cumulative average) exactly as
``nn.BatchNorm`` does, so the model's outputs and buffers are bit-identical to the original's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sparsify_fx.passes.activation_memory.modules import (
    _bn_factor,
    _channels,
    _check_batch,
    _copy_stats,
    _recording,
    _stat_bytes,
)
from sparsify_fx.passes.activation_memory.ops import (
    _bf16_copy,
    _channel_view,
    _stat_dtype,
    bn_backward_from_payload,
    bn_payload,
)
from sparsify_fx.passes.dropit import conv_forward
from sparsify_fx.passes.kernels import cpu as cpu_kernels
from sparsify_fx.passes.kernels.bf16_matmul import (
    bf16_weight_grad,
    check_weight_grad,
    conv_weight_grad,
)
from sparsify_fx.passes.kernels.op_autograd import in_backward, register_autograd

import sparsify_fx as sfx
from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = ["ActMemBnReLUConv"]


@torch.library.custom_op("sparsify_fx::actmem_bn_relu_conv", mutates_args=())
def _actmem_bn_relu_conv(
    x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    upper: float | None,
    store: str,
    bf16_mm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # a custom op may not mutate an input it does not declare: the running statistics are
    # updated on copies the op module copies back (as ActMemBatchNorm does)
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = torch.ops.aten.native_batch_norm(x, bn_weight, bn_bias, new_mean, new_var, True, momentum, eps)
    # store "bf16": backward reads a bf16 x_hat instead of x (exact, or x already 2-byte: a placeholder)
    payload = bn_payload(x, mean, invstd, "bf16", 0)[0] if _bf16_copy(x, store) else x.new_empty(0)
    r = y.relu_() if upper is None else y.clamp_(0.0, upper)
    out = conv_forward(r.to(weight.dtype), weight, bias, stride, padding, dilation, groups)
    return out, mean, invstd, new_mean, new_var, payload


@_actmem_bn_relu_conv.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, weight, bias, stride, padding, dilation,
      groups, upper, store, bf16_mm):
    # the kernels' own metas for the layout: BatchNorm keeps x's (channels-last stays so) and
    # the convolution follows it (running stats left out: the meta would update them)
    y = torch.ops.aten.native_batch_norm(x, bn_weight, bn_bias, None, None, True, momentum, eps)[0]
    out = conv_forward(y.to(weight.dtype), weight, bias, stride, padding, dilation, groups)
    stats = x.new_empty(x.shape[1], dtype=_stat_dtype(x, bn_weight, bn_bias, running_mean, running_var))
    payload = torch.empty_like(x, dtype=torch.bfloat16) if _bf16_copy(x, store) else x.new_empty(0)
    return (out, stats, torch.empty_like(stats), torch.empty_like(running_mean), torch.empty_like(running_var),
            payload)


def _setup(ctx, inputs, output) -> None:
    (x, bn_weight, bn_bias, _rm, _rv, _momentum, eps, weight, bias, stride, padding, dilation, groups, upper, store,
     bf16_mm) = inputs
    _, mean, invstd = output[:3]
    ctx.bf16 = _bf16_copy(x, store)
    ctx.bf16_mm = bf16_mm and ctx.bf16
    # (from x_hat, backward needs no mean)
    ctx.save_for_backward(output[5] if ctx.bf16 else x, None if ctx.bf16 else mean, invstd, bn_weight, bn_bias, weight)
    ctx.eps, ctx.shape, ctx.dtype = eps, list(x.shape), x.dtype
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.has_bias, ctx.upper = bias is not None, upper


def _rebuilt_relu(x, mean, invstd, bn_weight, bn_bias, upper: float | None) -> torch.Tensor:
    """The ReLU output the conv read: ``relu(x * alpha + beta)`` per channel (clamped to
    ``[0, upper]`` for a ReLU6), the affine form
    the CPU BatchNorm kernel evaluates, in the statistics' precision (fp32 for a bf16 / fp16
    ``x``, as the kernel computes) and rounded to ``x``'s dtype as its output was."""
    alpha = invstd if bn_weight is None else invstd * bn_weight.to(invstd.dtype)
    beta = -mean * alpha if bn_bias is None else bn_bias.to(invstd.dtype) - mean * alpha
    if x.dtype == torch.float32 and (kernels := cpu_kernels.for_tensors(x, alpha, beta)) is not None:
        return kernels.affine_clamp(x, alpha, beta, math.inf if upper is None else upper)  # one pass
    n = x.dim()
    y = torch.addcmul(_channel_view(beta, n), x.to(alpha.dtype), _channel_view(alpha, n))
    y = y.to(x.dtype)
    return y.relu_() if upper is None else y.clamp_(0.0, upper)


def _rebuilt_from_xhat(x_hat, bn_weight, bn_bias, dtype, upper: float | None) -> torch.Tensor:
    """The same from a stored ``x_hat`` (store ``"bf16"``): ``relu(x_hat * weight + bias)``."""
    if dtype == torch.float32:
        c = x_hat.shape[1]
        alpha = x_hat.new_ones(c, dtype=dtype) if bn_weight is None else bn_weight.to(dtype)
        beta = x_hat.new_zeros(c, dtype=dtype) if bn_bias is None else bn_bias.to(dtype)
        if (kernels := cpu_kernels.for_tensors(x_hat, alpha, beta)) is not None:
            return kernels.affine_clamp(x_hat, alpha.detach(), beta.detach(), math.inf if upper is None else upper)
    y = x_hat.to(torch.float32 if dtype != torch.float64 else dtype)
    n = y.dim()
    if bn_weight is not None:
        y = y.mul_(_channel_view(bn_weight.to(y.dtype), n))
    if bn_bias is not None:
        y = y.add_(_channel_view(bn_bias.to(y.dtype), n))
    y = y.to(dtype)
    return y.relu_() if upper is None else y.clamp_(0.0, upper)


def _backward(ctx, grad_out, *_unused):
    saved, mean, invstd, bn_weight, bn_bias, weight = ctx.saved_tensors
    saved, mean, invstd = in_backward(grad_out, saved, mean, invstd)  # the ReLU output is rebuilt here
    need = ctx.needs_input_grad
    need_bn = need[0] or (need[1] and bn_weight is not None) or (need[2] and bn_bias is not None)
    if ctx.bf16:
        r = _rebuilt_from_xhat(saved, bn_weight, bn_bias, ctx.dtype, ctx.upper)
    else:
        r = _rebuilt_relu(saved, mean, invstd, bn_weight, bn_bias, ctx.upper)
    stride, padding, dilation, groups = ctx.conv
    bf16_mm = ctx.bf16_mm and need[7]  # the weight gradient on bf16 operands, apart
    grad_r, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out.contiguous(), r.to(weight.dtype), weight, [weight.shape[0]] if ctx.has_bias else None,
        stride, padding, dilation, False, [0] * len(stride), groups,
        [bool(need_bn), bool(need[7]) and not bf16_mm, bool(need[8] and ctx.has_bias)],
    ) if need_bn or (need[7] and not bf16_mm) or (need[8] and ctx.has_bias) else (None, None, None)
    if bf16_mm:
        grad_w = conv_weight_grad(grad_out, r, weight, ctx.conv)
    grad_x = grad_bw = grad_bb = None
    if need_bn:
        # the activation's own backward kernel, on the rebuilt output (0 < r < upper exactly
        # where 0 < y < upper, so the clamp's mask reads the same from its output)
        grad_r = grad_r.to(ctx.dtype)
        grad_y = (torch.ops.aten.threshold_backward(grad_r, r, 0) if ctx.upper is None
                  else torch.ops.aten.hardtanh_backward(grad_r, r, 0.0, ctx.upper))
        need_bn3 = (bool(need[0]), bool(need[1] and bn_weight is not None), bool(need[2] and bn_bias is not None))
        if ctx.bf16:
            grad_x, grad_bw, grad_bb = bn_backward_from_payload(
                grad_y, saved, saved.new_empty(0, dtype=torch.float32), invstd, bn_weight, ctx.shape, ctx.dtype,
                need_bn3)
        else:
            grad_x, grad_bw, grad_bb = torch.ops.aten.native_batch_norm_backward(
                grad_y, saved, bn_weight, None, None, mean, invstd, True, ctx.eps, list(need_bn3))
    return (grad_x, grad_bw, grad_bb, None, None, None, None, grad_w, grad_b, None, None, None, None, None, None,
            None)


actmem_bn_relu_conv = register_autograd(_actmem_bn_relu_conv, _backward, _setup)


class ActMemBnReLUConv(sfx.OpModule):
    """Parameter-free ``convNd(relu(batch_norm(x)), weight, bias)`` (``hardtanh(., 0, upper)``
    for a ReLU6 when ``upper`` is set) with the original
    modules' tensors: ``forward(x, bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, weight, bias)``. Training with grad keeps only ``x`` (and the channel
    statistics) for backward, or with ``store="bf16"`` only a bf16 copy of the normalised
    ``x_hat`` (approximate gradients, as ``ActMemBatchNorm``'s bf16 storage); eval, ``no_grad``
    and recording off run the three original ops."""

    def __init__(self, momentum: float | None, eps: float, stride, padding, dilation, groups: int,
                 upper: float | None = None, store: str = "exact", weight_grad: str = "auto"):
        super().__init__()
        if store not in ("exact", "bf16"):
            raise ValueError(f"ActMemBnReLUConv: store must be 'exact' or 'bf16', got {store!r}")
        check_weight_grad("ActMemBnReLUConv", weight_grad)
        self.momentum, self.eps, self.upper, self.store = momentum, eps, upper, store
        self.weight_grad = weight_grad
        #: keeps ``x`` itself, dense, unless it stores a bf16 ``x_hat`` (read by sfx memory_plan)
        self.keeps_dense_inputs = store == "exact"
        self.stride, self.padding, self.dilation = [int(s) for s in stride], [int(p) for p in padding], [
            int(d) for d in dilation]
        self.groups = int(groups)

    def stat_bytes(self, shape, dtype: torch.dtype) -> int:
        """What backward keeps beside its input (read by sfx memory_plan): invstd, and mean
        unless it keeps a bf16 ``x_hat``."""
        return _stat_bytes(_channels(shape), dtype, 2 if self.store == "exact" else 1)

    def extra_repr(self) -> str:
        act = "relu" if self.upper is None else f"hardtanh(0, {self.upper})"
        kept = "" if self.store == "exact" else f" from a bf16 x_hat, weight_grad={self.weight_grad}"
        return (f"batch_norm(momentum={self.momentum}, eps={self.eps}) -> {act} -> conv{len(self.stride)}d, "
                f"{act} output recomputed in backward{kept}")

    def _dense(self, y: torch.Tensor, weight, bias) -> torch.Tensor:
        r = F.relu(y) if self.upper is None else F.hardtanh(y, 0.0, self.upper)
        return CONV_FUNCTIONS[len(self.stride)](r, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias=None):
        factor = _bn_factor(self, num_batches_tracked)
        if self.training and _recording(x, bn_weight, bn_bias, weight, bias):
            _check_batch(x)
            with sfx.autocast_region(x.device.type) as cast:
                out, _, _, new_mean, new_var, _ = actmem_bn_relu_conv(
                    x, bn_weight, bn_bias, running_mean, running_var, factor, self.eps, cast(weight), cast(bias),
                    self.stride, self.padding, self.dilation, self.groups, self.upper, self.store,
                    bf16_weight_grad(self.weight_grad, x))
            _copy_stats(running_mean, running_var, new_mean, new_var)
            return out
        y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, self.training, factor, self.eps)
        return self._dense(y, weight, bias)
