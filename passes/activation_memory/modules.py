"""The parameter-free op modules ``ActivationMemory`` installs: each calls its custom op from
``passes/activation_memory/ops.py`` in training (with grad recording) and runs the exact original op in
eval mode or without grad; the BatchNorm module also updates the running statistics as
``nn.BatchNorm`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.activation_memory.ops import (
    _activation,
    _compressible,
    actmem_act_linear,
    actmem_batch_norm,
    actmem_gelu,
    actmem_layer_norm,
    actmem_ln_linear,
    actmem_relu,
    actmem_relu_,
    actmem_scale,
    actmem_sdpa,
    actmem_silu,
)
from sparsify_fx.passes.kernels.bf16_matmul import bf16_weight_grad, check_weight_grad

import sparsify_fx as sfx
from sparsify_fx import autocast_region

__all__ = [
    "ActMemReLU",
    "ActMemActivation",
    "ActMemBatchNorm",
    "ActMemLayerNorm",
    "ActMemActLinear",
    "ActMemLnLinear",
    "ActMemScale",
    "ActMemAttention",
]


def _recording(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params)
    )


def _stat_bytes(rows: int, dtype: torch.dtype, count: int) -> int:
    """``count`` fp32 statistics per row / channel (fp64 for an fp64 input)."""
    return count * rows * (8 if dtype == torch.float64 else 4)


def _rows(shape, normalized_shape) -> int:
    return math.prod(shape) // max(1, math.prod(normalized_shape))


def _channels(shape) -> int:
    return shape[1] if len(shape) > 1 else 1


class ActMemReLU(sfx.OpModule):
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
            # the rewrite made it in place only where no other node reads x
            if self.inplace and (out := actmem_relu_(x, self.negative_slope)) is not None:
                return out
            return actmem_relu(x, self.negative_slope)[0]
        if self.negative_slope == 0.0:
            return F.relu(x, inplace=self.inplace)
        return F.leaky_relu(x, self.negative_slope, inplace=self.inplace)


class ActMemActivation(sfx.OpModule):
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
                return actmem_gelu(x, self.approximate, self.storage, self.block)[0]
            return actmem_silu(x, self.storage, self.block)[0]
        if self.kind == "gelu":
            return F.gelu(x, approximate=self.approximate)
        return F.silu(x, inplace=self.inplace)


class ActMemActLinear(sfx.OpModule):
    """Parameter-free ``linear(act(h), weight, bias)`` whose backward keeps only ``h``.

    The activation's output, which the Linear would keep, is recomputed in backward; eval,
    ``no_grad`` and recording off run the two original ops. ``weight_grad`` (with
    ``store="bf16"``): ``passes/kernels/bf16_matmul.py``.
    """

    def __init__(self, kind: str, approximate: str = "none", store: str = "exact", weight_grad: str = "auto"):
        super().__init__()
        if store not in ("exact", "bf16"):
            raise ValueError(f"ActMemActLinear: store must be 'exact' or 'bf16', got {store!r}")
        check_weight_grad("ActMemActLinear", weight_grad)
        self.kind, self.approximate, self.store, self.weight_grad = kind, approximate, store, weight_grad
        #: keeps ``h`` itself, dense, unless it stores a bf16 copy (read by sfx memory_plan)
        self.keeps_dense_inputs = store == "exact"

    def extra_repr(self) -> str:
        kept = "" if self.store == "exact" else f" from a bf16 copy of its input, weight_grad={self.weight_grad}"
        return f"{self.kind} -> linear, activation recomputed in backward{kept}"

    def forward(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and _recording(h, weight, bias):
            with sfx.autocast_region(h.device.type) as cast:
                return actmem_act_linear(h, cast(weight), cast(bias), self.kind, self.approximate, self.store,
                                         bf16_weight_grad(self.weight_grad, h))[0]
        return F.linear(_activation(h, self.kind, self.approximate), weight, bias)


class ActMemLnLinear(sfx.OpModule):
    """Parameter-free ``linear(layer_norm(x), weight, bias)`` whose backward keeps ``x`` and the
    row statistics only: the normalised tensor the Linear would keep is recomputed.
    ``weight_grad`` (with ``store="bf16"``): ``passes/kernels/bf16_matmul.py``."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, store: str = "exact",
                 weight_grad: str = "auto"):
        super().__init__()
        if store not in ("exact", "bf16"):
            raise ValueError(f"ActMemLnLinear: store must be 'exact' or 'bf16', got {store!r}")
        check_weight_grad("ActMemLnLinear", weight_grad)
        self.normalized_shape, self.eps, self.store = [int(n) for n in normalized_shape], eps, store
        self.weight_grad = weight_grad
        #: keeps ``x`` itself, dense, unless it stores a bf16 ``x_hat`` (read by sfx memory_plan)
        self.keeps_dense_inputs = store == "exact"

    def extra_repr(self) -> str:
        kept = "" if self.store == "exact" else f" from a bf16 x_hat, weight_grad={self.weight_grad}"
        return f"layer_norm{tuple(self.normalized_shape)} -> linear, normalised input recomputed in backward{kept}"

    def stat_bytes(self, shape, dtype: torch.dtype) -> int:
        """What backward keeps beside its input (read by sfx memory_plan): rstd, and mean
        unless it keeps a bf16 ``x_hat``."""
        return _stat_bytes(_rows(shape, self.normalized_shape), dtype, 2 if self.store == "exact" else 1)

    def forward(self, x, ln_weight, ln_bias, weight, bias=None):
        if self.training and _recording(x, ln_weight, ln_bias, weight, bias):
            with sfx.autocast_region(x.device.type) as cast:
                if ln_weight is not None and ln_weight.dtype != x.dtype:
                    # under autocast x arrives in bf16/fp16 beside fp32 LayerNorm parameters,
                    # and CUDA's layer-norm kernel takes no mixed dtypes: the parameters follow x
                    ln_weight, ln_bias = ln_weight.to(x.dtype), None if ln_bias is None else ln_bias.to(x.dtype)
                return actmem_ln_linear(
                    x, self.normalized_shape, ln_weight, ln_bias, self.eps, cast(weight), cast(bias), self.store,
                    bf16_weight_grad(self.weight_grad, x))[0]
        return F.linear(F.layer_norm(x, self.normalized_shape, ln_weight, ln_bias, self.eps), weight, bias)


class ActMemScale(sfx.OpModule):
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
            return actmem_scale(x, scale, self.storage, self.block)[0]
        return x * scale


class ActMemAttention(sfx.OpModule):
    """Parameter-free ``scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) keeping
    bf16/int8 q, k, v for backward; eval and no-grad run the original op.

    ``keep_output``: also keep the (full-precision) output and its log-sum-exp, so backward
    runs the CPU flash kernel's backward alone instead of re-running the attention first. The
    output is usually held anyway, by the projection after the attention (a view of the same
    storage), so this costs the log-sum-exp (one float per query row). Off the CPU flash kernel
    (a GPU, other shapes) the attention is re-run as without it.
    """

    #: the backward keeps only compressed copies of its inputs (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, is_causal: bool, scale: float | None, storage: str, block: int,
                 keep_output: bool = False):
        super().__init__()
        self.is_causal, self.scale, self.storage, self.block = is_causal, scale, storage, block
        #: the backward keeps the op's own output dense (read by sfx memory_plan)
        self.keeps_output = keep_output

    def extra_repr(self) -> str:
        keep = ", keep_output=True" if self.keeps_output else ""
        return f"is_causal={self.is_causal}, scale={self.scale}, storage={self.storage}{keep}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.training and _recording(q, k, v) and q.dim() >= 2 \
                and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
            with autocast_region(q.device.type) as cast:
                q, k, v = cast(q), cast(k), cast(v)
                if _compressible(q, self.storage) and q.dtype == k.dtype == v.dtype:
                    return actmem_sdpa(
                        q, k, v, self.is_causal, self.scale, self.storage, self.block, self.keeps_output)[0]
        # (operands already in the autocast dtype run the same kernel autocast would pick)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, scale=self.scale)


class ActMemBatchNorm(sfx.OpModule):
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

    def stat_bytes(self, shape, dtype: torch.dtype) -> int:
        """What backward keeps beside the compressed ``x_hat`` (read by sfx memory_plan): invstd."""
        return _stat_bytes(_channels(shape), dtype, 1)

    def forward(self, x, weight, bias, running_mean, running_var, num_batches_tracked):
        factor = _bn_factor(self, num_batches_tracked)
        if not self.training:
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, factor, self.eps)
        if _recording(x, weight, bias) and _compressible(x, self.storage):
            _check_batch(x)
            out, *_, new_mean, new_var = actmem_batch_norm(
                x, weight, bias, running_mean, running_var, factor, self.eps, self.storage, self.block
            )
            _copy_stats(running_mean, running_var, new_mean, new_var)
            return out
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, self.eps)


# shared with the BatchNorm -> ReLU -> Conv op module (passes/activation_memory/bn_relu_conv.py): what
# nn.BatchNorm does around its kernel


def _bn_factor(op: nn.Module, num_batches_tracked: torch.Tensor | None) -> float:
    """The running-average factor ``nn.BatchNorm`` passes to ``F.batch_norm`` (``op.momentum``;
    ``None``: a cumulative average), counting the batch in ``num_batches_tracked`` in training."""
    if not op.training:
        return 0.0 if op.momentum is None else op.momentum
    factor = op.momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if op.momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    return 0.0 if factor is None else factor


def _check_batch(x: torch.Tensor) -> None:
    if x.numel() // x.shape[1] == 1:
        # F.batch_norm's own check; the raw aten kernel would return NaNs instead
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")


def _copy_stats(running_mean, running_var, new_mean, new_var) -> None:
    """Write back the running statistics a functional op updated on copies."""
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


class ActMemLayerNorm(sfx.OpModule):
    """Parameter-free LayerNorm: ``forward(x, weight, bias)`` with the original's tensors."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, storage: str, block: int):
        super().__init__()
        self.normalized_shape = [int(n) for n in normalized_shape]
        self.eps, self.storage, self.block = eps, storage, block

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, storage={self.storage}"

    def stat_bytes(self, shape, dtype: torch.dtype) -> int:
        """What backward keeps beside the compressed ``x_hat`` (read by sfx memory_plan): rstd."""
        return _stat_bytes(_rows(shape, self.normalized_shape), dtype, 1)

    def forward(self, x, weight=None, bias=None):
        if self.training and _recording(x, weight, bias) and _compressible(x, self.storage):
            return actmem_layer_norm(
                x, self.normalized_shape, weight, bias, self.eps, self.storage, self.block
            )[0]
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
