"""Activation memory: ReLU, GELU/SiLU, BatchNorm and LayerNorm keep a compressed copy of what
their backward needs, so that a dense activation stops having a second holder.

Why a pass of its own: DropIT (``passes/dropit.py``) compresses the input a Linear/Conv saves,
but in ``Conv -> BN -> ReLU -> Conv`` that input is ReLU's output, which ReLU's own backward
keeps, and BatchNorm keeps its input too; in transformers GELU and LayerNorm keep theirs. A
saving only counts when the compressed copy is the *only* holder, so the ops around the dense
layers have to stop holding dense tensors as well. Per op (training mode, grad enabled):

* **ReLU / LeakyReLU** save a packed 1-bit mask (``uint8``, 8 elements per byte) of
  ``out <= 0`` (ReLU, the exact test ``threshold_backward`` makes) or ``x > 0``
  (LeakyReLU). Backward runs the dense kernel (``threshold_backward`` /
  ``leaky_relu_backward``) on the mask unpacked as a 0/1 tensor of where the gradient passes
  (~5x faster on CPU than applying a bool mask); the gradient is bit-identical.
* **GELU / SiLU** save their input as ``bf16`` (or ``int8`` with one fp32 scale per block) and
  call the dense backward kernel (``aten.gelu_backward`` / ``aten.silu_backward``) on the
  decompressed input. Error bound (mean value theorem on ``f'``):
  ``bf16`` (8-bit significand, ``|x - bf16(x)| <= 2^-8 |x|``): ``|dgrad| <= c * |grad_out|``
  with ``c = 2^-8/(1-2^-8) * sup|x f''(x)|`` = 1.3e-3 (GELU, both variants; sup = 0.331) and
  1.2e-3 (SiLU; sup = 0.302);
  ``int8``: ``|dgrad| <= sup|f''| * absmax_block / 254 * |grad_out|`` with
  ``sup|f''|`` = 0.798 (GELU) and 0.5 (SiLU).
* **BatchNorm1d/2d/3d** (training with running stats): the forward is the exact
  ``aten.native_batch_norm`` (running stats updated in place like ``nn.BatchNorm``,
  ``num_batches_tracked`` too, ``momentum=None`` as a cumulative average). It saves the
  normalised input ``x_hat`` compressed, plus per-channel mean / invstd. ``x_hat`` is better
  conditioned than ``x`` (no cancellation when ``|mean| >> std``). Backward is the dense fused
  kernel run on ``x_hat`` with ``mean=0, invstd=1, weight=weight*invstd``, which is the same
  formula. ``grad_bias`` is exact; with ``|x_hat - x_hat_stored| <= 2^-8 |x_hat|`` (bf16):
  ``|dgrad_weight_c| <= 2^-8 * (sum|g x_hat| + sum|g|)`` and, per element,
  ``|dgrad_x| <= 2^-7 * |w| * invstd * (|x_hat| + 1) * (mean_c|g x_hat| + mean_c|g|)``
  (first order; the ``|g|`` and ``+ 1`` terms come from re-centring the stored ``x_hat`` on its
  own channel mean, see ``_bn_backward``, and use ``mean_c|x_hat| <= 1``).
* **LayerNorm** (call_module ``nn.LayerNorm``): the same scheme with per-row mean / rstd,
  ``aten.native_layer_norm`` forward and ``aten.native_layer_norm_backward`` on ``x_hat``
  (no re-centring). bf16, per row, first order with ``gw = g * weight``:
  ``|dgrad_x| <= 2^-7 * rstd * |x_hat| * mean_row|gw x_hat|``;
  ``|dgrad_weight| <= 2^-8 * sum|g x_hat|``; ``grad_bias`` exact.

* **Scale by a parameter** (``alpha * x`` / ``x * gamma`` with a learned per-channel or scalar
  ``alpha``: LayerScale, ResMLP's Affine, ConvNeXt's ``layer_scale``): the dense backward keeps
  ``x`` only for ``alpha``'s gradient. The op saves ``x`` as ``bf16`` (or ``int8``); ``grad_x``
  is exact (``grad_out * alpha``, as dense) and ``grad_alpha = sum(grad_out * x_stored)`` over
  the broadcast dimensions, so ``|dgrad_alpha| <= 2^-8 * sum|grad_out * x|`` (bf16) or
  ``<= absmax_block / 254 * sum|grad_out|`` (int8).

In eval mode, under ``no_grad``, or for inputs that cannot be compressed (half-precision
inputs with ``bf16`` storage), each op module runs the exact original op (``F.relu``,
``F.batch_norm`` with running stats...), so eval outputs are bit-identical.

Op modules have no parameters or buffers: BatchNorm/LayerNorm take their weight, bias and
running stats as graph inputs (``get_attr`` nodes on the original module), so ``state_dict``
keys and parameter sharing are unchanged. The ops are ``torch.library.custom_op`` with
registered autograd and fake kernels.

MaxPool (which keeps its input *and* int64 indices) is not rewritten: in ResNet's stem the
pooled ReLU output stays held by it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from sparsify_fx import ConfigError, PassConfig, PassResult, Rewrite, autocast_region

from . import cpu_kernels, sync
from .bitpack import pack_bits, unpack_bits, unpack_bits_as
from .op_autograd import register_autograd

__all__ = [
    "ActivationMemory",
    "pack_bits",
    "unpack_bits",
    "compress",
    "decompress",
    "GRAD_ERROR_BOUNDS",
    "ActMemReLU",
    "ActMemActivation",
    "ActMemBatchNorm",
    "ActMemLayerNorm",
    "ActMemActLinear",
    "ActMemLnLinear",
    "ActMemScale",
    "ActMemAttention",
]

_STORAGE = ("bf16", "int8", "off")

#: documented gradient-error constants (see the module docstring): for bf16 storage
#: ``|dgrad| <= bound * |grad_out|``; for int8 ``|dgrad| <= bound * absmax_block * |grad_out|``.
GRAD_ERROR_BOUNDS: dict[tuple[str, str], float] = {
    ("gelu", "bf16"): 1.3e-3,
    ("silu", "bf16"): 1.2e-3,
    ("gelu", "int8"): 0.7979 / 254,
    ("silu", "int8"): 0.5 / 254,
}


@dataclass(frozen=True)
class ActivationMemory(PassConfig):
    """Make activations and norms keep compressed copies of what their backward needs.

    Args:
        relu: ``"bitmask"`` (1 bit per element, exact gradient) or ``"off"``; applies to
            ReLU and LeakyReLU.
        gelu: how GELU stores its input: ``"bf16"``, ``"int8"`` (per-block absmax scale)
            or ``"off"``; or ``"recompute"``: a GELU whose only consumer is a Linear is fused
            with it, and the pair keeps only the GELU's input (the GELU output the Linear
            would keep is recomputed in backward: exact gradients, one GELU per step extra).
        silu: the same for SiLU.
        batchnorm: how BatchNorm stores its normalised input ``x_hat``: ``"bf16"``,
            ``"int8"`` or ``"off"``.
        layernorm: the same for LayerNorm; ``"recompute"`` fuses a LayerNorm whose only
            consumer is a Linear with it and recomputes the normalised tensor in backward
            (exact; the pair keeps the LayerNorm's input and its row statistics).
        scale: how a multiplication by a learned parameter (LayerScale, ResMLP's Affine)
            stores its activation operand for the parameter's gradient: ``"bf16"``,
            ``"int8"`` or ``"off"``.
        attention: ``scaled_dot_product_attention`` without a mask or dropout keeps q, k, v
            as ``"bf16"`` / ``"int8"`` instead of q, k, v *and* its output in full precision,
            and recomputes the attention probabilities in backward (approximate: the
            gradients see the rounded q, k, v). ``"off"`` (the default) leaves it dense.
        dense: ``"bf16"``: Linear / Conv / matmul-against-a-weight keep their input as bf16
            for the weight gradient (``passes/dense_storage.py``; forward and input gradient
            exact, the weight gradient sees the rounded input); ``"off"`` (the default).
            Dense ops an earlier pass rewrote (DropIT) are left to it.
        block_size: elements per int8 scale block, 16..65536.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                         torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> fast = sfx.sparsify(m, sfx.ActivationMemory(), example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> sorted(r.op for r in sfx.explain(fast).rewrites)
        ['batch_norm', 'relu']
    """

    relu: str = "bitmask"
    gelu: str = "bf16"
    silu: str = "bf16"
    batchnorm: str = "bf16"
    layernorm: str = "bf16"
    scale: str = "bf16"
    attention: str = "off"
    dense: str = "off"
    block_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relu not in ("bitmask", "off"):
            raise ConfigError(f"ActivationMemory.relu must be 'bitmask' or 'off', got {self.relu!r}")
        for name in ("gelu", "silu", "batchnorm", "layernorm", "scale", "attention"):
            value = getattr(self, name)
            if value == "recompute" and name in ("gelu", "silu", "layernorm"):
                continue
            if value not in _STORAGE:
                raise ConfigError(
                    f"ActivationMemory.{name} must be one of {list(_STORAGE)}, got {value!r}"
                )
        if self.dense not in ("bf16", "off"):
            raise ConfigError(f"ActivationMemory.dense must be 'bf16' or 'off', got {self.dense!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ConfigError(f"ActivationMemory.block_size must be an int, got {self.block_size!r}")
        sfx.check_range(self, "block_size", self.block_size, 16, 65536)


# ---------------------------------------------------------------- bit masks

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
    (packed,) = ctx.saved_tensors
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


register_autograd(_actmem_relu, _relu_backward, _relu_setup)


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
    payload, scale = ctx.saved_tensors
    x = decompress(payload, scale, ctx.shape, ctx.dtype)
    return torch.ops.aten.gelu_backward(grad_out, x, approximate=ctx.approximate), None, None, None


def _silu_backward(ctx, grad_out, _g1, _g2):
    payload, scale = ctx.saved_tensors
    x = decompress(payload, scale, ctx.shape, ctx.dtype)
    return torch.ops.aten.silu_backward(grad_out, x), None, None


register_autograd(_actmem_gelu, _gelu_backward, _pointwise_setup)
register_autograd(_actmem_silu, _silu_backward, _pointwise_setup)


# ---------------------------------------------------------------- activation -> Linear, recomputed


def _activation(h: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    return F.gelu(h, approximate=approximate) if kind == "gelu" else F.silu(h)


@torch.library.custom_op("sparsify_fx::actmem_act_linear", mutates_args=())
def _actmem_act_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, approximate: str
) -> torch.Tensor:
    # the activation runs in h's dtype and its output is cast to the Linear's, as autocast does
    return F.linear(_activation(h, kind, approximate).to(weight.dtype), weight, bias)


@_actmem_act_linear.register_fake
def _(h, weight, bias, kind, approximate):
    return h.new_empty((*h.shape[:-1], weight.shape[0]), dtype=weight.dtype)


def _act_linear_setup(ctx, inputs, output) -> None:
    h, weight, bias, kind, approximate = inputs
    ctx.save_for_backward(h, weight)
    ctx.kind, ctx.approximate, ctx.has_bias = kind, approximate, bias is not None


def _act_linear_backward(ctx, grad_y):
    h, weight = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g = _activation(h, ctx.kind, ctx.approximate).to(weight.dtype)  # the recomputed activation
    grad_h = grad_w = grad_b = None
    if need_w:
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ g.reshape(-1, g.shape[-1])
    if need_b and ctx.has_bias:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    if need_h:
        grad_g = (grad_y @ weight).to(h.dtype)
        if ctx.kind == "gelu":
            grad_h = torch.ops.aten.gelu_backward(grad_g, h, approximate=ctx.approximate)
        else:
            grad_h = torch.ops.aten.silu_backward(grad_g, h)
    return grad_h, grad_w, grad_b, None, None


register_autograd(_actmem_act_linear, _act_linear_backward, _act_linear_setup)


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
    kernels = cpu_kernels.for_tensors(x) if storage == "bf16" and x.dtype == torch.float32 else None
    if kernels is not None:  # normalise, saturate and round to bf16 in one pass
        payload, scale = kernels.normalize_bf16(x.detach(), mean, invstd), x.new_empty(0)
    else:
        x_hat = (x.detach() - _channel_view(mean, x.dim())).mul_(_channel_view(invstd, x.dim()))
        payload, scale = compress(x_hat, storage, block)
    return out, payload, scale, mean, invstd, new_mean, new_var


@_actmem_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, storage, block):
    c = x.shape[1]
    stats = x.new_empty(c, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    return (
        torch.empty_like(x), *_fake_payload(x, storage, block), stats, torch.empty_like(stats),
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
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    eff_weight = invstd * weight if weight is not None else invstd
    kernels = None
    if payload.dtype == torch.bfloat16 and ctx.dtype == grad_out.dtype == eff_weight.dtype == torch.float32:
        kernels = cpu_kernels.for_tensors(grad_out, payload, eff_weight)
    if kernels is not None:  # two passes over grad and the bf16 x_hat, no fp32 copy of it
        grad_x, grad_w, grad_b = kernels.bn_backward_bf16(grad_out, payload, eff_weight, bool(need_x))
        return (grad_x if need_x else None, grad_w if need_w and weight is not None else None,
                grad_b if need_b and ctx.has_bias else None, None, None, None, None, None, None)
    x_hat = decompress(payload, scale, ctx.shape, ctx.dtype)
    # the fused kernel computes x_hat = (input - mean) * invstd and scales grad_x by
    # weight * invstd; feeding it x_hat, mean 0, invstd 1, weight*invstd is the same formula
    # re-centring on the stored x_hat's own channel mean (the kernel subtracts save_mean)
    # keeps sum_c(grad_x) ~ 0 as in dense autograd: a conv bias before BN then gets ~0
    # gradient instead of the bf16 rounding of sum(x_hat)
    dims = [d for d in range(x_hat.dim()) if d != 1]
    centre = x_hat.mean(dims, dtype=invstd.dtype)
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        grad_out, x_hat, eff_weight.to(ctx.dtype), None, None,
        centre, torch.ones_like(invstd), True, 0.0,
        [bool(need_x), bool(need_w and weight is not None), bool(need_b and ctx.has_bias)],
    )
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


register_autograd(_actmem_batch_norm, _bn_backward, _bn_setup)


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
    x_hat = (x.detach() - mean).mul_(rstd)
    payload, scale = compress(x_hat, storage, block)
    return out, payload, scale, mean, rstd


@_actmem_layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps, storage, block):
    k = len(normalized_shape)
    stats_shape = list(x.shape[: x.dim() - k]) + [1] * k
    stats = x.new_empty(stats_shape, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    return (torch.empty_like(x), *_fake_payload(x, storage, block), stats, torch.empty_like(stats))


def _ln_setup(ctx, inputs, output) -> None:
    x, normalized_shape, weight, bias = inputs[:4]
    _, payload, scale, _mean, rstd = output
    ctx.save_for_backward(payload, scale, rstd, weight, bias)
    ctx.shape, ctx.dtype = list(x.shape), x.dtype
    ctx.normalized_shape = list(normalized_shape)


def _ln_backward(ctx, grad_out, *_unused):
    payload, scale, rstd, weight, bias = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    x_hat = decompress(payload, scale, ctx.shape, ctx.dtype)
    # with mean 0 and rstd 1 the kernel's x_hat is the stored one; grad_x then lacks only the
    # per-row rstd factor, applied after
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_out, x_hat, ctx.normalized_shape, torch.zeros_like(rstd), torch.ones_like(rstd),
        weight, bias,
        [bool(need_x), bool(need_w and weight is not None), bool(need_b and bias is not None)],
    )
    if grad_x is not None:
        grad_x = grad_x.mul_(rstd.to(grad_x.dtype))
    return grad_x, None, grad_w, grad_b, None, None, None


register_autograd(_actmem_layer_norm, _ln_backward, _ln_setup)


# ---------------------------------------------------------------- LayerNorm -> Linear, recomputed


@torch.library.custom_op("sparsify_fx::actmem_ln_linear", mutates_args=())
def _actmem_ln_linear(
    x: torch.Tensor, normalized_shape: list[int], ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
    eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, ln_weight, ln_bias, eps)
    return F.linear(y.to(weight.dtype), weight, bias), mean, rstd


@_actmem_ln_linear.register_fake
def _(x, normalized_shape, ln_weight, ln_bias, eps, weight, bias):
    rows = list(x.shape[: x.dim() - len(normalized_shape)]) + [1] * len(normalized_shape)
    stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype),
            x.new_empty(rows, dtype=stat_dtype), x.new_empty(rows, dtype=stat_dtype))


def _ln_linear_setup(ctx, inputs, output) -> None:
    x, normalized_shape, ln_weight, ln_bias, eps, weight, bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, ln_weight, ln_bias, weight)
    ctx.normalized_shape, ctx.has_bias = list(normalized_shape), bias is not None


def _ln_linear_backward(ctx, grad_y, _g_mean, _g_rstd):
    x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
    need_x, _, need_lw, need_lb, _, need_w, need_b = ctx.needs_input_grad
    # the normalised input the Linear saw, recomputed from x and the saved row statistics
    y = (x - mean) * rstd
    if ln_weight is not None:
        y = y * ln_weight
    if ln_bias is not None:
        y = y + ln_bias
    y = y.to(weight.dtype)
    grad_w = grad_b = grad_x = grad_lw = grad_lb = None
    if need_w:
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ y.reshape(-1, y.shape[-1])
    if need_b and ctx.has_bias:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    if need_x or need_lw or need_lb:
        grad_ln = (grad_y @ weight).to(x.dtype)
        grad_x, grad_lw, grad_lb = torch.ops.aten.native_layer_norm_backward(
            grad_ln, x, ctx.normalized_shape, mean, rstd, ln_weight, ln_bias,
            [bool(need_x), bool(need_lw and ln_weight is not None), bool(need_lb and ln_bias is not None)],
        )
    return grad_x, None, grad_lw, grad_lb, None, grad_w, grad_b


register_autograd(_actmem_ln_linear, _ln_linear_backward, _ln_linear_setup)


# ---------------------------------------------------------------- scale by a parameter


@torch.library.custom_op("sparsify_fx::actmem_scale", mutates_args=())
def _actmem_scale(
    x: torch.Tensor, scale: torch.Tensor, storage: str, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    payload, s = compress(x, storage, block)
    return x * scale, payload, s


@_actmem_scale.register_fake
def _(x, scale, storage, block):
    out = x.new_empty(torch.broadcast_shapes(x.shape, scale.shape), dtype=torch.result_type(x, scale))
    return (out, *_fake_payload(x, storage, block))


def _scale_setup(ctx, inputs, output) -> None:
    x, scale = inputs[:2]
    ctx.save_for_backward(output[1], output[2], scale)
    ctx.shape, ctx.dtype = list(x.shape), x.dtype


def _scale_backward(ctx, grad_out, _g1, _g2):
    payload, s, scale = ctx.saved_tensors
    need_x, need_scale = ctx.needs_input_grad[:2]
    grad_x = grad_scale = None
    if need_x:  # what mul's backward computes: exact
        grad_x = (grad_out * scale).sum_to_size(ctx.shape).to(ctx.dtype)
    if need_scale:
        x = decompress(payload, s, ctx.shape, ctx.dtype)
        grad_scale = (grad_out * x).sum_to_size(scale.shape).to(scale.dtype)
    return grad_x, grad_scale, None, None


register_autograd(_actmem_scale, _scale_backward, _scale_setup)


# ---------------------------------------------------------------- scaled dot-product attention


@torch.library.custom_op("sparsify_fx::actmem_sdpa", mutates_args=())
def _actmem_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
    storage: str, block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    return (out, *compress(q, storage, block), *compress(k, storage, block), *compress(v, storage, block))


@_actmem_sdpa.register_fake
def _(q, k, v, is_causal, scale, storage, block):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return (out, *_fake_payload(q, storage, block), *_fake_payload(k, storage, block),
            *_fake_payload(v, storage, block))


def _sdpa_setup(ctx, inputs, output) -> None:
    q, k, v, is_causal, scale = inputs[:5]
    # only the compressed q, k, v: neither the dense operands nor the output are kept
    ctx.save_for_backward(*output[1:])
    ctx.shapes = [list(q.shape), list(k.shape), list(v.shape)]
    ctx.dtype, ctx.is_causal, ctx.scale = q.dtype, is_causal, scale


def _sdpa_backward(ctx, grad_out, *_unused):
    pq, sq, pk, sk, pv, sv = ctx.saved_tensors
    q, k, v = (decompress(p, s, shape, ctx.dtype) for p, s, shape in zip((pq, pk, pv), (sq, sk, sv), ctx.shapes))
    grad_out = grad_out.to(ctx.dtype)
    if type(grad_out) is torch.Tensor and not torch.compiler.is_compiling():
        # eager: re-run the attention on the stored q, k, v through the fused kernels and take
        # their gradient (1.5x faster than the formulas below on ViT-B/16's shapes on CPU)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, is_causal=ctx.is_causal, scale=ctx.scale)
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (*grads, None, None, None, None)
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
    return grad_q, grad_k, grad_v, None, None, None, None


register_autograd(_actmem_sdpa, _sdpa_backward, _sdpa_setup)


# ---------------------------------------------------------------- op modules


def _recording(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params)
    )


class ActMemReLU(nn.Module):
    """Parameter-free ReLU / LeakyReLU saving a 1-bit mask; eval runs the original op."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, negative_slope: float = 0.0, inplace: bool = False):
        super().__init__()
        self.negative_slope, self.inplace = float(negative_slope), bool(inplace)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, inplace={self.inplace}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _recording(x) and x.is_floating_point():
            return torch.ops.sparsify_fx.actmem_relu(x, self.negative_slope)[0]
        if self.negative_slope == 0.0:
            return F.relu(x, inplace=self.inplace)
        return F.leaky_relu(x, self.negative_slope, inplace=self.inplace)


class ActMemActivation(nn.Module):
    """Parameter-free GELU / SiLU saving a compressed input; eval runs the original op."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, kind: str, storage: str, block: int, approximate: str = "none", inplace: bool = False):
        super().__init__()
        self.kind, self.storage, self.block = kind, storage, block
        self.approximate, self.inplace = approximate, inplace

    def extra_repr(self) -> str:
        return f"{self.kind}, storage={self.storage}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _recording(x) and _compressible(x, self.storage):
            if self.kind == "gelu":
                return torch.ops.sparsify_fx.actmem_gelu(x, self.approximate, self.storage, self.block)[0]
            return torch.ops.sparsify_fx.actmem_silu(x, self.storage, self.block)[0]
        if self.kind == "gelu":
            return F.gelu(x, approximate=self.approximate)
        return F.silu(x, inplace=self.inplace)


class ActMemActLinear(nn.Module):
    """Parameter-free ``linear(act(h), weight, bias)`` whose backward keeps only ``h``.

    The activation's output, which the Linear would keep, is recomputed in backward; eval,
    ``no_grad`` and recording off run the two original ops.
    """

    #: keeps ``h`` itself, dense (read by sfx memory_plan)
    keeps_dense_inputs = True

    def __init__(self, kind: str, approximate: str = "none"):
        super().__init__()
        self.kind, self.approximate = kind, approximate

    def extra_repr(self) -> str:
        return f"{self.kind} -> linear, activation recomputed in backward"

    def forward(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and _recording(h, weight, bias):
            with sfx.autocast_region(h.device.type) as cast:
                return torch.ops.sparsify_fx.actmem_act_linear(h, cast(weight), cast(bias), self.kind,
                                                               self.approximate)
        return F.linear(_activation(h, self.kind, self.approximate), weight, bias)


class ActMemLnLinear(nn.Module):
    """Parameter-free ``linear(layer_norm(x), weight, bias)`` whose backward keeps ``x`` and the
    row statistics only: the normalised tensor the Linear would keep is recomputed."""

    #: keeps ``x`` itself, dense (read by sfx memory_plan)
    keeps_dense_inputs = True

    def __init__(self, normalized_shape: tuple[int, ...], eps: float):
        super().__init__()
        self.normalized_shape, self.eps = [int(n) for n in normalized_shape], eps

    def extra_repr(self) -> str:
        return f"layer_norm{tuple(self.normalized_shape)} -> linear, normalised input recomputed in backward"

    def forward(self, x, ln_weight, ln_bias, weight, bias=None):
        if self.training and _recording(x, ln_weight, ln_bias, weight, bias):
            with sfx.autocast_region(x.device.type) as cast:
                if ln_weight is not None and ln_weight.dtype != x.dtype:
                    # under autocast x arrives in bf16/fp16 beside fp32 LayerNorm parameters,
                    # and CUDA's layer-norm kernel takes no mixed dtypes: the parameters follow x
                    ln_weight, ln_bias = ln_weight.to(x.dtype), None if ln_bias is None else ln_bias.to(x.dtype)
                return torch.ops.sparsify_fx.actmem_ln_linear(
                    x, self.normalized_shape, ln_weight, ln_bias, self.eps, cast(weight), cast(bias))[0]
        return F.linear(F.layer_norm(x, self.normalized_shape, ln_weight, ln_bias, self.eps), weight, bias)


class ActMemScale(nn.Module):
    """Parameter-free ``x * scale`` (``scale`` a learned parameter) saving a compressed ``x``
    for the parameter's gradient; eval, ``no_grad`` and a frozen scale run the plain product."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, storage: str, block: int):
        super().__init__()
        self.storage, self.block = storage, block

    def extra_repr(self) -> str:
        return f"storage={self.storage}"

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if (self.training and torch.is_grad_enabled() and scale.requires_grad
                and _compressible(x, self.storage)
                and torch.broadcast_shapes(x.shape, scale.shape) == x.shape):
            return torch.ops.sparsify_fx.actmem_scale(x, scale, self.storage, self.block)[0]
        return x * scale


class ActMemAttention(nn.Module):
    """Parameter-free ``scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) keeping
    bf16/int8 q, k, v for backward; eval and no-grad run the original op."""

    #: the backward keeps only compressed copies (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, is_causal: bool, scale: float | None, storage: str, block: int):
        super().__init__()
        self.is_causal, self.scale, self.storage, self.block = is_causal, scale, storage, block

    def extra_repr(self) -> str:
        return f"is_causal={self.is_causal}, scale={self.scale}, storage={self.storage}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.training and _recording(q, k, v) and q.dim() >= 2 \
                and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
            with autocast_region(q.device.type) as cast:
                q, k, v = cast(q), cast(k), cast(v)
                if _compressible(q, self.storage) and q.dtype == k.dtype == v.dtype:
                    return torch.ops.sparsify_fx.actmem_sdpa(
                        q, k, v, self.is_causal, self.scale, self.storage, self.block)[0]
        # (operands already in the autocast dtype run the same kernel autocast would pick)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, scale=self.scale)


class ActMemBatchNorm(nn.Module):
    """Parameter-free BatchNorm: ``forward(x, weight, bias, running_mean, running_var,
    num_batches_tracked)`` with the original module's tensors, updating its running stats
    exactly as ``nn.BatchNorm`` does."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, momentum: float | None, eps: float, storage: str, block: int):
        super().__init__()
        self.momentum, self.eps, self.storage, self.block = momentum, eps, storage, block

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}, storage={self.storage}"

    def forward(self, x, weight, bias, running_mean, running_var, num_batches_tracked):
        if not self.training:
            factor = 0.0 if self.momentum is None else self.momentum
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, factor, self.eps)
        factor = self.momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        factor = 0.0 if factor is None else factor
        if _recording(x, weight, bias) and _compressible(x, self.storage):
            if x.numel() // x.shape[1] == 1:
                # F.batch_norm's own check; the raw aten kernel would return NaNs instead
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
                )
            out, *_, new_mean, new_var = torch.ops.sparsify_fx.actmem_batch_norm(
                x, weight, bias, running_mean, running_var, factor, self.eps, self.storage, self.block
            )
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
            return out
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, self.eps)


class ActMemLayerNorm(nn.Module):
    """Parameter-free LayerNorm: ``forward(x, weight, bias)`` with the original's tensors."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, storage: str, block: int):
        super().__init__()
        self.normalized_shape = [int(n) for n in normalized_shape]
        self.eps, self.storage, self.block = eps, storage, block

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, storage={self.storage}"

    def forward(self, x, weight=None, bias=None):
        if self.training and _recording(x, weight, bias) and _compressible(x, self.storage):
            return torch.ops.sparsify_fx.actmem_layer_norm(
                x, self.normalized_shape, weight, bias, self.eps, self.storage, self.block
            )[0]
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


# ---------------------------------------------------------------- the pass


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _inplace_reason(node: fx.Node, x: object) -> str | None:
    # training runs out of place; that is only the same program when nobody else sees x
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    if x.op in ("placeholder", "get_attr"):
        return "in-place op on a tensor visible outside the graph (input or attribute)"
    if len(x.users) > 1:
        return f"in-place op whose input {x.name!r} has other users"
    return None


def _numel_of(node: object) -> int | None:
    meta = sfx.tensor_meta(node)
    return math.prod(meta[0]) if meta is not None else None


def _stored_bytes(numel: int | None, storage: str, block: int) -> int | None:
    if numel is None:
        return None
    if storage == "bf16":
        return 2 * numel
    return math.ceil(numel / block) * (block + 4)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _candidate(gm: fx.GraphModule, node: fx.Node):
    """``(op name, original module or None)`` for a node this pass may rewrite, else None."""
    if node.op == "call_function":
        name = {F.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu",
                F.layer_norm: "layer_norm", F.batch_norm: "batch_norm",
                F.scaled_dot_product_attention: "attention"}.get(node.target)
        if name:
            return name, None
        if node.target in (operator.mul, torch.mul) and len(node.args) == 2 and not node.kwargs \
                and sum(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args) == 1:
            return "scale", None
        return None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) in _BATCH_NORMS:
            return "batch_norm", module
        if type(module) is nn.LayerNorm:
            return "layer_norm", module
        if type(module) is nn.LeakyReLU:
            return "leaky_relu", module
    return None


def _through_identity_dropout(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The single consumer of ``node`` past ``Dropout(p=0)`` modules, and the dropouts passed."""
    passed: list[fx.Node] = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.Dropout) \
                and gm.get_submodule(str(user.target)).p == 0 and len(user.args) == 1:
            passed.append(user)
            node = user
            continue
        return user, passed
    return None, passed


def _linear_consumer(gm: fx.GraphModule, node: fx.Node, what: str):
    """``(linear node, weight, bias)`` of the one Linear ``node`` feeds, or why there is none."""
    consumer, dropouts = _through_identity_dropout(gm, node)
    if consumer is None:
        return f"{what} needs one consumer (a Linear); {node.name} has {len(node.users)}"
    last = dropouts[-1] if dropouts else node
    if not (consumer.op == "call_function" and consumer.target is F.linear and consumer.args
            and consumer.args[0] is last):
        return f"{what} needs a Linear consumer; it feeds {consumer.format_node()}"
    weight, bias = _arg(consumer, 1, "weight"), _arg(consumer, 2, "bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return f"the consumer's weight is not a parameter: {consumer.format_node()}"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return f"the consumer's bias is not a parameter: {consumer.format_node()}"
    return consumer, weight, bias


def _plan_act_linear(gm: fx.GraphModule, node: fx.Node, op: str, approximate: object, x: object):
    if not isinstance(approximate, str):
        return "approximate is not a constant"
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    if op == "silu" and _arg(node, 1, "inplace", False):
        return "in-place SiLU"
    found = _linear_consumer(gm, node, f"{op}='recompute'")
    if isinstance(found, str):
        return found
    consumer, weight, bias = found
    return ActMemActLinear(op, approximate), (x, weight, bias), sfx.tensor_bytes(node), 0, consumer


def _plan_ln_linear(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, x: object):
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    found = _linear_consumer(gm, node, "layernorm='recompute'")
    if isinstance(found, str):
        return found
    consumer, weight, bias = found
    if module is not None:
        if _has_hooks(module):
            return "module has hooks; kept as a module call"
        if len(node.args) + len(node.kwargs) != 1:
            return "called with more than one argument"
        shape, eps = tuple(module.normalized_shape), module.eps
        with gm.graph.inserting_before(node):
            ln_w, ln_b = (gm.graph.get_attr(f"{node.target}.{n}") if getattr(module, n, None) is not None else None
                          for n in ("weight", "bias"))
        for a in (ln_w, ln_b):
            if a is not None:
                a.meta["sfx_module"] = str(node.target)
    else:
        shape, ln_w, ln_b, eps = (_arg(node, 1, "normalized_shape"), _arg(node, 2, "weight"),
                                  _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5))
        shape = (shape,) if isinstance(shape, int) else shape
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape) \
                or not isinstance(eps, (int, float)):
            return "normalized_shape / eps are not constants"
    return ActMemLnLinear(tuple(shape), float(eps)), (x, ln_w, ln_b, weight, bias), sfx.tensor_bytes(node), 0, consumer


def _plan_scale(gm: fx.GraphModule, node: fx.Node, config: ActivationMemory):
    if config.scale == "off":
        return "scale='off'"
    param, x = node.args if node.args[0].op == "get_attr" else node.args[::-1]
    if not isinstance(x, fx.Node):
        return "the other operand is not a graph value"
    try:
        value = gm.get_parameter(str(param.target))
    except AttributeError:  # a buffer or a constant tensor: no gradient, nothing kept
        value = None
    if value is None or not value.requires_grad:
        return f"{param.target} is not a trainable parameter: the product keeps nothing for backward"
    x_meta, out_meta = sfx.tensor_meta(x), sfx.tensor_meta(node)
    if x_meta is None or out_meta is None:
        return "shapes unknown (no example inputs recorded)"
    if tuple(out_meta[0]) != tuple(x_meta[0]):
        return f"{param.target} broadcasts {x.name} to a larger shape {tuple(out_meta[0])}"
    if not x_meta[1].is_floating_point:
        return f"{x.name} is not floating point"
    return (ActMemScale(config.scale, config.block_size), (x, param), sfx.tensor_bytes(x),
            _stored_bytes(_numel_of(x), config.scale, config.block_size))


def _plan_attention(node: fx.Node, config: ActivationMemory):
    if config.attention == "off":
        return "attention='off'"
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    args = {name: _arg(node, i, name) for i, name in enumerate(names)}
    if node.kwargs.get("enable_gqa", False):
        return "enable_gqa=True (grouped-query attention) is not supported"
    if args["attn_mask"] is not None:
        return "attn_mask given: the op would keep the mask dense; only unmasked / is_causal attention is rewritten"
    if args["dropout_p"] not in (None, 0, 0.0):
        return f"dropout_p={args['dropout_p']}: recomputing the probabilities would need the dropout mask"
    is_causal, scale = args["is_causal"] or False, args["scale"]
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        return "is_causal / scale are not constants"
    q, k, v = args["query"], args["key"], args["value"]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return "q, k, v are not graph values"
    metas = [sfx.tensor_meta(t) for t in (q, k, v)]
    before = after = None
    if all(m is not None for m in metas):
        if not (tuple(metas[0][0][:-2]) == tuple(metas[1][0][:-2]) == tuple(metas[2][0][:-2])):
            return "q, k, v batch dims differ (broadcasting attention is not supported)"
        before = sum(sfx.tensor_bytes(t) or 0 for t in (q, k, v, node))
        after = sum(_stored_bytes(_numel_of(t), config.attention, config.block_size) or 0 for t in (q, k, v))
    # without recorded shapes (a torch.compile graph) the op module checks them at run time and
    # runs the dense op on broadcasting batch dims
    module = ActMemAttention(is_causal, None if scale is None else float(scale), config.attention, config.block_size)
    return module, (q, k, v), before, after


def _plan(gm: fx.GraphModule, node: fx.Node, op: str, module: nn.Module | None, config: ActivationMemory):
    """``(op module, graph args, stored bytes before, after)`` or a skip reason string."""
    if op == "scale":
        return _plan_scale(gm, node, config)
    if op == "attention":
        return _plan_attention(node, config)
    x = _arg(node, 0, "input")
    numel = _numel_of(x)
    before = sfx.tensor_bytes(x)
    if op in ("relu", "leaky_relu"):
        if config.relu == "off":
            return "relu='off'"
        if module is not None:
            slope, inplace = module.negative_slope, module.inplace
            if _has_hooks(module):
                return "module has hooks; kept as a module call"
        else:
            slope = 0.0 if op == "relu" else _arg(node, 1, "negative_slope", 0.01)
            inplace = _arg(node, 2 if op == "leaky_relu" else 1, "inplace", False)
        if not isinstance(slope, (int, float)) or not isinstance(inplace, bool):
            return "negative_slope / inplace are not constants"
        if slope < 0:
            return f"negative_slope={slope} < 0: the sign of the output does not give the mask"
        if inplace and (why := _inplace_reason(node, x)):
            return why
        after = math.ceil(numel / 8) if numel is not None else None
        return ActMemReLU(slope, inplace), (x,), before, after
    if op in ("gelu", "silu"):
        storage = getattr(config, op)
        if storage == "off":
            return f"{op}='off'"
        approximate = _arg(node, 1, "approximate", "none") if op == "gelu" else "none"
        if storage == "recompute":
            return _plan_act_linear(gm, node, op, approximate, x)
        inplace = _arg(node, 1, "inplace", False) if op == "silu" else False
        if not isinstance(approximate, str) or not isinstance(inplace, bool):
            return "approximate / inplace are not constants"
        if inplace and (why := _inplace_reason(node, x)):
            return why
        module = ActMemActivation(op, storage, config.block_size, approximate, inplace)
        return module, (x,), before, _stored_bytes(numel, storage, config.block_size)
    g = gm.graph
    prefix = str(node.target)
    if op == "batch_norm" and module is None:
        # Dynamo / export graphs inline BatchNorm with its running-stat updates as separate ops
        return ("functional batch_norm (a graph from torch.export or Dynamo inlines the module and its "
                "running-stat updates) is not rewritten; capture with symbolic_trace or submodules to keep "
                "BatchNorm a module call")
    if op == "layer_norm" and config.layernorm == "recompute":
        return _plan_ln_linear(gm, node, module, x)
    if op == "layer_norm" and module is None:
        if config.layernorm == "off":
            return "layernorm='off'"
        shape = _arg(node, 1, "normalized_shape")
        weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        if isinstance(shape, int):
            shape = (shape,)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape):
            return "normalized_shape is not a constant"
        if not isinstance(eps, (int, float)):
            return "eps is not a constant"
        op_module = ActMemLayerNorm(tuple(shape), float(eps), config.layernorm, config.block_size)
        return op_module, (x, weight, bias), before, _stored_bytes(numel, config.layernorm, config.block_size)
    if op == "batch_norm":
        if config.batchnorm == "off":
            return "batchnorm='off'"
        if _has_hooks(module):
            return "module has hooks; kept as a module call"
        if not module.track_running_stats or module.running_mean is None:
            return "track_running_stats=False (batch statistics in eval) is not supported"
        if len(node.args) + len(node.kwargs) != 1:
            return "called with more than one argument"
        with g.inserting_before(node):
            attrs = [
                g.get_attr(f"{prefix}.{n}") if getattr(module, n) is not None else None
                for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            ]
        for a in attrs:
            if a is not None:
                a.meta["sfx_module"] = prefix
        op_module = ActMemBatchNorm(module.momentum, module.eps, config.batchnorm, config.block_size)
        return op_module, (x, *attrs), before, _stored_bytes(numel, config.batchnorm, config.block_size)
    # layer_norm
    if config.layernorm == "off":
        return "layernorm='off'"
    if _has_hooks(module):
        return "module has hooks; kept as a module call"
    if len(node.args) + len(node.kwargs) != 1:
        return "called with more than one argument"
    with g.inserting_before(node):
        attrs = [
            g.get_attr(f"{prefix}.{n}") if getattr(module, n, None) is not None else None
            for n in ("weight", "bias")
        ]
    for a in attrs:
        if a is not None:
            a.meta["sfx_module"] = prefix
    op_module = ActMemLayerNorm(module.normalized_shape, module.eps, config.layernorm, config.block_size)
    return op_module, (x, *attrs), before, _stored_bytes(numel, config.layernorm, config.block_size)


@sfx.register_pass(ActivationMemory, name="actmem")
def _activation_memory_pass(gm: fx.GraphModule, config: ActivationMemory, ctx) -> PassResult:
    result = PassResult(gm, modified=False)
    for node in list(gm.graph.nodes):
        found = _candidate(gm, node)
        if found is None:
            continue
        op, module = found
        module_name = str(node.meta.get("sfx_module", "")) or (str(node.target) if module else "")
        reason = ctx.selection_reason(config, None, module_name, gm)
        try:
            plan = reason if reason is not None else _plan(gm, node, op, module, config)
        except Exception as e:
            e.sfx_node = node  # the pass manager names this node in its PassError
            raise
        if isinstance(plan, str):
            result.skips.append(sfx.Skip(ctx.pass_name, node.name, ctx.qualified(module_name), op, plan))
            continue
        op_module, args, before, after, *fused = plan
        target = sfx.install_module(gm, f"actmem_{op}_{module_name or node.name}", op_module)
        replaced = fused[0] if fused else node
        with gm.graph.inserting_before(replaced):
            new = gm.graph.call_module(target, tuple(args))
        # a fused op *is* the Linear call now: later passes skip it under the Linear's name
        linear = sfx.module_name_of(fused[0]) if fused else ""
        new.meta["sfx_module"] = linear or module_name
        origin = node.name
        sfx.replace_node(replaced, new)
        if fused:  # the activation (and identity dropouts) now feed nothing
            dead = node
            chain = [dead]
            while dead.users:
                dead = next(iter(dead.users))
                chain.append(dead)
            for n in reversed(chain):
                if not n.users:
                    gm.graph.erase_node(n)
        result.rewrites.append(
            Rewrite(
                ctx.pass_name, origin, ctx.qualified(module_name), op, target,
                saved_bytes_before=before, saved_bytes_after=after,
                details={"storage": getattr(op_module, "storage", "recompute" if fused else "bitmask"),
                         **({"fused_linear": ctx.qualified(linear)} if fused else {})},
            )
        )
        result.modified = True
    if config.dense != "off":
        # after the activations: a fused activation->Linear pair already is that Linear's call
        from .dense_storage import rewrite_dense_inputs

        rewrite_dense_inputs(gm, config, ctx, result)
    return result
