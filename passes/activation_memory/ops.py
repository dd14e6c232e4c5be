"""The custom ops of ``ActivationMemory``.

What each op saves, and the gradient error each storage gives, is documented with the pass
(``passes/activation_memory/rewrite.py``); this module is the implementation: the value compression
(bf16 / int8 with per-block scales), then one section per op family, each a
``torch.library.custom_op`` with its fake kernel and autograd formula
(``op_autograd.register_autograd``). The op modules the pass installs, which call these ops
in training and run the exact original op in eval mode or without grad, are in
``passes/activation_memory/modules.py``.

About 680 lines: one custom op per form (its implementation, fake kernel and backward side by
side, as ``torch.library`` registers them) and the value compression they share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sparsify_fx.passes.kernels import cpu as cpu_kernels
from sparsify_fx.passes.kernels import sync
from sparsify_fx.passes.kernels.bf16_matmul import linear_weight_grad
from sparsify_fx.passes.kernels.bitpack import pack_bits, unpack_bits_as
from sparsify_fx.passes.kernels.op_autograd import eager_call, in_backward, owned, register_autograd

__all__ = [
    "NONFINITE_CODE",
    "compress",
    "decompress",
    "bn_payload",
    "bn_backward_from_payload",
    "ln_payload",
    "ln_backward_from_payload",
]

# ---------------------------------------------------------------- value compression


_BF16_MAX = torch.finfo(torch.bfloat16).max
#: int8 code of a non-finite element (codes -127..127 hold finite values); decompressed as NaN
NONFINITE_CODE = -128


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    # float32 values within half a bf16 ulp of float32's maximum round up to inf, which would
    # turn a finite gradient into NaN (gelu_backward(g, inf) is NaN): saturate them. Adding
    # 0 * x adds 0 where x is finite and NaN where it is not, so +-inf is stored as NaN: every
    # backward reading this (GELU / SiLU, whose derivative at +-inf is NaN; normalised
    # tensors, NaN wherever an input is inf) gives the same result. Two passes instead of
    # isinf + where's four (tests/test_numerics.py pins the behaviour). Those passes only
    # matter when the plain cast gives a non-finite value, which one max over the (half-size)
    # result detects: the common case costs a cast and a max instead of clamp, add and cast
    # (the clamp alone was 2 % of a ResMLP-12 training step). Runs on real tensors only:
    # the custom ops call it eagerly under torch.compile too.
    if x.dtype == torch.float32 and (kernels := cpu_kernels.for_strided(x)) is not None:
        return kernels.to_bf16(x)  # the same rules in one pass
    if x.dtype == torch.float32 or x.dtype == torch.float64:
        if sync.sync_free(x.device):  # the check reads a value back: always clamp there instead
            return x.clamp(-_BF16_MAX, _BF16_MAX).add_(x, alpha=0).to(torch.bfloat16)
        y = x.to(torch.bfloat16)
        if y.numel() == 0 or bool(torch.isfinite(y.abs().amax())):
            return y
        x = x.clamp(-_BF16_MAX, _BF16_MAX).add_(x, alpha=0)
    return x.to(torch.bfloat16)


def compress(x: torch.Tensor, storage: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(payload, scale)``: bf16 copy (empty scale), or int8 blocks with fp32 absmax scales.

    Non-finite values propagate: bf16 stores NaN for inf / NaN (and saturates finite values
    beyond its range instead of rounding them to inf); int8 scales each block by its largest *finite*
    magnitude and stores inf / NaN elements as :data:`NONFINITE_CODE`, decompressed as NaN
    (what the dense GELU / SiLU backward gives at +-inf). So one inf in a block neither turns
    its neighbours into NaN nor is it lost.
    """
    x = x.detach()
    if storage == "bf16":
        return _to_bf16(x), x.new_empty(0, dtype=torch.float32)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = F.pad(flat, (0, pad))
    rows = flat.view(-1, block).float()
    scale = rows.abs().nan_to_num_(nan=0.0, posinf=0.0).amax(1, keepdim=True) / 127.0
    # an all-zero block has scale 0; dividing by the tiny clamp keeps it exactly zero
    q = torch.round(rows / scale.clamp_min(1e-30))
    q = q.nan_to_num_(nan=NONFINITE_CODE, posinf=NONFINITE_CODE, neginf=NONFINITE_CODE)
    return q.clamp_(NONFINITE_CODE, 127).to(torch.int8), scale


def decompress(
    payload: torch.Tensor, scale: torch.Tensor, shape: list[int] | torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`compress` (approximate), as a tensor of ``shape`` and ``dtype``."""
    if payload.dtype == torch.bfloat16:
        return payload.to(dtype)
    numel = math.prod(shape)
    values = (payload.float() * scale).masked_fill_(payload == NONFINITE_CODE, float("nan"))
    return values.view(-1)[:numel].view(shape).to(dtype)


def _fake_payload(x: torch.Tensor, storage: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if storage == "bf16":
        return torch.empty_like(x, dtype=torch.bfloat16), x.new_empty(0, dtype=torch.float32)
    n = math.ceil(x.numel() / block)
    return x.new_empty(n, block, dtype=torch.int8), x.new_empty(n, 1, dtype=torch.float32)


def _compressible(x: torch.Tensor, storage: str) -> bool:
    # bf16 storage of a 2-byte input would save nothing and only add error
    return x.is_floating_point() and x.element_size() > (2 if storage == "bf16" else 1)


def _stat_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype:
    """The dtype of the statistics ``native_layer_norm`` / ``native_batch_norm`` return for
    ``x`` beside ``params``, for the fake kernels. PyTorch's own meta kernels give ``x``'s
    dtype, which is wrong twice: accelerators return the accumulation type (fp32 for a
    2-byte ``x``), and the CPU returns fp32 for a 2-byte ``x`` only beside an fp32 parameter
    (its mixed-type path), else ``x``'s dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return x.dtype
    if x.device.type != "cpu" or any(p is not None and p.dtype == torch.float32 for p in params):
        return torch.float32
    return x.dtype


# ---------------------------------------------------------------- ReLU / LeakyReLU


@torch.library.custom_op("sparsify_fx::actmem_relu", mutates_args=())
def _actmem_relu(x: torch.Tensor, negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    # ReLU: where threshold_backward zeroes the gradient (out <= 0; NaN passes through).
    # LeakyReLU: where its slope is 1 (x > 0)
    kernels = cpu_kernels.for_tensors(x) if x.dtype == torch.float32 else None
    if kernels is not None:  # one pass instead of the activation, a compare and the packing
        out, bits = kernels.relu_bits(x, negative_slope)
        return out, bits
    if negative_slope == 0.0:
        out = torch.relu(x)
        return out, pack_bits(out <= 0)
    out = F.leaky_relu(x, negative_slope)
    return out, pack_bits(x > 0)


@_actmem_relu.register_fake
def _(x, negative_slope):
    return torch.empty_like(x), x.new_empty(math.ceil(x.numel() / 8), dtype=torch.uint8)


def _relu_setup(ctx, inputs, output) -> None:
    x, negative_slope = inputs
    ctx.save_for_backward(output[1])
    ctx.shape = list(x.shape)
    ctx.negative_slope = negative_slope


def _relu_backward(ctx, grad_out, _grad_mask):
    (packed,) = in_backward(grad_out, *ctx.saved_tensors)
    kernels = cpu_kernels.for_tensors(grad_out, bits=packed) if grad_out.dtype == torch.float32 else None
    if kernels is not None:  # straight from the bits (set: blocked for ReLU, slope 1 for leaky)
        return kernels.masked_grad(grad_out, packed, ctx.negative_slope), None
    # the dense backward kernels run on a 0/1 stand-in for the saved tensor: they only test
    # it (> 0), so the gradient is bit-identical
    if ctx.negative_slope == 0.0:
        passes = unpack_bits_as(packed, ctx.shape, grad_out.dtype, invert=True)
        return torch.ops.aten.threshold_backward(grad_out, passes, 0), None
    passes = unpack_bits_as(packed, ctx.shape, grad_out.dtype)
    return torch.ops.aten.leaky_relu_backward(grad_out, passes, ctx.negative_slope, False), None


actmem_relu = register_autograd(_actmem_relu, _relu_backward, _relu_setup)


class _ReLUInPlace(torch.autograd.Function):
    """The model's in-place ReLU / LeakyReLU (``nn.ReLU(inplace=True)``), eager only (a
    custom op may not mutate its input): the kernel writes the activation over ``x`` and
    keeps the same 1-bit mask, instead of allocating the output ``actmem_relu`` returns."""

    @staticmethod
    def forward(ctx, x, negative_slope):
        bits = cpu_kernels.load().relu_bits_(x, negative_slope)
        ctx.mark_dirty(x)
        ctx.save_for_backward(bits)
        ctx.shape, ctx.negative_slope = list(x.shape), negative_slope
        ctx.set_materialize_grads(False)
        return x

    @staticmethod
    def backward(ctx, grad):
        return (None if grad is None else _relu_backward(ctx, grad, None)[0]), None


def actmem_relu_(x: torch.Tensor, negative_slope: float) -> torch.Tensor | None:
    """``actmem_relu`` in place over ``x``, where it can run so (an eager, contiguous fp32 CPU
    tensor, the kernels built); else ``None``, and the caller runs ``actmem_relu``."""
    if x.dtype != torch.float32 or not eager_call((x,)) or cpu_kernels.for_tensors(x) is None:
        return None
    return _ReLUInPlace.apply(x, negative_slope)


# ---------------------------------------------------------------- GELU / SiLU


@torch.library.custom_op("sparsify_fx::actmem_gelu", mutates_args=())
def _actmem_gelu(
    x: torch.Tensor, approximate: str, storage: str, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    payload, scale = compress(x, storage, block)
    return F.gelu(x, approximate=approximate), payload, scale


@_actmem_gelu.register_fake
def _(x, approximate, storage, block):
    return (torch.empty_like(x), *_fake_payload(x, storage, block))


@torch.library.custom_op("sparsify_fx::actmem_silu", mutates_args=())
def _actmem_silu(x: torch.Tensor, storage: str, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    payload, scale = compress(x, storage, block)
    return F.silu(x), payload, scale


@_actmem_silu.register_fake
def _(x, storage, block):
    return (torch.empty_like(x), *_fake_payload(x, storage, block))


def _pointwise_setup(ctx, inputs, output) -> None:
    x = inputs[0]
    ctx.save_for_backward(output[1], output[2])
    ctx.shape, ctx.dtype = list(x.shape), x.dtype
    ctx.approximate = inputs[1] if len(inputs) == 4 else None


def _gelu_backward(ctx, grad_out, _g1, _g2):
    payload, scale = in_backward(grad_out, *ctx.saved_tensors)
    x = decompress(payload, scale, ctx.shape, ctx.dtype)
    return torch.ops.aten.gelu_backward(grad_out, x, approximate=ctx.approximate), None, None, None


def _silu_backward(ctx, grad_out, _g1, _g2):
    payload, scale = in_backward(grad_out, *ctx.saved_tensors)
    x = decompress(payload, scale, ctx.shape, ctx.dtype)
    return torch.ops.aten.silu_backward(grad_out, x), None, None


actmem_gelu = register_autograd(_actmem_gelu, _gelu_backward, _pointwise_setup)
actmem_silu = register_autograd(_actmem_silu, _silu_backward, _pointwise_setup)


# ---------------------------------------------------------------- activation -> Linear, recomputed


def _activation(h: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    return F.gelu(h, approximate=approximate) if kind == "gelu" else F.silu(h)


@torch.library.custom_op("sparsify_fx::actmem_act_linear", mutates_args=())
def _actmem_act_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, approximate: str, store: str,
    bf16_mm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # the activation runs in h's dtype and its output is cast to the Linear's, as autocast does
    out = owned(F.linear(_activation(h, kind, approximate).to(weight.dtype), weight, bias))
    # store "bf16": backward reads a bf16 copy of h (exact, or h already 2-byte: a placeholder)
    payload = _to_bf16(h.detach()) if _bf16_copy(h, store) else h.new_empty(0)
    return out, payload


def _bf16_copy(x: torch.Tensor, store: str) -> bool:
    return store == "bf16" and _compressible(x, "bf16")


@_actmem_act_linear.register_fake
def _(h, weight, bias, kind, approximate, store, bf16_mm):
    payload = torch.empty_like(h, dtype=torch.bfloat16) if _bf16_copy(h, store) else h.new_empty(0)
    return h.new_empty((*h.shape[:-1], weight.shape[0]), dtype=weight.dtype), payload


def _act_linear_setup(ctx, inputs, output) -> None:
    h, weight, bias, kind, approximate, store, bf16_mm = inputs
    ctx.save_for_backward(output[1] if _bf16_copy(h, store) else h, weight)
    ctx.kind, ctx.approximate, ctx.has_bias, ctx.dtype = kind, approximate, bias is not None, h.dtype
    ctx.bf16_mm = bf16_mm and _bf16_copy(h, store)


def _act_linear_backward(ctx, grad_y, *_unused):
    h, weight = ctx.saved_tensors
    (h,) = in_backward(grad_y, h)  # the activation is recomputed here, not in forward
    h = h.to(ctx.dtype)  # a bf16 copy (store "bf16") back to the input's dtype
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g = _activation(h, ctx.kind, ctx.approximate).to(weight.dtype)  # the recomputed activation
    grad_h = grad_w = grad_b = None
    if need_w:
        grad_w = (linear_weight_grad(grad_y, g, False, weight.dtype) if ctx.bf16_mm
                  else grad_y.reshape(-1, grad_y.shape[-1]).t() @ g.reshape(-1, g.shape[-1]))
    if need_b and ctx.has_bias:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    if need_h:
        grad_g = (grad_y @ weight).to(h.dtype)
        if ctx.kind == "gelu":
            grad_h = torch.ops.aten.gelu_backward(grad_g, h, approximate=ctx.approximate)
        else:
            grad_h = torch.ops.aten.silu_backward(grad_g, h)
    return grad_h, grad_w, grad_b, None, None, None, None


actmem_act_linear = register_autograd(_actmem_act_linear, _act_linear_backward, _act_linear_setup)


# ---------------------------------------------------------------- BatchNorm


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


# Functional (an op that mutates its inputs cannot have an autograd formula): it updates
# copies of the running stats with the kernel's own in-place update and returns them; the op
# module copies them back, which leaves the buffers bit-identical to nn.BatchNorm's.
@torch.library.custom_op("sparsify_fx::actmem_batch_norm", mutates_args=())
def _actmem_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    storage: str,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    new_mean, new_var = running_mean.clone(), running_var.clone()
    out, mean, invstd = torch.ops.aten.native_batch_norm(
        x, weight, bias, new_mean, new_var, True, momentum, eps
    )
    payload, scale = bn_payload(x, mean, invstd, storage, block)
    return out, payload, scale, mean, invstd, new_mean, new_var


def bn_payload(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, storage: str,
               block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's normalised input ``x_hat`` compressed (:func:`compress`'s ``(payload, scale)``)."""
    kernels = cpu_kernels.for_tensors(x) if storage == "bf16" and x.dtype == torch.float32 else None
    if kernels is not None:  # normalise, saturate and round to bf16 in one pass
        return kernels.normalize_bf16(x.detach(), mean, invstd), x.new_empty(0)
    x_hat = (x.detach() - _channel_view(mean, x.dim())).mul_(_channel_view(invstd, x.dim()))
    return compress(x_hat, storage, block)


@_actmem_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, storage, block):
    # the kernel's own meta for the output's layout (running stats left out: it would update them)
    out = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, momentum, eps)[0]
    stats = x.new_empty(x.shape[1], dtype=_stat_dtype(x, weight, bias, running_mean, running_var))
    return (
        out, *_fake_payload(x, storage, block), stats, torch.empty_like(stats),
        torch.empty_like(running_mean), torch.empty_like(running_var),
    )


def _bn_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs[:3]
    _, payload, scale, _mean, invstd = output[:5]
    ctx.save_for_backward(payload, scale, invstd, weight)
    ctx.shape, ctx.dtype = list(x.shape), x.dtype
    ctx.has_bias = bias is not None


def _bn_backward(ctx, grad_out, *_unused):
    payload, scale, invstd, weight = ctx.saved_tensors
    payload, scale = in_backward(grad_out, payload, scale)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grads = bn_backward_from_payload(grad_out, payload, scale, invstd, weight, ctx.shape, ctx.dtype,
                                     (bool(need_x), bool(need_w and weight is not None),
                                      bool(need_b and ctx.has_bias)))
    return (*grads, None, None, None, None, None, None)


def bn_backward_from_payload(grad_out, payload, scale, invstd, weight, shape, dtype, need):
    """BatchNorm's ``(grad_x, grad_weight, grad_bias)`` (``None`` where ``need`` is False) read
    from a compressed ``x_hat`` (:func:`bn_payload`) and the channel ``invstd``."""
    eff_weight = invstd * weight if weight is not None else invstd
    kernels = None
    if payload.dtype == torch.bfloat16 and dtype == grad_out.dtype == eff_weight.dtype == torch.float32:
        kernels = cpu_kernels.for_tensors(grad_out, payload, eff_weight)
    if kernels is not None:  # two passes over grad and the bf16 x_hat, no fp32 copy of it
        grad_x, grad_w, grad_b = kernels.bn_backward_bf16(grad_out, payload, eff_weight, need[0])
        return tuple(g if n else None for g, n in zip((grad_x, grad_w, grad_b), need))
    x_hat = decompress(payload, scale, shape, dtype)
    # the fused kernel computes x_hat = (input - mean) * invstd and scales grad_x by
    # weight * invstd; feeding it x_hat, mean 0, invstd 1, weight*invstd is the same formula
    # re-centring on the stored x_hat's own channel mean (the kernel subtracts save_mean)
    # keeps sum_c(grad_x) ~ 0 as in dense autograd: a conv bias before BN then gets ~0
    # gradient instead of the bf16 rounding of sum(x_hat)
    dims = [d for d in range(x_hat.dim()) if d != 1]
    centre = x_hat.mean(dims, dtype=invstd.dtype)
    return tuple(torch.ops.aten.native_batch_norm_backward(
        grad_out, x_hat, eff_weight, None, None, centre, torch.ones_like(invstd), True, 0.0, list(need),
    ))


actmem_batch_norm = register_autograd(_actmem_batch_norm, _bn_backward, _bn_setup)


# ---------------------------------------------------------------- LayerNorm


@torch.library.custom_op("sparsify_fx::actmem_layer_norm", mutates_args=())
def _actmem_layer_norm(
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    storage: str,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
    payload, scale = ln_payload(x, mean, rstd, storage, block)
    return out, payload, scale, mean, rstd


def ln_payload(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, storage: str,
               block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm's normalised input ``x_hat`` compressed (:func:`compress`'s ``(payload, scale)``)."""
    kernels = cpu_kernels.for_tensors(x, mean, rstd) if storage == "bf16" and x.dtype == torch.float32 else None
    if kernels is not None and mean.dtype == rstd.dtype == torch.float32 and x.dim() >= 1 and x.shape[-1] > 0:
        # normalise, saturate and round to bf16 in one pass (the statistics are per row of the
        # normalised dims: their width is numel / rows)
        width = x.numel() // max(1, mean.numel())
        return kernels.normalize_rows_bf16(x.detach(), mean, rstd, width), x.new_empty(0)
    return compress((x.detach() - mean).mul_(rstd), storage, block)


@_actmem_layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps, storage, block):
    # the kernel's own meta for the output's layout (contiguous, whatever x's strides are)
    out, mean, _ = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
    stats = mean.new_empty(mean.shape, dtype=_stat_dtype(x, weight, bias))
    return (out, *_fake_payload(x, storage, block), stats, torch.empty_like(stats))


def _ln_setup(ctx, inputs, output) -> None:
    x, normalized_shape, weight, bias = inputs[:4]
    _, payload, scale, _mean, rstd = output
    ctx.save_for_backward(payload, scale, rstd, weight, bias)
    ctx.shape, ctx.dtype = list(x.shape), x.dtype
    ctx.normalized_shape = list(normalized_shape)


def _ln_backward(ctx, grad_out, *_unused):
    payload, scale, rstd, weight, bias = ctx.saved_tensors
    payload, scale = in_backward(grad_out, payload, scale)
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    grad_x, grad_w, grad_b = ln_backward_from_payload(
        grad_out, payload, scale, rstd, weight, bias, ctx.normalized_shape, ctx.shape, ctx.dtype,
        (bool(need_x), bool(need_w and weight is not None), bool(need_b and bias is not None)))
    return grad_x, None, grad_w, grad_b, None, None, None


def ln_backward_from_payload(grad_out, payload, scale, rstd, weight, bias, normalized_shape, shape, dtype, need):
    """LayerNorm's ``(grad_x, grad_weight, grad_bias)`` read from a compressed ``x_hat``
    (:func:`ln_payload`) and the row ``rstd``."""
    return ln_backward_from_x_hat(grad_out, decompress(payload, scale, shape, dtype), rstd, weight, bias,
                                  normalized_shape, need)


def ln_backward_from_x_hat(grad_out, x_hat, rstd, weight, bias, normalized_shape, need):
    """:func:`ln_backward_from_payload` on an ``x_hat`` already decompressed."""
    # with mean 0 and rstd 1 the kernel's x_hat is the stored one; grad_x then lacks only the
    # per-row rstd factor, applied after
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_out, x_hat, list(normalized_shape), torch.zeros_like(rstd), torch.ones_like(rstd), weight, bias,
        list(need),
    )
    if grad_x is not None:
        grad_x = grad_x.mul_(rstd.to(grad_x.dtype))
    return grad_x, grad_w, grad_b


actmem_layer_norm = register_autograd(_actmem_layer_norm, _ln_backward, _ln_setup)


# ---------------------------------------------------------------- LayerNorm -> Linear, recomputed


@torch.library.custom_op("sparsify_fx::actmem_ln_linear", mutates_args=())
def _actmem_ln_linear(
    x: torch.Tensor, normalized_shape: list[int], ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
    eps: float, weight: torch.Tensor, bias: torch.Tensor | None, store: str, bf16_mm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, ln_weight, ln_bias, eps)
    # store "bf16": backward reads a bf16 x_hat instead of x (exact, or x already 2-byte: a placeholder)
    payload = ln_payload(x, mean, rstd, "bf16", 0)[0] if _bf16_copy(x, store) else x.new_empty(0)
    return owned(F.linear(y.to(weight.dtype), weight, bias)), mean, rstd, payload


@_actmem_ln_linear.register_fake
def _(x, normalized_shape, ln_weight, ln_bias, eps, weight, bias, store, bf16_mm):
    rows = list(x.shape[: x.dim() - len(normalized_shape)]) + [1] * len(normalized_shape)
    stat_dtype = _stat_dtype(x, ln_weight, ln_bias)
    payload = torch.empty_like(x, dtype=torch.bfloat16) if _bf16_copy(x, store) else x.new_empty(0)
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype),
            x.new_empty(rows, dtype=stat_dtype), x.new_empty(rows, dtype=stat_dtype), payload)


def _ln_linear_setup(ctx, inputs, output) -> None:
    x, normalized_shape, ln_weight, ln_bias, eps, weight, bias, store, bf16_mm = inputs
    _, mean, rstd, payload = output
    ctx.bf16 = _bf16_copy(x, store)
    ctx.bf16_mm = bf16_mm and ctx.bf16
    # (from x_hat, backward needs no mean)
    ctx.save_for_backward(payload if ctx.bf16 else x, None if ctx.bf16 else mean, rstd, ln_weight, ln_bias, weight)
    ctx.normalized_shape, ctx.has_bias = list(normalized_shape), bias is not None
    ctx.shape, ctx.dtype, ctx.eps = list(x.shape), x.dtype, eps


def _ln_linear_backward(ctx, grad_y, *_unused):
    x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
    x, mean, rstd = in_backward(grad_y, x, mean, rstd)  # the LayerNorm is recomputed here
    need_x, _, need_lw, need_lb, _, need_w, need_b = ctx.needs_input_grad[:7]
    if ctx.bf16:
        # the normalised input from the stored bf16 x_hat (which the LayerNorm's backward reads
        # too, so it stays unchanged): the affine in one op
        x_hat = x.to(ctx.dtype)
        if ln_weight is not None and ln_bias is not None:
            y = torch.addcmul(ln_bias, x_hat, ln_weight)
        else:
            y = x_hat if ln_weight is None else x_hat * ln_weight
            y = y if ln_bias is None else y + ln_bias
    else:
        # the forward's own kernel on the same x: the very tensor the Linear saw, bit for bit
        # (four elementwise ops from the saved statistics rounded differently, and their three
        # temporaries took 0.4 ms more per op at GPT-2-style shapes, 1024 x 384)
        y = torch.ops.aten.native_layer_norm(x, ctx.normalized_shape, ln_weight, ln_bias, ctx.eps)[0]
    y = y.to(weight.dtype)
    grad_w = grad_b = grad_x = grad_lw = grad_lb = None
    if need_w:
        grad_w = (linear_weight_grad(grad_y, y, False, weight.dtype) if ctx.bf16_mm
                  else grad_y.reshape(-1, grad_y.shape[-1]).t() @ y.reshape(-1, y.shape[-1]))
    if need_b and ctx.has_bias:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    if need_x or need_lw or need_lb:
        grad_ln = (grad_y @ weight).to(ctx.dtype)
        need = (bool(need_x), bool(need_lw and ln_weight is not None), bool(need_lb and ln_bias is not None))
        if ctx.bf16:  # from the x_hat upcast above, not a second upcast
            grad_x, grad_lw, grad_lb = ln_backward_from_x_hat(
                grad_ln, x_hat, rstd, ln_weight, ln_bias, ctx.normalized_shape, need)
        else:
            grad_x, grad_lw, grad_lb = torch.ops.aten.native_layer_norm_backward(
                grad_ln, x, ctx.normalized_shape, mean, rstd, ln_weight, ln_bias, list(need))
    return grad_x, None, grad_lw, grad_lb, None, grad_w, grad_b, None, None


actmem_ln_linear = register_autograd(_actmem_ln_linear, _ln_linear_backward, _ln_linear_setup)


# ---------------------------------------------------------------- scale by a parameter


@torch.library.custom_op("sparsify_fx::actmem_scale", mutates_args=())
def _actmem_scale(
    x: torch.Tensor, scale: torch.Tensor, storage: str, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    payload, s = compress(x, storage, block)
    return x * scale, payload, s


@_actmem_scale.register_fake
def _(x, scale, storage, block):
    # the product's meta: its layout follows x's strides (transposed, channels-last)
    return (x * scale, *_fake_payload(x, storage, block))


def _scale_setup(ctx, inputs, output) -> None:
    x, scale = inputs[:2]
    ctx.save_for_backward(output[1], output[2], scale)
    ctx.shape, ctx.dtype = list(x.shape), x.dtype


def _scale_backward(ctx, grad_out, _g1, _g2):
    payload, s, scale = ctx.saved_tensors
    payload, s = in_backward(grad_out, payload, s)
    need_x, need_scale = ctx.needs_input_grad[:2]
    grad_x = grad_scale = None
    if need_x:  # what mul's backward computes: exact
        grad_x = (grad_out * scale).sum_to_size(ctx.shape).to(ctx.dtype)
    if need_scale:
        x = decompress(payload, s, ctx.shape, ctx.dtype)
        grad_scale = (grad_out * x).sum_to_size(scale.shape).to(scale.dtype)
    return grad_x, grad_scale, None, None


actmem_scale = register_autograd(_actmem_scale, _scale_backward, _scale_setup)


# ---------------------------------------------------------------- scaled dot-product attention


#: dtypes the CPU flash-attention kernel (what ``F.scaled_dot_product_attention`` runs on CPU for
#: unmasked, dropout-free 4-D inputs) takes
_FLASH_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def keeps_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_out: bool) -> bool:
    """Whether the attention op keeps its output and log-sum-exp: ``keep_out`` where the CPU
    flash kernel takes the operands (4-D, one head size, unit last stride, non-empty), so its
    backward can read them; elsewhere the attention is re-run in backward. Decided from
    metadata alone, so the real and fake kernels agree."""
    return (keep_out and q.device.type == "cpu" and q.dim() == k.dim() == v.dim() == 4
            and q.dtype in _FLASH_CPU_DTYPES and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and all(t.stride(-1) == 1 and t.shape[-2] > 0 for t in (q, k, v)))


def _flash_cpu_picked(q, k, v, is_causal: bool, scale: float | None) -> bool:
    from torch.nn.attention import SDPBackend

    return torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal, scale=scale) == SDPBackend.FLASH_ATTENTION.value


@torch.library.custom_op("sparsify_fx::actmem_sdpa", mutates_args=())
def _actmem_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
    storage: str, block: int, keep_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    if keeps_attention_output(q, k, v, keep_out):
        # the kernel F.scaled_dot_product_attention picks on CPU, called for its log-sum-exp too
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, scale=scale)
        if not _flash_cpu_picked(q, k, v, is_causal, scale):
            # the dispatcher would run another kernel (an sdpa_kernel context, an unusual shape):
            # its output, so the forward stays the original's bit for bit; the flash
            # kernel's log-sum-exp still serves its backward. Copied into the flash output's
            # layout, which the fake kernel gives (it cannot tell which kernel would run)
            out = out.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale))
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        lse = q.new_empty(0, dtype=torch.float32)
    return (owned(out), lse, *compress(q, storage, block), *compress(k, storage, block),
            *compress(v, storage, block))


@_actmem_sdpa.register_fake
def _(q, k, v, is_causal, scale, storage, block, keep_out):
    # the kernels' own metas: the output (and log-sum-exp) layout follows q's, e.g. GPT-2's
    # [b, seq, heads, dim] memory viewed as [b, heads, seq, dim]
    if keeps_attention_output(q, k, v, keep_out):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        lse = q.new_empty(0, dtype=torch.float32)
    return (out, lse, *_fake_payload(q, storage, block), *_fake_payload(k, storage, block),
            *_fake_payload(v, storage, block))


def _sdpa_setup(ctx, inputs, output) -> None:
    q, k, v, is_causal, scale = inputs[:5]
    ctx.keep_out = output[1].numel() > 0
    # the compressed q, k, v; the output and its log-sum-exp only where the flash backward
    # reads them (the output is usually held anyway, by the projection after it)
    ctx.save_for_backward(*(output[:2] if ctx.keep_out else (None, None)), *output[2:])
    ctx.shapes = [list(q.shape), list(k.shape), list(v.shape)]
    ctx.dtype, ctx.is_causal, ctx.scale = q.dtype, is_causal, scale


def _sdpa_backward(ctx, grad_out, *_unused):
    out, lse, pq, sq, pk, sk, pv, sv = ctx.saved_tensors
    pq, sq, pk, sk, pv, sv = in_backward(grad_out, pq, sq, pk, sk, pv, sv)
    q, k, v = (decompress(p, s, shape, ctx.dtype) for p, s, shape in zip((pq, pk, pv), (sq, sk, sv), ctx.shapes))
    grad_out = grad_out.to(ctx.dtype)
    if ctx.keep_out:
        # the flash backward on the stored q, k, v with the kept output and log-sum-exp: no
        # forward re-run (on GPT-2-style shapes 11 ms per attention instead of 15, dense 11)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, ctx.is_causal, scale=ctx.scale)
        return (*grads, None, None, None, None, None)
    if type(grad_out) is torch.Tensor and not torch.compiler.is_compiling():
        # eager: re-run the attention on the stored q, k, v through the fused kernels and take
        # their gradient (1.5x faster than the formulas below on ViT-B/16's shapes on CPU)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, is_causal=ctx.is_causal, scale=ctx.scale)
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (*grads, None, None, None, None, None)
    # traced (torch.compile's backward sees fake / functional tensors and cannot nest autograd):
    # the math backend's backward, written out, probabilities recomputed from the stored q, k
    scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-2, -1)) * scale
    if ctx.is_causal:
        rows, cols = logits.shape[-2:]
        causal = torch.ones(rows, cols, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    grad_v = probs.transpose(-2, -1) @ grad_out
    grad_probs = grad_out @ v.transpose(-2, -1)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    grad_q = (grad_logits @ k) * scale
    grad_k = (grad_logits.transpose(-2, -1) @ q) * scale
    return grad_q, grad_k, grad_v, None, None, None, None, None


actmem_sdpa = register_autograd(_actmem_sdpa, _sdpa_backward, _sdpa_setup)
